"""The per-key limit of requests in flight, shared through Redis by every worker process and gateway replica.

Theory of operation
-------------------
A key's requests in flight are the members of one Redis sorted set, ``tgi-gateway:in-flight:<key id>``: one
member per request (a random slot id), scored with the time its lease ends. Taking a slot is one Lua script,
atomic on the Redis server: drop the members whose lease ended, count the rest, add the new one if there is
room. Times are the Redis server's own clock (``TIME``), so the gateways' clocks do not need to agree.

A request gives its slot back (``ZREM``) as its last body message leaves, as the in-process limit does. A
gateway that dies without giving back its slots does not hold them for ever: each lease lasts ``lease``
seconds (30) and is renewed every third of it, for every slot the process holds, in one round trip, by a
task started with the first slot. A killed process's slots are free again at most one lease later.

Redis unreachable, slow (``timeout``, 0.5 s) or failing: the request is counted by the in-process limit
instead (the gateway keeps a bound, per process, rather than refusing everything or nothing), and a warning
is logged at most once a minute. Redis holds nothing else: losing it loses only the current counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

logger = logging.getLogger("tgi_gateway")

KEY_PREFIX = "tgi-gateway:in-flight:"
LEASE_SECONDS = 30.0
TIMEOUT_SECONDS = 0.5
WARN_EVERY_SECONDS = 60.0

# KEYS[1] the key's set; ARGV: limit, lease in ms, slot id. 1 when the slot was taken, 0 when the key is full.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# KEYS: the sets of the slots held; ARGV: lease in ms, then one slot id per key. Renews the leases of the
# slots still there (XX: a slot already given back, or expired and dropped, is not brought back).
_RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', until_, ARGV[i + 1])
  redis.call('PEXPIRE', key, tonumber(ARGV[1]))
end
return #KEYS
"""

Release = Callable[[], Awaitable[None]]


class SharedInFlight:
    """Requests in flight per key id, at most `limit`, counted in Redis at `url` (see the module doc);
    `local` counts them while Redis cannot."""

    def __init__(
        self,
        url: str,
        limit: int,
        local: Any,
        *,
        lease: float = LEASE_SECONDS,
        timeout: float = TIMEOUT_SECONDS,
    ) -> None:
        self.limit = limit
        self._url, self._local, self._lease_ms = url, local, max(1, int(lease * 1000))
        self._timeout = timeout
        self._redis: redis.Redis | None = None
        self._acquire: Any = None
        self._renew: Any = None
        self._held: dict[str, str] = {}  # slot id → its set
        self._renewer: asyncio.Task[None] | None = None
        self._warned_at = -WARN_EVERY_SECONDS

    def _client(self) -> redis.Redis:
        if self._redis is None:  # in the loop that serves the requests (the first one)
            self._redis = redis.from_url(
                self._url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout,
                health_check_interval=30,
            )  # fmt: skip
            self._acquire = self._redis.register_script(_ACQUIRE)
            self._renew = self._redis.register_script(_RENEW)
        return self._redis

    async def acquire(self, kid: str) -> Release | None:
        """Take one of `kid`'s slots: the coroutine function that gives it back (once; later calls do
        nothing), or None when `kid` has `limit` requests in flight across every gateway."""
        self._client()
        slot, key = secrets.token_hex(8), KEY_PREFIX + kid
        try:
            taken = await self._acquire(keys=[key], args=[self.limit, self._lease_ms, slot])
        except (RedisError, OSError) as exc:
            self._unavailable(exc)
            return await self._local.acquire(kid)
        if not taken:
            return None
        self._held[slot] = key
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())

        async def release() -> None:
            if self._held.pop(slot, None) is None:
                return
            try:
                await self._redis.zrem(key, slot)  # type: ignore[union-attr]
            except (RedisError, OSError) as exc:  # its lease ends it
                self._unavailable(exc)

        return release

    async def _renew_leases(self) -> None:
        """While slots are held: their leases renewed every third of a lease, in one round trip."""
        while self._held:
            await asyncio.sleep(self._lease_ms / 3000)
            held = list(self._held.items())
            if not held:
                break
            try:
                await self._renew(keys=[key for _, key in held], args=[self._lease_ms, *(s for s, _ in held)])
            except (RedisError, OSError) as exc:
                self._unavailable(exc)

    def _unavailable(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_SECONDS:
            self._warned_at = now
            logger.warning(
                "Redis (--redis-url) failed: %s; the per-key limit counts in this process meanwhile", exc
            )

    async def aclose(self) -> None:
        """At the app's shutdown: stop renewing, give back what is still held, close the connections."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                if self._held:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for slot, key in self._held.items():
                            pipe.zrem(key, slot)
                        await pipe.execute()
            self._held.clear()
            await self._redis.aclose()
            self._redis = None
