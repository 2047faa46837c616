"""The HTTP layer: `create_app(settings, template)` → a FastAPI app serving the OpenAI chat API over TGI.

Theory of operation
-------------------
Everything Functionary- or OpenAI-specific is in pure modules; this one wires them to I/O.

A chat completion request is validated (`ChatCompletionRequest` for the scalar fields, `normalize()` for
the prompt), rendered, and sent to TGI's `/generate_stream` — for stream and non-stream requests alike,
so both read the same tokens with the same code (`streaming.Answer`). TGI reports request errors
(validation, overload) as the *first* stream event, so the gateway reads that first event before it
answers: an upstream error found there becomes a proper HTTP error (400, 429 + Retry-After, 502, 503),
and only errors after the first token travel in the SSE stream. Three stream flows
(docs/architecture.md):

* normal end — TGI's final event → the finish chunk, the usage chunk if asked, `data: [DONE]`;
* client disconnect — the response is cancelled (`EventStreamResponse` listens for `http.disconnect`),
  which closes the upstream TGI response at once, so TGI drops the request from its batch;
* upstream error mid-stream — one `data: {"error": {...}}` event (the OpenAI envelope), then the end.

Non-stream requests race the same collection against the client's disconnect.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
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

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClientDisconnected(Exception):
    """The client went away before the answer was complete."""


class EventStreamResponse(StreamingResponse):
    """A streaming response that stops as soon as the client disconnects, whatever the ASGI server.

    Starlette only notices a gone client when a write fails; an SSE stream may wait seconds for its
    next token (queueing, a long prompt), and every such second keeps the request in TGI's batch. So the
    body is raced against `http.disconnect`, as Starlette did before ASGI spec 2.4.
    """

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], Awaitable[Any]], **kw: Any) -> None:
        super().__init__(content, media_type="text/event-stream", **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def run(func: Callable[[], Awaitable[None]]) -> None:
                    await func()
                    tg.cancel_scope.cancel()

                tg.start_soon(run, partial(self.stream_response, send))
                await run(partial(self.listen_for_disconnect, receive))
        finally:
            # The body may have been cancelled before it ever ran (its own cleanup then never runs):
            # close the upstream TGI response here in every case.
            with anyio.CancelScope(shield=True):
                await self._on_close()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`await work`, cancelled (→ ClientDisconnected) if the client disconnects first."""
    outcome: list[tuple[bool, Any]] = []

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        try:
            outcome.append((True, await work))
        except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup)
            outcome.append((False, exc))
        tg.cancel_scope.cancel()
    if not outcome:
        raise ClientDisconnected
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, headers=headers, media_type="application/json")


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

        async def start(stack: AsyncExitStack) -> tuple[TokenStream, list[Token | StreamEnd]]:
            waiting = time.perf_counter()
            try:
                info = await self.info()
                check_token_budget(req, info.max_total_tokens)
                parameters = tgi_parameters(req, self.template.stop_sequences, info.max_stop_sequences)
                tokens = await stack.enter_async_context(self.client.generate_stream(inputs, parameters))
                return tokens, await tokens.batch()  # TGI's request errors arrive here: still an HTTP error
            finally:
                rec.upstream_wait += time.perf_counter() - waiting

        # TGI may queue the request a long time: a client that leaves meanwhile cancels it. If TGI refuses
        # the request (a validation error, before generating anything) after it was restarted with other
        # limits (fewer stop sequences, a shorter context), the request is sent once more with its new limits.
        for attempt in (1, 2):
            stack = AsyncExitStack()
            try:
                tokens, first = await until_disconnect(request, start(stack))
                break
            except TGIValidationError:
                await stack.aclose()
                if attempt == 2 or not await self.limits_changed():
                    raise
            except TGIUnavailableError:
                await stack.aclose()
                self._info = None  # TGI may come back with other limits
                raise
            except BaseException:
                await stack.aclose()
                raise
        if req.stream:
            events = self._events(stack, tokens, first, answer, ctx, rec)
            return EventStreamResponse(events, on_close=stack.aclose, headers=SSE_HEADERS)
        try:
            return await until_disconnect(request, self._complete(tokens, first, answer, ctx, rec))
        finally:
            await stack.aclose()

    async def _complete(
        self,
        tokens: TokenStream,
        batch: list[Token | StreamEnd],
        answer: Answer,
        ctx: ResponseContext,
        rec: RequestRecord,
    ) -> Response:
        rec.first_token_at = time.perf_counter()
        while True:
            for item in batch:
                if isinstance(item, StreamEnd):
                    rec.prompt_tokens, rec.completion_tokens = item.input_length, item.generated_tokens
                    answer.finish(item.finish_reason)
                    await _read_to_end(tokens)  # the connection goes back to the pool
                    message = answer.message(item.finish_reason)
                    return json_response(chat_completion(ctx, message, item.input_length or 0, item.generated_tokens))
                answer.feed(item.text, item.special)
            batch = await _next(tokens, rec)

    async def _events(
        self,
        stack: AsyncExitStack,
        tokens: TokenStream,
        batch: list[Token | StreamEnd],
        answer: Answer,
        ctx: ResponseContext,
        rec: RequestRecord,
    ) -> AsyncIterator[bytes]:
        """The SSE body: every batch of tokens TGI sent meanwhile becomes one write."""
        async with stack:
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
                            yield b"".join(map(encode_sse, out)) + SSE_DONE
                            await _read_to_end(tokens)  # the connection goes back to the pool
                            return
                        out += answer.feed(item.text, item.special)
                    if out:
                        if rec.first_token_at is None:
                            rec.first_token_at = time.perf_counter()
                        yield b"".join(map(encode_sse, out))
                    batch = await _next(tokens, rec)
            except GatewayError as exc:
                rec.upstream_error = error_kind(exc)
                logger.warning("TGI failed mid-stream: %s", exc.message)
                yield encode_sse(exc.to_dict())
            except Exception:
                logger.exception("unexpected error mid-stream")
                yield encode_sse(GatewayError("The gateway failed unexpectedly; see its log.").to_dict())


async def _next(tokens: TokenStream, rec: RequestRecord) -> list[Token | StreamEnd]:
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
            {"status": "unavailable", "error": f"TGI at {gateway.settings.endpoint} does not answer /health"}, 503
        )

    instrument(app, [settings.model_name])  # GET /metrics, and the outermost middleware: counts, logs
    return app


def app_from_environment() -> FastAPI:
    """The app of one worker process (``--workers N``): the CLI's settings, passed as ``TGI_GATEWAY_*``
    variables, with the template version it detected."""
    settings = Settings()
    if settings.template_version is None:
        raise RuntimeError("worker started without TGI_GATEWAY_TEMPLATE_VERSION (start it with server_tgi.py)")
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings, Template(settings.template_version))


def _model_card(gateway: Gateway) -> dict[str, Any]:
    return {"id": gateway.settings.model_name, "object": "model", "created": gateway.created, "owned_by": "tgi-gateway"}


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
