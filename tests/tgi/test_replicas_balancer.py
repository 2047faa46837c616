"""The replica balancer without I/O (tgi_gateway/tgi/replicas.py): golden tables for each decision, and
properties over seeded and drawn sequences (bounded loads, even spread, consistent hashing's stability)."""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgi_gateway.tgi.protocol import TGIInfo
from tgi_gateway.tgi.replicas import Balancer, affinity_key, narrowest

URLS = ["http://10.0.0.1:80", "http://10.0.0.2:80", "http://10.0.0.3:80", "http://10.0.0.4:80"]


KEYS = [random.Random(k).getrandbits(64) for k in range(8000)]  # spread over the ring


class Draws:
    """A stand-in for random.Random whose `sample` returns the listed index pairs, in order."""

    def __init__(self, *pairs: tuple[int, int]) -> None:
        self.pairs = list(pairs)

    def sample(self, population: list, k: int) -> list:
        assert k == 2
        i, j = self.pairs.pop(0)
        return [population[i], population[j]]


def loaded(balancer: Balancer, loads: list[int]) -> None:
    for replica, load in zip(balancer.live, loads):
        replica.in_flight = load


# ---------------------------------------------------------------------- power of two choices


@pytest.mark.parametrize(
    "loads,drawn,picked",
    [
        ([3, 0, 1], (0, 2), 2),  # the module docstring's example: C has fewer than A
        ([3, 0, 1], (2, 0), 2),
        ([3, 0, 1], (1, 2), 1),
        ([0, 0, 0], (2, 1), 2),  # a tie: the first drawn
        ([5, 5, 4], (0, 1), 0),  # the least loaded (C) is not drawn: the better of the two drawn
        ([1, 2, 3], (2, 1), 1),
    ],
)
def test_power_of_two_choices_takes_the_less_loaded_of_the_two_drawn(
    loads: list[int], drawn: tuple[int, int], picked: int
) -> None:
    balancer = Balancer(URLS[:3], rng=Draws(drawn))  # type: ignore[arg-type]
    loaded(balancer, loads)
    assert balancer.pick(0.0) is balancer.live[picked]


def test_the_most_loaded_replica_is_never_picked_without_a_key() -> None:
    balancer = Balancer(URLS, rng=random.Random(1))
    loaded(balancer, [1, 9, 2, 3])
    assert balancer.live[1] not in {balancer.pick(0.0) for _ in range(500)}


def test_the_same_seed_gives_the_same_decisions() -> None:
    def run(seed: int) -> list[str]:
        balancer = Balancer(URLS, rng=random.Random(seed))
        out = []
        for n in range(200):
            replica = balancer.pick(float(n), key=n if n % 3 == 0 else None)
            balancer.start(replica)
            if n % 2:
                balancer.finish(replica)
            out.append(replica.url)
        return out

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_one_replica_is_always_the_answer() -> None:
    balancer = Balancer(URLS[:1], rng=random.Random(0))
    only = balancer.live[0]
    balancer.failed(only, 0.0)
    assert balancer.pick(0.0) is only
    assert balancer.pick(0.0, key=123, tried=[only]) is only


# ---------------------------------------------------------------------- ejection and re-admission


def test_ejection_backs_off_exponentially_up_to_the_cap_and_a_success_resets_it() -> None:
    balancer = Balancer(URLS[:2], rng=random.Random(0), eject_base=1.0, eject_max=30.0)
    a = balancer.live[0]
    ends = []
    for now in range(7):
        balancer.failed(a, float(now))
        ends.append(a.ejected_until - now)
    assert ends == [1, 2, 4, 8, 16, 30, 30]
    balancer.succeeded(a)
    assert (a.failures, a.ejected_until) == (0, 0.0)
    balancer.failed(a, 100.0)
    assert a.ejected_until == 101.0


@pytest.mark.parametrize(
    "now,ok,ejected_after",
    [
        (0.5, True, False),  # a healthy probe re-admits at once
        (0.5, False, True),  # an unhealthy one while ejected: stays ejected, back-off unchanged
        (2.0, False, True),  # an unhealthy one after the ejection ended: ejected again
    ],
)
def test_probes_eject_and_readmit(now: float, ok: bool, ejected_after: bool) -> None:
    balancer = Balancer(URLS[:2], rng=random.Random(0))
    a = balancer.live[0]
    balancer.failed(a, 0.0)  # ejected until 1.0
    balancer.probed(a, ok, now)
    assert a.ejected(now) is ejected_after
    assert a.healthy is ok


