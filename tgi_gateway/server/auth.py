"""Access control: API keys and a per-key limit of requests in flight, as one raw ASGI middleware.

Theory of operation
-------------------
Keys come from ``--api-key`` (repeatable) or else ``TGI_GATEWAY_API_KEYS`` (a JSON list or a comma-separated
list; a flag wins over its variable), and from ``--api-key-file`` (one key per line); all of them are valid at
once. With no key the gateway is
open, as it always was. With keys, every request but those to the open paths (``/health`` and
``/metrics``, unless ``--protect-health``) needs ``Authorization: Bearer <key>``, or gets OpenAI's 401.
Paths match exactly, and anything else needs a key — unknown paths (no route listing for strangers), and
``/docs`` and ``/openapi.json`` too: the API's description is no more public than the API (a browser cannot
send the header, so read the spec with ``curl -H 'Authorization: Bearer …' …/openapi.json``).

A presented key is hashed (SHA-256) and compared with the digest of *every* configured key with
``hmac.compare_digest``: the time taken does not depend on which key matched, on how much of it matched,
nor on the length of the presented key. Keys never appear in a message or a log line: a request is known
by its key's id (``key-`` + 8 hex digits of the key's SHA-256), which :class:`AccessControl` puts in the
ASGI scope as ``scope["tgi_gateway.key_id"]`` for the middlewares around it (request logging); a wrong
key is echoed masked, as OpenAI does (``sk-a****wxyz``).

``--max-concurrent-per-key N`` bounds the requests a key has in flight: a slot is taken when the request
enters and given back as its last body message is sent (a stream's ``[DONE]`` included), or, for a
request that ends without one (client disconnected, request cancelled, app failed), when the app returns
(``try``/``finally``). Over the limit the answer is 429 with ``Retry-After``. With no key configured the
limit still applies, every client sharing the one ``anonymous`` count (a gateway-wide limit). Counters
live in the process: with ``--workers N`` the limit is per worker process.

The middleware is a plain ASGI callable, not Starlette's ``BaseHTTPMiddleware``: it adds one function
call per request, keeps streaming responses untouched, and its ``finally`` runs on cancellation.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import AuthenticationError, ConcurrencyLimitError
from ..settings import read_key_file
from .asgi import send_error

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..settings import Settings

logger = logging.getLogger("tgi_gateway")

#: The scope entry naming the key a request was authenticated with (never the key itself).
KEY_ID_SCOPE = "tgi_gateway.key_id"
#: What the concurrency limit counts requests under when no key is configured.
ANONYMOUS = "anonymous"
#: Paths answered without a key unless ``--protect-health``: probes and scrapers rarely carry one.
OPEN_PATHS = frozenset({"/health", "/metrics"})

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
CHALLENGE = {"WWW-Authenticate": "Bearer"}


# ------------------------------------------------------------------------------------------------
# Keys: identifying, masking (parsing them is the settings')
# ------------------------------------------------------------------------------------------------


def key_id(key: str | bytes) -> str:
    """A short, stable, non-secret name for `key` (logs, metrics): ``key-`` + 8 hex digits of its SHA-256."""
    raw = key.encode() if isinstance(key, str) else key
    return "key-" + hashlib.sha256(raw).hexdigest()[:8]


def mask(key: str) -> str:
    """`key` as it may appear in a message: at most its first and last 4 characters, and never more than a
    quarter of it in all (``sk-p****wxyz`` for a 32-character key, ``****`` below 8 characters)."""
    shown = min(4, len(key) // 8)
    return f"{key[:shown]}****{key[-shown:]}" if shown else "****"


class KeyRing:
    """The configured keys, kept only as SHA-256 digests, matched in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        digests = {hashlib.sha256(key.encode()).digest(): key_id(key) for key in keys}
        self._entries = tuple(digests.items())

    def match(self, presented: bytes) -> str | None:
        """The id of the configured key equal to `presented`, or None.

        Digests have one length whatever the keys' lengths, and every configured key is compared, with no
        early exit: the time does not tell whether, which or how much of a key matched.
        """
        digest = hashlib.sha256(presented).digest()
        found = None
        for known, kid in self._entries:
            if hmac.compare_digest(digest, known):
                found = kid
        return found


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's ``Authorization: Bearer <token>`` header (scheme in any case), or None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


# ------------------------------------------------------------------------------------------------
# The middleware
# ------------------------------------------------------------------------------------------------


