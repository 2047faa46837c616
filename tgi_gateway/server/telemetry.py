"""Observability: Prometheus metrics (``GET /metrics``) and one structured log line per request.

Theory of operation
-------------------
:class:`TelemetryMiddleware` is the outermost layer of the app (:func:`instrument` wraps Starlette's whole
middleware stack, so the 401/413 of other middlewares and the 500 of an unexpected exception are seen too).
For each HTTP request it creates a :class:`RequestRecord`, puts it in the ASGI scope
(``scope["tgi_gateway.record"]``, read with :func:`record_of`), and lets the request handling fill it in:
the model, the tokens, when the first token went out, how long it waited on TGI, the upstream error kind.
The middleware itself notes the status, whether the response is a stream, and whether the client left
before the end. When the app returns, raises or is cancelled it observes every metric and writes the
access log line (logger ``tgi_gateway.access``) from that one record, so metrics and logs cannot disagree.
Being outermost, it also answers the requests the server cancels when its shutdown grace period ends (a
stream: the error event and the end of its body; a request not answered yet: a 503), marked ``shutdown``.

A stream sends thousands of body messages per second, so the middleware inspects ``http.response.start``
only, and of each body message just ``more_body`` (no coroutine of its own); the handler adds two
``perf_counter()`` calls per upstream event.

Every metric lives in a per-app :class:`~prometheus_client.CollectorRegistry` (several apps in one process,
tests, do not collide). With ``--workers N`` each scrape reaches one worker, so the CLI points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory (:func:`shared_metrics_dir`) where every worker writes its
values; ``/metrics`` then answers the sum over all workers (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import GatewayError, ShuttingDownError, TGIOverloadedError, UpstreamError
from .auth import KEY_ID_SCOPE

if TYPE_CHECKING:  # fastapi itself is not imported: the CLI imports this module for its logging set-up
    from fastapi import FastAPI

RECORD_KEY = "tgi_gateway.record"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED = "unmatched"  # the route label of a path no route matches: the label set stays bounded
OTHER_MODEL = "other"  # the model label of a model name that is not served (a 404): idem

# Seconds. Time to first token: a cached short prompt (5 ms) to a long queue (30 s). Durations: up to a
# long generation. Overhead: the gateway's own work, from tens of µs up.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

_REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")
_BARE = re.compile(r"[\w./:{}@+-]+")

access_log = logging.getLogger("tgi_gateway.access")


@dataclass(slots=True)
class RequestRecord:
    """What one HTTP request did: created by the middleware, filled in by the request handling."""

    request_id: str
    started: float  # time.perf_counter() at request start
    model: str | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: float | None = None  # first content/tool-call chunk sent (stream), TGI's answer (else)
    upstream_wait: float = 0.0  # seconds spent awaiting TGI (connect, queue, between tokens)
    upstream_error: str | None = None  # error_kind() of the UpstreamError that ended the request
    disconnected: bool = False  # the client left before the response was complete
    shutdown: bool = (
        False  # cut when the server's shutdown grace period ended (503, or a stream's error event)
    )


def record_of(scope: Scope) -> RequestRecord | None:
    """The request's record; None when the middleware is not installed."""
    return scope.get(RECORD_KEY)


