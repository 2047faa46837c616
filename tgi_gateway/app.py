"""The HTTP layer: `create_app(settings, template)` → a FastAPI app serving the OpenAI chat API over TGI.

Theory of operation
-------------------
Everything Functionary- or OpenAI-specific is in pure modules; this one wires them to I/O.

A chat completion request is validated (`ChatCompletionRequest` for the scalar fields, `normalize()` for
the prompt) and rendered. Both paths then feed TGI's tokens — their literal texts, special tokens included,
with TGI's `special` flag — through the same `streaming.Answer` (stop sequences, parser, chunks or message),
so the two cannot disagree; they differ only in the TGI route:

* **stream** requests read TGI's `/generate_stream`. TGI reports request errors (validation, overload) as
  the *first* stream event, so the gateway reads that first event before it answers: an upstream error
  found there becomes a proper HTTP error (400, 429 + Retry-After, 502, 503), and only errors after the
  first token travel in the SSE stream. Three stream flows (docs/architecture.md):

  * normal end — TGI's final event → the finish chunk, the usage chunk if asked, `data: [DONE]`;
  * client disconnect — the request's `DisconnectWatch` (one watcher of `http.disconnect` per request)
    cancels the body, which closes the upstream TGI response at once, so TGI drops the request from its
    batch;
  * upstream error mid-stream — one `data: {"error": {...}}` event (the OpenAI envelope), then the end.

* **non-stream** requests read TGI's `/generate` with `details: true`: one JSON answer once the generation
  is complete (`details.tokens`, `finish_reason`, `generated_tokens`; the prompt's tokens in the
  `x-prompt-tokens` header), bounded in all by `--request-timeout`. TGI's errors are HTTP statuses there;
  a client that disconnects while TGI generates cancels the call, which closes its TGI connection.

Both race TGI's answer (its first event, or the whole non-stream answer) against the client's disconnect
(`until_disconnect`, then 499), and both send a request TGI refused with a validation error once more when
TGI's limits changed (`Gateway._upstream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from . import __version__, auth, openapi
from .draining import Draining
from .errors import (
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    TGIProtocolError,
    TGIUnavailableError,
    TGIValidationError,
    UpstreamError,
)
from .limits import BodySizeLimit, StrictJSONRoute
from .openai_types import ChatCompletionRequest, HealthStatus
from .params import check_supported, check_token_budget, tgi_parameters
from .prompting import Template, normalize
from .settings import Settings
from .streaming import SSE_DONE, Answer, ResponseContext, chat_completion, encode_sse
from .telemetry import RequestRecord, configure_logging, error_kind, instrument, record_of
from .tgi_client import StreamEnd, TGIClient, TGIInfo, Token, TokenStream

logger = logging.getLogger("tgi_gateway")

T = TypeVar("T")
Batch = list[Token | StreamEnd]

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClientDisconnected(Exception):
    """The client went away before the answer was complete."""


class DisconnectWatch:
    """One per request: ``with DisconnectWatch.of(scope, receive):`` — the client's ``http.disconnect``
    cancels the block, which then raises :class:`ClientDisconnected` (at once if the client left earlier).

    One watcher task reads ``receive`` for the whole request; when the client goes away it cancels the
    task inside a block, wherever that task waits (TGI's queue, the next token, a write), and the
    cancellation is taken back (``uncancel``), so nothing above sees a cancelled task. The watcher is
    never cancelled itself: it ends when ``receive`` says ``http.disconnect``, which uvicorn also says
    once the response is complete. (A cancelled watcher would keep its request's whole scope in a
    reference cycle — task → CancelledError → traceback → frames — and at 256 streams the collector then
    paused the loop for up to 130 ms.) No task group either: anyio's cost 5–8 % of the CPU per request.
    Only for blocks whose every ``await`` may be cancelled.
    """

    __slots__ = ("_receive", "_watcher", "_task", "_gone", "_cancelled")

    SCOPE_KEY = "tgi_gateway.disconnect_watch"

    @classmethod
    def of(cls, scope: Scope, receive: Receive) -> DisconnectWatch:
        watch = scope.get(cls.SCOPE_KEY)
        if watch is None:
            watch = scope[cls.SCOPE_KEY] = cls(receive)
        return watch

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._task: asyncio.Task[Any] | None = None  # the task inside a block, if any
        self._gone = self._cancelled = False

    def __enter__(self) -> DisconnectWatch:
        if self._gone:
            raise ClientDisconnected
        self._task = asyncio.current_task()
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        # The client left, or the response is complete: no block will start again. The links to the
        # server's request (its receive) and to this task go, or they would tie the scope into a cycle.
        self._gone, self._receive, self._watcher = True, None, None  # type: ignore[assignment]
        if self._task is not None:  # a block's task waits: the cancellation lands there
            self._cancelled = True
            self._task.cancel()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        task, self._task = self._task, None
        if self._cancelled and task is not None:
            self._cancelled = False
            if task.uncancel() == 0 and isinstance(exc, asyncio.CancelledError):  # ours alone (no shutdown's)
                raise ClientDisconnected from None


class EventStreamResponse(Response):
    """An SSE response whose body is written by ``body(send)``, and which stops as soon as the client
    disconnects, whatever the ASGI server.

    ``body`` sends the ``http.response.body`` messages itself, the last one with ``more_body: False``
    (uvicorn then writes that chunk and the chunked encoding's end in one write), and returns then.
    Starlette only notices a gone client when a write fails; an SSE stream may wait seconds for its next
    token (queueing, a long prompt), and every such second keeps the request in TGI's batch. So the body
    runs under the request's :class:`DisconnectWatch`, and ``on_close`` runs in every case after it,
    outside the watch (the response is complete or abandoned): it reads TGI's response to its end or
    closes it. The body may have been cancelled before it ever ran, when its own cleanup never runs.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        body: Callable[[Send], Awaitable[None]],
        *,
        on_close: Callable[[], Awaitable[Any]],
        headers: Mapping[str, str],
    ) -> None:
        self.status_code = 200
        self.background = None
        self._body, self._on_close = body, on_close
        self.init_headers(headers)  # no body: no Content-Length, so the server sends it chunked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with DisconnectWatch.of(scope, receive):
                await send(
                    {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
                )
                await self._body(send)
        except ClientDisconnected:
            pass  # nobody to answer
        finally:
            await self._on_close()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`await work`, cancelled (→ ClientDisconnected) if the client disconnects first."""
    with DisconnectWatch.of(request.scope, request.receive):
        return await work


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body), status_code=status_code, headers=headers, media_type="application/json"
    )


def error_response(exc: GatewayError) -> Response:
    return json_response(exc.to_dict(), exc.status_code, exc.headers or None)


class Gateway:
    """The request handling: one per app, created in its lifespan."""

    def __init__(self, settings: Settings, template: Template, client: TGIClient) -> None:
        self.settings = settings
        self.template = template
        self.client = client
        self.created = int(time.time())
        self._info: TGIInfo | None = None

    async def info(self) -> TGIInfo:
        """TGI's limits, read lazily (TGI may come up after the gateway) and kept; forgotten when TGI is
        found unreachable (it may come back with other limits)."""
        if self._info is None:
            self._info = await self.client.info()
            logger.info(
                "TGI %s serves %s (max_input_tokens=%d, max_total_tokens=%d, max_stop_sequences=%d)",
                self._info.version, self._info.model_id, self._info.max_input_tokens,
                self._info.max_total_tokens, self._info.max_stop_sequences,
            )  # fmt: skip
        return self._info

    async def limits_changed(self) -> bool:
        """Read TGI's /info again (after TGI refused a request); True when it changed, the new one kept."""
        try:
            fresh = await self.client.info()
        except UpstreamError:
            return False  # the request's own error is the one to report
        changed, self._info = fresh != self._info, fresh
        if changed:
            logger.warning("TGI's /info changed (TGI restarted?): max_stop_sequences=%d, max_total_tokens=%d",
                           fresh.max_stop_sequences, fresh.max_total_tokens)  # fmt: skip
        return changed

    async def chat(self, request: Request, req: ChatCompletionRequest) -> Response:
        rec = record_of(request.scope) or RequestRecord("", time.perf_counter())  # telemetry (or detached)
        rec.model, rec.stream = req.model, bool(req.stream)
        if req.model != self.settings.model_name:
            raise ModelNotFoundError(f"The model `{req.model}` does not exist.", param="model")
        check_supported(req)
        prompt = normalize(
            {
                "messages": req.messages,
                "tools": req.tools,
                "tool_choice": req.tool_choice,
                "functions": req.functions,
                "function_call": req.function_call,
            }
        )
        inputs = self.template.render(prompt)
        ctx = ResponseContext.for_prompt(
            prompt,
            self.settings.model_name,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        )
        answer = Answer(self.template.parser(prompt), ctx, req.stop_list, stream=bool(req.stream))

        if req.stream:

            async def open_stream(parameters: dict[str, Any]) -> tuple[AsyncExitStack, TokenStream, Batch]:
                async with AsyncExitStack() as stack:  # closes the TGI response unless it is returned
                    tokens = await stack.enter_async_context(self.client.generate_stream(inputs, parameters))
                    first = await tokens.batch()  # TGI's request errors arrive here: still an HTTP error
                    return stack.pop_all(), tokens, first

            stack, tokens, first = await self._upstream(request, req, rec, open_stream)
            body = partial(self._stream, tokens=tokens, batch=first, answer=answer, ctx=ctx, rec=rec)
            return EventStreamResponse(
                body, on_close=partial(_close_upstream, stack, tokens), headers=SSE_HEADERS
            )

        generation = await self._upstream(request, req, rec, partial(self.client.generate, inputs))
        rec.first_token_at = time.perf_counter()  # telemetry: the whole answer arrived at once
        rec.prompt_tokens, rec.completion_tokens = generation.input_length, generation.generated_tokens
        for text, special in _pieces(generation.tokens):
            answer.feed(text, special)
        answer.finish(generation.finish_reason)
        message = answer.message(generation.finish_reason)
        return json_response(
            chat_completion(ctx, message, generation.input_length or 0, generation.generated_tokens)
        )

    async def _upstream(
        self,
        request: Request,
        req: ChatCompletionRequest,
        rec: RequestRecord,
        send: Callable[[dict[str, Any]], Awaitable[T]],
    ) -> T:
        """``send(parameters)`` to TGI with TGI's limits applied, raced against the client's disconnect
        (→ ClientDisconnected, and ``send`` is cancelled: its TGI request closed).

        TGI may queue the request a long time: a client that leaves meanwhile cancels it. If TGI refuses
        the request (a validation error, before generating anything) after it was restarted with other
        limits (fewer stop sequences, a shorter context), the request is sent once more with its new limits.
        """

        async def send_once() -> T:
            waiting = time.perf_counter()
            try:
                info = await self.info()
                check_token_budget(req, info.max_total_tokens)
                return await send(tgi_parameters(req, self.template.stop_sequences, info.max_stop_sequences))
            finally:
                rec.upstream_wait += time.perf_counter() - waiting  # telemetry

        for attempt in (1, 2):
            try:
                return await until_disconnect(request, send_once())
            except TGIValidationError:
                if attempt == 2 or not await self.limits_changed():
                    raise
            except TGIUnavailableError:
                self._info = None  # TGI may come back with other limits
                raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _stream(
        self,
        send: Send,
        tokens: TokenStream,
        batch: Batch,
        answer: Answer,
        ctx: ResponseContext,
        rec: RequestRecord,
    ) -> None:
        """The SSE body: every batch of tokens TGI sent meanwhile becomes one write; the last write also
        ends the response (TGI's response is then read to its end by `_close_upstream`)."""
        try:
            while True:
                out: list[dict[str, Any]] = []
                for item in batch:
                    if isinstance(item, StreamEnd):
                        rec.prompt_tokens, rec.completion_tokens = item.input_length, item.generated_tokens
                        out += answer.finish(item.finish_reason)
                        if rec.first_token_at is None:  # the whole answer was held back until the end
                            rec.first_token_at = time.perf_counter()
                        if ctx.include_usage:
                            out.append(answer.usage_chunk(item.input_length or 0, item.generated_tokens))
                        await send(_last_body(b"".join(map(encode_sse, out)) + SSE_DONE))
                        return
                    out += answer.feed(item.text, item.special)
                if out:
                    if rec.first_token_at is None:
                        rec.first_token_at = time.perf_counter()
                    chunk = b"".join(map(encode_sse, out))
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                batch = await _next(tokens, rec)
        except GatewayError as exc:
            rec.upstream_error = error_kind(exc)
            logger.warning("TGI failed mid-stream: %s", exc.message)
            await send(_last_body(encode_sse(exc.to_dict())))
        except Exception:
            logger.exception("unexpected error mid-stream")
            failure = GatewayError("The gateway failed unexpectedly; see its log.")
            await send(_last_body(encode_sse(failure.to_dict())))


async def _close_upstream(stack: AsyncExitStack, tokens: TokenStream) -> None:
    """After the response: a TGI stream read to its final event is read to its end, so that its
    connection serves the next request; any other is closed (TGI then drops the request)."""
    try:
        if tokens.ended:
            await _read_to_end(tokens)
    finally:
        await stack.aclose()


def _last_body(data: bytes) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": False}


def _pieces(tokens: list[Token]) -> Iterator[tuple[str, bool]]:
    """A whole answer's tokens for `Answer.feed`: each special token alone, with its flag, and each run of
    plain tokens as one piece. The stop filter and the parsers give the same answer for any split of the
    text (docs/architecture.md, "Parsing"), so this is the stream's answer, for a few calls instead of one
    per token."""
    run: list[str] = []
    for token in tokens:
        if token.special:
            if run:
                yield "".join(run), False
                run = []
            yield token.text, True
        else:
            run.append(token.text)
    if run:
        yield "".join(run), False


async def _next(tokens: TokenStream, rec: RequestRecord) -> Batch:
    waiting = time.perf_counter()
    try:
        return await tokens.batch()
    except StopAsyncIteration:
        raise TGIProtocolError("TGI closed the stream before the end of the generation.") from None
    finally:
        rec.upstream_wait += time.perf_counter() - waiting


async def _read_to_end(tokens: TokenStream) -> None:
    with contextlib.suppress(StopAsyncIteration):
        await tokens.batch()


def create_app(settings: Settings, template: Template) -> FastAPI:
    """The gateway app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with TGIClient(
            settings.endpoint,
            connect_timeout=settings.connect_timeout,
            first_token_timeout=settings.first_token_timeout,
            read_timeout=settings.read_timeout,
            request_timeout=settings.request_timeout,
            connect_retries=settings.connect_retries,
            api_key=settings.tgi_api_key.get_secret_value() if settings.tgi_api_key else None,
        ) as client:
            app.state.gateway = Gateway(settings, template, client)
            app.state.draining.install()  # SIGTERM: /health says "draining" for --drain-seconds, then stop
            logger.info(
                "serving %s (Functionary template %s) from TGI at %s",
                settings.model_name, template.version, settings.endpoint,
            )  # fmt: skip
            yield

    app = FastAPI(
        title="tgi-gateway",
        version=__version__,
        summary="OpenAI-compatible chat completions for MeetKai Functionary models served by TGI.",
        lifespan=lifespan,
    )
    # Access control (API keys, per-key limit; tgi_gateway/auth.py). Added first: middlewares added after it
    # wrap it, so they see every request, the refused ones included, and the key id it puts in the scope.
    auth.install(app, settings)
    app.router.route_class = StrictJSONRoute  # request bodies are strict JSON (limits.py)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.state.draining = Draining(settings.drain_seconds)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        if (rec := record_of(request.scope)) is not None:
            rec.upstream_error = error_kind(exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(_invalid_request(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return json_response(body, exc.status_code, dict(exc.headers or {}) or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error")
        return error_response(GatewayError("The gateway failed unexpectedly; see its log."))

    # The error statuses each route really answers, with OpenAI's envelope; no 422 (tgi_gateway/openapi.py).
    guarded = openapi.guarded(settings)
    openapi.install(app, settings, auth.OPEN_PATHS)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        summary="Create a chat completion",
        responses=openapi.error_responses(
            {400, 404, 413, 429, 500, 502, 503, 504} | guarded,
            s429="TGI is overloaded, or this API key has its maximum of requests in flight "
            "(`Retry-After` says when to retry).",
        ),
    )
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        try:
            return await request.app.state.gateway.chat(request, body)
        except ClientDisconnected:
            return Response(status_code=499)

    @app.get("/v1/models", summary="List the served model", responses=openapi.error_responses(guarded))
    async def list_models(request: Request) -> Response:
        return json_response({"object": "list", "data": [_model_card(request.app.state.gateway)]})

    @app.get(
        "/v1/models/{model:path}",
        summary="Describe the served model",
        responses=openapi.error_responses({404} | guarded),
    )
    async def get_model(request: Request, model: str) -> Response:
        gateway = request.app.state.gateway
        if model != gateway.settings.model_name:
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")
        return json_response(_model_card(gateway))

    @app.get(
        "/health",
        summary="200 when TGI answers its /health, 503 otherwise, and while draining",
        response_model=None,
        responses={
            200: {"model": HealthStatus, "description": "TGI answers its /health."},
            503: {"model": HealthStatus, "description": "TGI does not answer, or the gateway is draining."},
            **openapi.error_responses(openapi.guarded(settings, open_path=True)),
        },
    )
    async def health(request: Request) -> Response:
        if request.app.state.draining.active:
            return json_response({"status": "draining", "error": "the gateway is shutting down"}, 503)
        gateway = request.app.state.gateway
        if await gateway.client.health():
            return json_response({"status": "ok"})
        return json_response(
            {"status": "unavailable", "error": f"TGI at {gateway.settings.endpoint} does not answer /health"},
            503,
        )

    instrument(app, [settings.model_name])  # GET /metrics, and the outermost middleware: counts, logs
    return app


def tune_gc() -> None:
    """The server process's cycle collector, set once the app is built (not by `create_app`: a process
    that builds many apps, a test suite, must keep the defaults).

    A request leaves no reference cycle (tested), so the collector only ever finds the rare cycle of an
    error path; what it costs is its passes over live objects. `gc.freeze()` moves everything alive at
    start-up (modules, the app, pydantic's schemas: ~80,000 objects) out of its sight, and a first
    generation of 10,000 allocations instead of 700 makes its passes 14x rarer (the older generations keep
    their defaults, so the rare cycles of error paths are still freed soon). At 256 streams this took
    its time over a 40 s run from ~700 ms to ~100–200 ms (docs/performance.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def app_from_environment() -> FastAPI:
    """The app of one worker process (``--workers N``): the CLI's settings, passed as ``TGI_GATEWAY_*``
    variables, with the template version it detected."""
    settings = Settings()
    if settings.template_version is None:
        raise RuntimeError(
            "worker started without TGI_GATEWAY_TEMPLATE_VERSION (start it with server_tgi.py)"
        )
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, Template(settings.template_version))
    tune_gc()
    return app


def _model_card(gateway: Gateway) -> dict[str, Any]:
    return {
        "id": gateway.settings.model_name,
        "object": "model",
        "created": gateway.created,
        "owned_by": "tgi-gateway",
    }


def _invalid_request(exc: RequestValidationError) -> InvalidRequestError:
    """The most specific pydantic error as an OpenAI 400, `param` in OpenAI's dotted notation."""
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("Invalid request body.")
    first = errors[0]
    if first.get("type") == "json_invalid":  # loc ("body", position), ctx {"error": the parser's message}
        reason, position = first.get("ctx", {}).get("error", "invalid JSON"), first.get("loc", ("?",))[-1]
        why = f"{reason}, at position {position}"
        return InvalidRequestError(
            f"We could not parse the JSON body of your request ({why}). (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        )
    # A union field fails once per member ("stop" as a string, then as an array): the error that got
    # deepest into the body names the field best.
    loc, err = max(((_located(err, exc.body), err) for err in errors), key=lambda pair: len(pair[0]))
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if not loc:  # the body as a whole
        if err.get("type") == "missing":
            return InvalidRequestError("The request body is empty: send a JSON object.")
        if isinstance(err.get("input"), bytes):  # FastAPI hands over the raw bytes of a non-JSON content type
            return InvalidRequestError(
                "The request body must be JSON, sent with 'Content-Type: application/json'."
            )
        return InvalidRequestError("The request body must be a JSON object.")
    if err.get("type") == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    return InvalidRequestError(f"Invalid value for '{param}': {err.get('msg')}.", param=param)


def _located(err: Mapping[str, Any], body: Any) -> list[str | int]:
    """The error's place in the body: its keys and indices, without the leading "body" and without the
    union member tags pydantic puts in between ("str", "list[str]"), which name no place in the body."""
    loc = list(err.get("loc", ()))[1:]
    located: list[str | int] = []
    node = body
    for i, part in enumerate(loc):
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        ):
            located.append(part)
            node = node[part]
        elif err.get("type") == "missing" and i == len(loc) - 1:
            located.append(part)
    return located
