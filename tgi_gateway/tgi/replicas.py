"""Which TGI replica serves a request: the balancer's state and decisions, with no I/O.

Theory of operation
-------------------
The client (:mod:`tgi_gateway.tgi.client`) owns the I/O -- connections, the ``/health`` probe loop, the DNS
re-resolution -- and tells a :class:`Balancer` what happened; the balancer answers which replica to use.
Time is passed in (``now``, the loop's clock) and randomness comes from one ``random.Random``, so every
decision is a function of the calls made: tested with golden tables and a seeded generator.

State per :class:`Replica`: requests in flight, requests sent, failovers away from it, consecutive failures,
the time its ejection ends, whether it is draining, its ``/info`` (opaque here).

* **Pick** (:meth:`Balancer.pick`). The candidates are the replicas not draining and not ejected. Without an
  affinity key: **least outstanding requests, power of two choices** -- two distinct candidates drawn at
  random, the one with fewer requests in flight wins (the first drawn on a tie). With a key (a hash of the
  request's prompt prefix, :func:`affinity_key`): **consistent hashing with bounded loads** -- the key's
  place on a hash ring (``VNODES`` points per replica, from its URL, so every gateway process and every
  gateway replica builds the same ring), then clockwise to the first candidate whose load *after* taking the
  request is at most ``ceil(load_factor × (requests in flight + 1) / candidates)``: a hot prefix spills to
  the next replicas on the ring instead of overloading one (Mirrokni, Thorup, Zadimoghaddam, 2018).
  ``tried`` replicas (this request's failed attempts) are avoided while another exists. When every untried
  replica is ejected, the one whose ejection ends first is tried anyway (a single replica is never refused).
* **Ejection** (:meth:`Balancer.failed`): a connection failure or a 503 ejects the replica at once for
  ``eject_base × 2^(consecutive failures − 1)`` seconds, at most ``eject_max``. Afterwards it is a candidate
  again; a success (:meth:`Balancer.succeeded`) or a healthy probe (:meth:`Balancer.probed`) re-admits it
  and resets the back-off, another failure doubles it.
* **Membership** (:meth:`Balancer.update`): a new URL is added; one that is no longer listed is drained --
  never picked again, kept until its last request in flight ends (:meth:`Balancer.finish`), then forgotten.
  An empty list is refused (a resolver that answers nothing keeps the replicas it had).

Worked example: replicas A, B, C with 3, 0, 1 requests in flight, no key; the generator draws (A, C): C is
picked. With a key whose ring walk meets A then C: capacity ``ceil(1.25 × 5 / 3) = 3``; A would have 4, so C
(2) is picked.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from .protocol import TGIInfo

__all__ = ["LOAD_FACTOR", "VNODES", "Balancer", "Replica", "affinity_key", "narrowest"]

#: Points per replica on the hash ring: with 100, each replica's share of the keys is within a few per cent
#: of fair for up to a few dozen replicas, and the ring stays small (a bisection plus a short walk).
VNODES = 100
#: A replica may take at most this factor × the average load when it is a key's choice (c in the paper:
#: 1.25 keeps ~80 % of keys on their first choice under uniform load and caps a hot key's replica at 125 %).
LOAD_FACTOR = 1.25


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def affinity_key(messages: Sequence[Any], tools: Any = None, functions: Any = None) -> int | None:
    """The request's prefix key: a hash of its tools (or legacy functions) and of its leading system and
    developer messages, exactly as the client sent them (JSON, keys sorted). The rendered prompt starts with
    exactly these (the tools section, then the system messages), so requests with the same key share TGI's
    prefix cache up to the first user message. None when there is neither (nothing worth keeping together).
    Stable across processes (blake2b, not Python's ``hash``)."""
    leading = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer"):
            break
        leading.append(message)
    if not leading and not tools and not functions:
        return None
    try:
        data = orjson.dumps([tools or functions or [], leading], option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return None  # not JSON (normalize() refuses such a body anyway)
    return _hash(data)


def narrowest(infos: Iterable[TGIInfo]) -> TGIInfo:
    """One set of limits every replica accepts: the first ``/info`` with the smallest ``max_input_tokens``,
    ``max_total_tokens``, ``max_stop_sequences``, ``max_best_of`` and ``max_top_n_tokens`` of them all. The
    prompt is rendered before a replica is picked, so it must fit the smallest (replicas differ only during a
    rolling update)."""
    infos = list(infos)
    first = infos[0]
    if len(infos) == 1:
        return first
    tops = [i.max_top_n_tokens for i in infos if i.max_top_n_tokens is not None]
    return replace(
        first,
        max_input_tokens=min(i.max_input_tokens for i in infos),
        max_total_tokens=min(i.max_total_tokens for i in infos),
        max_stop_sequences=min(i.max_stop_sequences for i in infos),
        max_best_of=min(i.max_best_of for i in infos),
        max_top_n_tokens=min(tops) if tops else None,
    )


@dataclass(eq=False)
class Replica:
    """One TGI replica: its base URL and what the balancer knows of it."""

    url: str
    in_flight: int = 0
    requests: int = 0  # sent to it (every attempt)
    failovers: int = 0  # attempts that failed here and went on to another replica
    failures: int = 0  # consecutive failures (connection, 503), 0 once it answers
    ejected_until: float = 0.0  # the loop time its ejection ends (0: never ejected)
    ejections: int = 0
    draining: bool = False
    healthy: bool | None = None  # the last probe's answer (None: not probed yet)
    info: Any = None  # its /info (a TGIInfo), read by the client
    points: tuple[int, ...] = field(default=(), repr=False)

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now


class Balancer:
    """The replicas and the routing decisions (module docstring). ``rng`` makes it deterministic."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        rng: random.Random | None = None,
        load_factor: float = LOAD_FACTOR,
        eject_base: float = 1.0,
        eject_max: float = 30.0,
        vnodes: int = VNODES,
    ) -> None:
        if load_factor < 1:
            raise ValueError("load_factor must be at least 1")
        self.rng = rng or random.Random()
        self.load_factor = load_factor
        self.eject_base = eject_base
        self.eject_max = eject_max
        self.vnodes = vnodes
        self.live: list[Replica] = []  # in the order they were listed
        self.draining: list[Replica] = []
        self._ring: list[int] = []
        self._owners: list[Replica] = []
        self.update(urls)

    # ---------------------------------------------------------------- membership

    @property
    def replicas(self) -> list[Replica]:
        """Every replica, the draining ones last."""
        return self.live + self.draining

    def update(self, urls: Sequence[str]) -> tuple[list[Replica], list[Replica]]:
        """Make ``urls`` the live replicas (order kept): the new ones added, those no longer listed drained
        (forgotten at once when idle). Returns (added, drained)."""
        urls = list(dict.fromkeys(url.rstrip("/") for url in urls))
        if not urls:
            raise ValueError("a balancer needs at least one replica")
        known = {r.url: r for r in self.replicas}
        added = [Replica(url) for url in urls if url not in known]
        new_live = []
        for url in urls:
            replica = known.get(url) or next(r for r in added if r.url == url)
            replica.draining = False
            new_live.append(replica)
        kept = set(urls)
        drained = [r for r in self.live if r.url not in kept]
        for replica in drained:
            replica.draining = True
        self.draining = [r for r in self.draining + drained if r.draining and r.in_flight > 0]
        self.live = new_live
        self._build_ring()
        return added, drained

    def _build_ring(self) -> None:
        points: list[tuple[int, int]] = []
        for index, replica in enumerate(self.live):
            if not replica.points:
                replica.points = tuple(_hash(f"{replica.url}#{v}".encode()) for v in range(self.vnodes))
            points += [(point, index) for point in replica.points]
        points.sort()
        self._ring = [point for point, _ in points]
        self._owners = [self.live[index] for _, index in points]

    # ---------------------------------------------------------------- decisions

    def pick(self, now: float, key: int | None = None, tried: Iterable[Replica] = ()) -> Replica:
        """The replica for a request (or its next attempt, ``tried`` the replicas that failed it)."""
        live = self.live
        if len(live) == 1:
            return live[0]
        tried = set(tried)
        candidates = [r for r in live if r not in tried and not r.ejected(now)]
        if not candidates:
            untried = [r for r in live if r not in tried]
            if untried:  # all ejected: the one back soonest (never refuse to try)
                return min(untried, key=lambda r: r.ejected_until)
            candidates = [r for r in live if not r.ejected(now)] or live
        if len(candidates) == 1:
            return candidates[0]
        if key is not None:
            return self._by_key(key, candidates)
        a, b = self.rng.sample(candidates, 2)
        return b if b.in_flight < a.in_flight else a

    def _by_key(self, key: int, candidates: list[Replica]) -> Replica:
        """Consistent hashing with bounded loads over ``candidates``."""
        allowed = set(candidates)
        total = sum(r.in_flight for r in candidates)
        capacity = math.ceil(self.load_factor * (total + 1) / len(candidates))
        ring, owners = self._ring, self._owners
        start = bisect.bisect_left(ring, key)
        size = len(ring)
        for step in range(size):
            replica = owners[(start + step) % size]
            if replica in allowed and replica.in_flight + 1 <= capacity:
                return replica
        return min(candidates, key=lambda r: r.in_flight)  # unreachable: the capacity fits the average

    def owner(self, key: int) -> Replica:
        """The replica a key maps to with no load and no ejection (its home on the ring)."""
        return self._owners[bisect.bisect_left(self._ring, key) % len(self._ring)]

    # ---------------------------------------------------------------- what happened

    def start(self, replica: Replica) -> None:
        replica.in_flight += 1
        replica.requests += 1

    def finish(self, replica: Replica) -> None:
        replica.in_flight -= 1
        if replica.draining and replica.in_flight <= 0:
            self.draining = [r for r in self.draining if r is not replica]

    def failed(self, replica: Replica, now: float) -> None:
        """A connection failure or a 503: ejected, the back-off doubled."""
        replica.failures += 1
        replica.ejections += 1
        replica.ejected_until = now + min(self.eject_max, self.eject_base * 2 ** (replica.failures - 1))

    def succeeded(self, replica: Replica) -> None:
        """The replica answered: re-admitted, its back-off reset."""
        if replica.failures or replica.ejected_until:
            replica.failures = 0
            replica.ejected_until = 0.0

    def probed(self, replica: Replica, ok: bool, now: float) -> None:
        """The result of an active ``/health`` probe."""
        replica.healthy = ok
        if ok:
            self.succeeded(replica)
        elif not replica.ejected(now):
            self.failed(replica, now)