class InFlight:
    """Requests in flight per key, bounded by `limit`.

    No lock: a slot is checked and taken without awaiting in between, and one event loop runs all the
    process's requests.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: Counter[str] = Counter()

    def __getitem__(self, kid: str) -> int:
        return self._counts[kid]

    async def acquire(self, kid: str) -> Callable[[], Awaitable[None]] | None:
        """Take one of `kid`'s slots: the coroutine function that gives it back (any number of calls, one
        effect), or None when `kid` already has `limit` requests in flight. (A coroutine, as the shared
        limit's, :class:`~.shared_in_flight.SharedInFlight`; it never awaits anything.)"""
        if self._counts[kid] >= self.limit:
            return None
        self._counts[kid] += 1
        held = True

        async def release() -> None:
            nonlocal held
            if held:
                held = False
                self._counts[kid] -= 1
                if not self._counts[kid]:
                    del self._counts[kid]

        return release


class AccessControl:
    """ASGI middleware: checks the Bearer key (when `keys` are given) and the per-key limit (when
    `max_concurrent` is given) of every HTTP request outside `open_paths`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Sequence[str] = (),
        max_concurrent: int | None = None,
        in_flight: Any = None,
        open_paths: frozenset[str] = OPEN_PATHS,
        retry_after: int = 1,
    ) -> None:
        self.app = app
        self.keys = KeyRing(keys) if keys else None
        # `in_flight`: a limit shared with other processes (SharedInFlight); else one of this process
        if in_flight is None and max_concurrent is not None:
            in_flight = InFlight(max_concurrent)
        self.in_flight = in_flight
        self.open_paths = open_paths
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        kid = ANONYMOUS
        if self.keys is not None:
            token = bearer_token(scope)
            if token is None:
                await send_error(send, AuthenticationError(MISSING_KEY), CHALLENGE)
                return
            matched = self.keys.match(token)
            if matched is None:
                message = f"Incorrect API key provided: {mask(token.decode('latin-1'))}."
                await send_error(send, AuthenticationError(message), CHALLENGE)
                return
            kid = scope[KEY_ID_SCOPE] = matched  # in place: the middlewares around this one see it too
        if self.in_flight is None:
            await self.app(scope, receive, send)
            return
        release = await self.in_flight.acquire(kid)
        if release is None:
            await send_error(send, over_limit(kid, self.in_flight.limit, self.retry_after))
            return

        async def send_then_release(message: Message) -> None:
            # Given back as the last body message leaves, not when the app returns: a stream's cleanup
            # (closing TGI's response) may still await while the client, which has its whole answer,
            # already sends its next request, which must not be refused.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await release()
            await send(message)

        try:
            await self.app(scope, receive, send_then_release)
        finally:  # a disconnect, a cancellation or an error ends the request without a last body message
            await release()


def over_limit(kid: str, limit: int, retry_after: int) -> ConcurrencyLimitError:
    """The 429 of a request over its key's limit (the key is not named: the client knows which it sent)."""
    who = "this gateway" if kid == ANONYMOUS else "this API key"
    return ConcurrencyLimitError(
        f"Too many concurrent requests for {who}: at most {limit} at a time. "
        "Retry when one of them has finished.",
        retry_after=retry_after,
    )


def install(app: FastAPI, settings: Settings) -> None:
    """Add :class:`AccessControl` to `app` when keys or a per-key limit are configured; log what is enforced
    (key ids only). Keys from ``--api-key-file`` are read here, in every worker process: the file's path
    travels to workers, its keys do not."""
    keys = [key.get_secret_value() for key in settings.api_keys]
    if settings.api_key_file is not None:
        keys += read_key_file(settings.api_key_file)
    if not keys and settings.max_concurrent_per_key is None:
        return
    open_paths = frozenset() if settings.protect_health else OPEN_PATHS
    limit, shared = settings.max_concurrent_per_key, None
    if limit is not None and settings.redis_url is not None:
        from .shared_in_flight import SharedInFlight

        shared = SharedInFlight(settings.redis_url.get_secret_value(), limit, InFlight(limit))
        app.state.shared_in_flight = shared  # closed by the app's lifespan
    app.add_middleware(
        AccessControl, keys=keys, max_concurrent=limit, in_flight=shared, open_paths=open_paths
    )
    ids = sorted({key_id(key) for key in keys})
    logger.info(
        "access control: %s; %s; open paths: %s",
        f"{len(ids)} API key(s) ({', '.join(ids)})" if keys else "no API key (open)",
        f"at most {limit} requests in flight per key "
        + ("(shared through Redis by every process)" if shared is not None else "(per process)")
        if limit is not None
        else "no per-key limit",
        ", ".join(sorted(open_paths)) or "none",
    )