def error_kind(exc: BaseException) -> str | None:
    """The metric label of an upstream error: its class name in snake case without ``TGI``/``Error``
    (``TGIOverloadedError`` → ``overloaded``, ``TGITimeoutError`` → ``timeout``), also ``timeout`` for an
    error caused by a timeout (``TimeoutError``, which aiohttp's timeouts are: a connection not opened in
    time is a ``TGIUnavailableError``). None for an error that is not TGI's."""
    if not isinstance(exc, UpstreamError):
        return None
    if isinstance(exc.__cause__, TimeoutError) and not isinstance(exc, TGIOverloadedError):
        return "timeout"
    name = type(exc).__name__.removeprefix("TGI").removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def request_id_of(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is 1-128 printable ASCII characters (safe to log and echo),
    else a new uuid4 hex."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class ReplicaMetrics:
    """Per TGI replica (label ``replica``: its URL), fed by the TGI client as things happen
    (:class:`~tgi_gateway.tgi.client.ReplicaEvents`), so that every worker's values reach the shared files in
    multiprocess mode: requests in flight, whether it is ejected, attempts sent, failovers away from it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge(
            "tgi_gateway_replica_in_flight",
            "Requests to this TGI replica in flight now.",
            ["replica"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.ejected_now = Gauge(
            "tgi_gateway_replica_ejected",
            "1 while the replica is ejected (it refused a connection, answered 503 or failed its /health) "
            "and has not answered since.",
            ["replica"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.requests = Counter(
            "tgi_gateway_replica_requests",
            "Attempts sent to this TGI replica (a failover counts one per replica tried).",
            ["replica"],
            registry=registry,
        )
        self.failovers = Counter(
            "tgi_gateway_replica_failovers",
            "Requests that failed on this replica before any response and were sent to another one.",
            ["replica"],
            registry=registry,
        )
        self._children: dict[str, tuple[Any, Any, Any, Any]] = {}

    def _of(self, url: str) -> tuple[Any, Any, Any, Any]:
        children = self._children.get(url)
        if children is None:
            children = self._children[url] = (
                self.in_flight.labels(url),
                self.requests.labels(url),
                self.failovers.labels(url),
                self.ejected_now.labels(url),
            )
        return children

    def request(self, url: str) -> None:
        in_flight, requests, _, _ = self._of(url)
        in_flight.inc()
        requests.inc()

    def done(self, url: str) -> None:
        self._of(url)[0].dec()

    def failover(self, url: str) -> None:
        self._of(url)[2].inc()

    def ejected(self, url: str, ejected: bool) -> None:
        self._of(url)[3].set(1 if ejected else 0)


class Telemetry:
    """The metrics of one app and the observation of a finished request (metrics + access log line)."""

    def __init__(self, model_names: Collection[str]) -> None:
        self._models = frozenset(model_names)
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV)
        if self.multiprocess_dir:
            forget_dead_workers(self.multiprocess_dir)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tgi_gateway_requests",
            "HTTP requests answered, by route template, status and model.",
            ["route", "status", "model"],
            registry=r,
        )
        self.streams_in_flight = Gauge(
            "tgi_gateway_streams_in_flight",
            "SSE responses being streamed now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.time_to_first_token = Histogram(
            "tgi_gateway_time_to_first_token_seconds",
            "From request start to the first content or tool-call chunk sent (stream), or TGI's whole answer.",
            ["stream"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tgi_gateway_prompt_tokens",
            "Prompt tokens of completed generations (TGI's count).",
            ["model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "tgi_gateway_completion_tokens",
            "Tokens generated by completed generations (TGI's count).",
            ["model"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "tgi_gateway_upstream_errors", "Requests ended by a TGI error, by kind.", ["kind"], registry=r
        )
        self.duration = Histogram(
            "tgi_gateway_request_duration_seconds",
            "From request start to the end of the response.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "tgi_gateway_overhead_seconds",
            "Request duration minus the time spent waiting on TGI.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.replicas = ReplicaMetrics(r)

    def exposition(self) -> bytes:
        """The text exposition of this app's metrics, or of every worker's in multiprocess mode."""
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
        return generate_latest(merged)

    def observe(self, scope: Scope, record: RequestRecord, route: str, status: int, ended: float) -> None:
        """Count the finished request and write its access log line."""
        duration = ended - record.started
        overhead = duration - record.upstream_wait
        model = "" if record.model is None else record.model if record.model in self._models else OTHER_MODEL
        self.requests.labels(route, str(status), model).inc()
        self.duration.labels(route).observe(duration)
        self.overhead.labels(route).observe(overhead)
        ttft = None if record.first_token_at is None else record.first_token_at - record.started
        if ttft is not None:
            self.time_to_first_token.labels("true" if record.stream else "false").observe(ttft)
        if record.prompt_tokens is not None:
            self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        if record.completion_tokens is not None:
            self.completion_tokens.labels(model).inc(record.completion_tokens)
        if record.upstream_error is not None:
            self.upstream_errors.labels(record.upstream_error).inc()
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                AccessLine(
                    request_id=record.request_id,
                    method=scope["method"],
                    route=route,
                    path=scope["path"],
                    status=status,
                    model=record.model,
                    stream=record.stream,
                    prompt_tokens=record.prompt_tokens,
                    completion_tokens=record.completion_tokens,
                    ttft_s=_seconds(ttft),
                    duration_s=_seconds(duration),
                    overhead_s=_seconds(overhead),
                    upstream_error=record.upstream_error,
                    key_id=scope.get(KEY_ID_SCOPE),
                    disconnected=record.disconnected,
                    shutdown=record.shutdown,
                )
            )


class TelemetryMiddleware:
    """Raw ASGI: one record per HTTP request, the ``X-Request-ID`` header on every response, the
    in-flight streams gauge, and :meth:`Telemetry.observe` when the request is over, whatever way."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.telemetry = telemetry
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id_of(scope), time.perf_counter())
        scope[RECORD_KEY] = record
        request_id = (b"x-request-id", record.request_id.encode("latin-1"))
        status = 0
        streaming = complete = False

        async def receive_noting_disconnect() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                record.disconnected = True
            return message

        def send_with_request_id(message: Message) -> Awaitable[None]:  # no coroutine of its own: cheaper
            nonlocal status, streaming, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), request_id]
                message = {**message, "headers": headers}
                for name, value in headers:
                    if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        streaming = True
                        self.telemetry.streams_in_flight.inc()
            elif not message.get("more_body", False):
                complete = True
            return send(message)

        try:
            await self.app(scope, receive_noting_disconnect, send_with_request_id)
        except asyncio.CancelledError:
            # The server cancels the requests still running when its shutdown grace period is over (uvicorn's
            # --timeout-graceful-shutdown); everything inside has unwound (a stream's TGI request is closed).
            # Answered here rather than left to the server (a traceback each, a stream cut mid-body).
            if (status and not streaming) or complete or not _stop_cancellation():
                raise
            record.shutdown = True
            # A client that reads nothing (its socket paused) must not hold the shutdown: the answer gets
            # a bounded time, then the connection goes with the server.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_ANSWER_SECONDS):
                    await _answer_shutdown(send_with_request_id, streaming, scope.get(STREAM_CUT_KEY))
        finally:
            ended = time.perf_counter()
            if streaming:
                self.telemetry.streams_in_flight.dec()
            if not status:  # no response at all: the client left, or the app failed before answering
                status = 499 if record.disconnected else 500
            route = scope.get("route")  # set by the router when it matched (the same scope dict)
            label = _template(route) if isinstance(route, BaseRoute) else self.route_of(scope)
            self.telemetry.observe(scope, record, label, status, ended)

    def route_of(self, scope: Scope) -> str:
        """The template of the route the path matches, the way Starlette's router picks it (first full
        match, else first path-only match: a 405), or UNMATCHED. Never the raw path: bounded labels."""
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return _template(route)
            if match is Match.PARTIAL and partial is None:
                partial = route
        return UNMATCHED if partial is None else _template(partial)