def test_an_ejected_replica_is_not_picked_until_its_ejection_ends() -> None:
    balancer = Balancer(URLS[:2], rng=random.Random(0))
    a, b = balancer.live
    balancer.failed(a, 10.0)  # until 11.0
    assert {balancer.pick(10.5) for _ in range(50)} == {b}
    assert {balancer.pick(10.5, key=k) for k in range(50)} == {b}
    assert a in {balancer.pick(11.0) for _ in range(50)}  # back (half-open)


@pytest.mark.parametrize(
    "ejected,tried,picked",
    [
        ([], [0], {1, 2}),  # a failed attempt goes elsewhere
        ([1], [0], {2}),
        ([1, 2], [0], {2}),  # every untried one ejected: the one back soonest (2 was ejected first)
        ([], [0, 1, 2], {0, 1, 2}),  # all tried: any one again
    ],
)
def test_a_retry_avoids_the_tried_replicas_while_others_exist(
    ejected: list[int], tried: list[int], picked: set[int]
) -> None:
    balancer = Balancer(URLS[:3], rng=random.Random(3))
    for n, index in enumerate(sorted(ejected, reverse=True)):  # 2 is ejected first, so it is back first
        balancer.failed(balancer.live[index], n * 0.25)  # each ejected until 1.0 or later
    chosen = {
        balancer.live.index(balancer.pick(0.5, key=key, tried=[balancer.live[i] for i in tried]))
        for key in KEYS[:60]
    }
    assert chosen == picked


# ---------------------------------------------------------------------- membership


def test_replicas_that_disappear_are_drained_and_forgotten_when_idle() -> None:
    balancer = Balancer(URLS[:3], rng=random.Random(0))
    a, b, _ = balancer.live
    balancer.start(b)
    added, drained = balancer.update([URLS[0], URLS[2], URLS[3]])
    assert [r.url for r in added] == [URLS[3]] and drained == [b]
    assert b.draining and balancer.draining == [b]
    assert b not in {balancer.pick(0.0) for _ in range(200)}  # no new request
    assert b not in {balancer.pick(0.0, key=k) for k in range(200)}
    balancer.finish(b)  # its last request ends: forgotten
    assert balancer.draining == [] and b not in balancer.replicas
    balancer.update([URLS[0]])
    assert balancer.replicas == [a]  # c was idle: forgotten at once


def test_a_replica_listed_again_while_draining_is_live_again() -> None:
    balancer = Balancer(URLS[:2], rng=random.Random(0))
    a, b = balancer.live
    balancer.start(b)
    balancer.update([URLS[0]])
    balancer.update(URLS[:2])
    assert balancer.live == [a, b] and not b.draining and balancer.draining == []


def test_an_empty_list_is_refused() -> None:
    balancer = Balancer(URLS[:2])
    with pytest.raises(ValueError):
        balancer.update([])
    assert len(balancer.live) == 2


# ---------------------------------------------------------------------- affinity: bounded loads


def test_a_key_goes_to_its_home_while_it_has_room_then_along_the_ring() -> None:
    balancer = Balancer(URLS, rng=random.Random(0), vnodes=1)
    key = 12345
    home = balancer.owner(key)
    assert balancer.pick(0.0, key=key) is home
    # the ring's order from the key (one point per replica): home, then the next ones clockwise
    start = bisect.bisect_left(balancer._ring, key)
    order = [balancer._owners[(start + i) % 4] for i in range(4)]
    assert order[0] is home
    # total in flight 4, 4 replicas: capacity ceil(1.25 * 5 / 4) = 2; home at 2 is full, the next has 1: room
    home.in_flight, order[1].in_flight, order[2].in_flight = 2, 1, 1
    assert balancer.pick(0.0, key=key) is order[1]
    order[1].in_flight = 2  # now total 5, capacity ceil(1.25 * 6 / 4) = 2: next is order[2] (1 → 2)
    assert balancer.pick(0.0, key=key) is order[2]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    n=st.integers(2, 8),
    load_factor=st.sampled_from([1.0, 1.25, 1.5, 2.0]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 3)), min_size=1, max_size=300),
)
def test_no_replica_ever_takes_more_than_c_times_the_average(
    n: int, load_factor: float, ops: list[tuple[bool, int]]
) -> None:
    """Whatever the keys (here at most four, so hot ones) and the order of arrivals and ends, a keyed pick
    never leaves its replica above ceil(c × (in flight + 1) / n)."""
    balancer = Balancer(
        [f"http://10.1.0.{i}:80" for i in range(n)], rng=random.Random(0), load_factor=load_factor
    )
    running = []
    for arrive, key in ops:
        if arrive or not running:
            total = sum(r.in_flight for r in balancer.live)
            replica = balancer.pick(0.0, key=key)
            balancer.start(replica)
            assert replica.in_flight <= math.ceil(load_factor * (total + 1) / n)
            running.append(replica)
        else:
            balancer.finish(running.pop(key % len(running)))