#: The scope entry of a route whose streams end otherwise than the chat route's: called with the error, it
#: returns the last bytes of its stream when the shutdown cuts it (the Responses API: ``response.failed``).
STREAM_CUT_KEY = "tgi_gateway.stream_cut"

#: How long the answer to a request cut by the shutdown may take to be written.
SHUTDOWN_ANSWER_SECONDS = 1.0


def _stop_cancellation() -> bool:
    """Take back the current task's cancellation (``Task.uncancel``) so that it can still answer; False
    when it was cancelled more than once (then it goes)."""
    task = asyncio.current_task()
    return task is not None and task.uncancel() == 0


async def _answer_shutdown(
    send: Send, streaming: bool, cut: Callable[[GatewayError], bytes] | None = None
) -> None:
    """The end of a request cut by the shutdown: a started stream gets the error as its last event and the
    end of its body — the route's own end of a failed stream when it put one in the scope
    (:data:`STREAM_CUT_KEY`: the Responses API's ``response.failed``), else the OpenAI envelope as one
    ``data:`` event, as for a TGI failure mid-stream; a request not answered yet, a 503 with
    ``Connection: close``."""
    error = ShuttingDownError()
    if streaming:
        body = cut(error) if cut is not None else b"data: " + orjson.dumps(error.to_dict()) + b"\n\n"
        await send({"type": "http.response.body", "body": body, "more_body": False})
    else:
        from .asgi import send_error  # (fastapi is imported only to serve: see TYPE_CHECKING above)

        await send_error(send, error, {"Connection": "close"})


def instrument(app: FastAPI, model_names: Collection[str]) -> Telemetry:
    """Serve ``GET /metrics`` and make the telemetry middleware the outermost layer of `app`.

    ``app.add_middleware`` would put it inside Starlette's ServerErrorMiddleware (so an unexpected
    exception's 500 would carry no request id) and below any middleware added after it; wrapping the
    built stack keeps it outermost whatever the order in which other middlewares are added.
    """
    telemetry = Telemetry(model_names)

    async def metrics(request: Request) -> Response:
        return Response(telemetry.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    build = app.build_middleware_stack

    def build_outermost() -> ASGIApp:
        return TelemetryMiddleware(build(), telemetry, app.routes)

    app.build_middleware_stack = build_outermost  # type: ignore[method-assign]
    return telemetry


def forget_dead_workers(path: str) -> None:
    """Drop the live gauges of worker processes that are gone (uvicorn restarts a worker that died):
    their streams ended with them. A worker that exits cleanly has already brought its gauge back to 0."""
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid = int(name.rsplit("_", 1)[1].removesuffix(".db"))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:  # alive, another user's
            pass


@contextlib.contextmanager
def shared_metrics_dir() -> Iterator[None]:
    """For ``--workers N``: a fresh ``PROMETHEUS_MULTIPROC_DIR`` for the workers (which inherit the
    environment), removed at exit. A directory the operator set is used as is and left in place."""
    if os.environ.get(MULTIPROC_ENV):
        yield
        return
    path = tempfile.mkdtemp(prefix="tgi-gateway-metrics-")
    os.environ[MULTIPROC_ENV] = path
    logging.getLogger("tgi_gateway").info("the workers' metrics are aggregated in %s", path)
    try:
        yield
    finally:
        del os.environ[MULTIPROC_ENV]
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Logs
# ------------------------------------------------------------------------------------------------

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class AccessLine(dict[str, Any]):
    """The fields of one access log line: a dict for :class:`JsonFormatter`, ``key=value`` text for any
    other formatter (values with spaces, quotes or control characters JSON-quoted: one line, unforgeable)."""

    def __str__(self) -> str:
        return " ".join(f"{key}={_logfmt(value)}" for key, value in self.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``ts``, ``level``, ``logger``, ``pid``, ``message`` and, for the access log,
    its fields), so that a log shipper needs no parsing rules."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
        }
        if isinstance(record.msg, AccessLine):
            line["message"] = f"{record.msg['method']} {record.msg['path']} {record.msg['status']}"
            line.update(record.msg)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str, log_format: str) -> None:
    """The root handler on stderr, text or JSON (``--log-format``); a no-op if logging is configured."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _logfmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    return text if _BARE.fullmatch(text) else orjson.dumps(text).decode()


def _template(route: BaseRoute) -> str:
    return getattr(route, "path_format", UNMATCHED)