def test_one_hot_prefix_spreads_over_every_replica_within_the_bound() -> None:
    balancer = Balancer(URLS, rng=random.Random(0))
    for _ in range(400):  # 400 requests of one prefix in flight at once
        balancer.start(balancer.pick(0.0, key=42))
    loads = [r.in_flight for r in balancer.live]
    assert max(loads) <= math.ceil(1.25 * 400 / 4) and min(loads) >= 400 - 3 * math.ceil(1.25 * 400 / 4)


def test_load_alone_spreads_evenly() -> None:
    """No key, requests that end at once (every load 0): two random choices are a fair draw: each replica's
    share is within 10 % of fair over 20 000 picks (binomial σ is 0.6 %)."""
    balancer = Balancer(URLS, rng=random.Random(11))
    counts = Counter(balancer.pick(0.0).url for _ in range(20_000))
    assert all(abs(count / 5000 - 1) < 0.1 for count in counts.values()) and len(counts) == 4


def test_keys_spread_over_the_ring_and_stay_put_when_a_replica_is_added() -> None:
    keys = KEYS
    before = Balancer(URLS, rng=random.Random(0))
    homes = {k: before.owner(k).url for k in keys}
    shares = Counter(homes.values())
    assert all(abs(count / 2000 - 1) < 0.25 for count in shares.values())  # 100 points per replica
    after = Balancer([*URLS, "http://10.0.0.5:80"], rng=random.Random(0))
    moved = [k for k in keys if after.owner(k).url != homes[k]]
    assert all(after.owner(k).url == "http://10.0.0.5:80" for k in moved)  # only to the new replica
    assert 0.1 < len(moved) / len(keys) < 0.3  # about a fifth


def test_every_process_builds_the_same_ring() -> None:
    a, b = Balancer(URLS, rng=random.Random(1)), Balancer(list(reversed(URLS)), rng=random.Random(2))
    assert all(a.owner(k).url == b.owner(k).url for k in range(0, 2**64, 2**58))


# ---------------------------------------------------------------------- the key and the limits

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    "one,other,same",
    [
        # the same tools and system prompt, other user messages: the same key
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "a"}],
         [{"role": "system", "content": "S"}, {"role": "user", "content": "b"}], True),
        # key order in the JSON does not matter
        ([{"role": "system", "content": "S"}], [{"content": "S", "role": "system"}], True),
        # another system prompt: another key
        ([{"role": "system", "content": "S"}], [{"role": "system", "content": "T"}], False),
        # a system message after the first user message is not part of the prefix
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "x"}],
         [{"role": "user", "content": "b"}, {"role": "system", "content": "y"}], True),
    ],
)  # fmt: skip
def test_the_affinity_key_is_the_tools_and_the_leading_system_messages(one, other, same) -> None:
    assert (affinity_key(one, TOOLS) == affinity_key(other, TOOLS)) is same
    assert affinity_key(one, TOOLS) != affinity_key(one, None) or not one


def test_no_prefix_no_key() -> None:
    assert affinity_key([{"role": "user", "content": "hi"}]) is None
    assert affinity_key([{"role": "user", "content": "hi"}], None, [{"name": "f"}]) is not None


def test_the_limits_are_the_narrowest_of_the_replicas() -> None:
    a = TGIInfo("m", max_input_tokens=4000, max_total_tokens=8000, max_stop_sequences=4)
    b = TGIInfo("m", max_input_tokens=3000, max_total_tokens=9000, max_stop_sequences=6, max_top_n_tokens=3)
    both = narrowest([a, b])
    assert (both.max_input_tokens, both.max_total_tokens, both.max_stop_sequences) == (3000, 8000, 4)
    assert both.max_top_n_tokens == 3
    assert narrowest([a]) is a
