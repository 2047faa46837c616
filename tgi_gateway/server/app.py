"""The gateway's ASGI app: ``create_app(settings, template)`` → a FastAPI app serving the OpenAI chat API
over TGI: its routes, its error handlers and its middlewares, around the chat flow (:mod:`.chat`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..api import openapi
from ..api.models import ChatCompletionRequest, HealthStatus
from ..api.validation import invalid_request
from ..errors import DescriptorsExhaustedError, GatewayError
from ..prompting import Template
from ..responses.request import ResponseObject, ResponsesRequest, ResponseStreamEvent
from ..settings import Settings
from ..tgi.client import TGIClient
from . import auth, responses, responses_store
from .asgi import ClientDisconnected, error_response, json_response
from .chat import Gateway
from .descriptors import DescriptorWatch
from .draining import Draining
from .limits import BodySizeLimit, StrictJSONRoute
from .telemetry import error_kind, instrument, record_of

logger = logging.getLogger("tgi_gateway")


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
            health_interval=settings.health_interval,
            resolve_interval=settings.resolve_interval,
            eject_base=settings.eject_seconds,
            eject_max=settings.eject_max_seconds,
            load_factor=settings.affinity_load_factor,
            events=telemetry.replicas,  # per-replica metrics
        ) as client:
            app.state.gateway = Gateway(settings, template, client)
            app.state.draining.install()  # SIGTERM: /health says "draining" for --drain-seconds, then stop
            logger.info(
                "serving %s (Functionary template %s) from TGI at %s",
                settings.model_name, template.version, ", ".join(settings.endpoint),
            )  # fmt: skip
            if settings.lora_adapters:
                logger.info("LoRA adapters served as models: %s", ", ".join(settings.model_names[1:]))
            try:
                async with responses_store.opened(app, settings):  # app.state.store, for /v1/responses
                    yield
            finally:
                app.state.gateway.close()
                if (shared := getattr(app.state, "shared_in_flight", None)) is not None:
                    await shared.aclose()  # the slots still held given back, Redis's connections closed

    app = FastAPI(
        title="tgi-gateway",
        version=__version__,
        summary="OpenAI-compatible chat completions for MeetKai Functionary models served by TGI.",
        lifespan=lifespan,
    )
    # Access control (API keys, per-key limit; tgi_gateway/server/auth.py). Added first: middlewares added after it
    # wrap it, so they see every request, the refused ones included, and the key id it puts in the scope.
    auth.install(app, settings)
    app.router.route_class = StrictJSONRoute  # request bodies are strict JSON (limits.py)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.state.draining = Draining(settings.drain_seconds)
    app.state.descriptors = DescriptorWatch()  # the gateway out of file descriptors: /health says so

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        if (rec := record_of(request.scope)) is not None:
            rec.upstream_error = error_kind(exc)
        if isinstance(exc, DescriptorsExhaustedError):
            request.app.state.descriptors.exhausted()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(invalid_request(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = str(exc.detail)
        if exc.status_code == 404 and request.url.path.startswith("/v1/"):  # no route matched
            message = unknown_route_message(app, request.method, request.url.path)
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return json_response(body, exc.status_code, dict(exc.headers or {}) or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error")
        return error_response(GatewayError("The gateway failed unexpectedly; see its log."))

    # The error statuses each route really answers, with OpenAI's envelope; no 422 (tgi_gateway/api/openapi.py).
    guarded = openapi.guarded(settings)
    openapi.install(app, settings, auth.OPEN_PATHS, {RESPONSES_PATH: RESPONSES_ANSWERS})

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

    @app.post(
        RESPONSES_PATH,
        response_model=None,
        summary="Create a response (the Responses API)",
        responses=openapi.error_responses(
            {400, 404, 413, 429, 500, 502, 503, 504} | guarded,
            s400="Invalid request: a bad body or parameter (`param` names it; a hosted tool type, `background`, "
            "an unknown `previous_response_id`: `code: previous_response_not_found`), or a value TGI refused.",
            s429="TGI is overloaded, or this API key has its maximum of requests in flight "
            "(`Retry-After` says when to retry).",
        ),
    )
    async def create_response(request: Request, body: ResponsesRequest) -> Response:
        try:
            return await responses.create_response(request.app.state.gateway, request, body)
        except ClientDisconnected:
            return Response(status_code=499)

    responses_store.install(app, settings)  # GET/DELETE /v1/responses/{id}, GET …/input_items

    @app.get(
        "/v1/models",
        summary="List the served model and its LoRA adapters",
        responses=openapi.error_responses(guarded),
    )
    async def list_models(request: Request) -> Response:
        gateway = request.app.state.gateway
        return json_response(
            {"object": "list", "data": [_model_card(gateway, name) for name in settings.model_names]}
        )

    @app.get(
        "/v1/models/{model:path}",
        summary="Describe the served model",
        responses=openapi.error_responses({404} | guarded),
    )
    async def get_model(request: Request, model: str) -> Response:
        gateway = request.app.state.gateway
        gateway.check_model(model)
        return json_response(_model_card(gateway, model))

    @app.get(
        "/health",
        summary="200 when TGI answers its /health, 503 otherwise, while draining, and when the gateway ran "
        "out of file descriptors",
        response_model=None,
        responses={
            200: {"model": HealthStatus, "description": "TGI answers its /health."},
            503: {
                "model": HealthStatus,
                "description": "TGI does not answer, the gateway is draining, or it ran out of file descriptors "
                "in the last 10 s.",
            },
            **openapi.error_responses(openapi.guarded(settings, open_path=True)),
        },
    )
    async def health(request: Request) -> Response:
        if request.app.state.draining.active:
            return json_response({"status": "draining", "error": "the gateway is shutting down"}, 503)
        if (problem := request.app.state.descriptors.problem()) is not None:
            return json_response({"status": "unavailable", "error": problem}, 503)
        gateway = request.app.state.gateway
        if await gateway.client.health():
            return json_response({"status": "ok"})
        return json_response(
            {
                "status": "unavailable",
                "error": f"TGI at {', '.join(gateway.settings.endpoint)} does not answer /health",
            },
            503,
        )

    # GET /metrics, and the outermost middleware: counts, logs
    telemetry = instrument(app, settings.model_names)
    return app


RESPONSES_PATH = "/v1/responses"
RESPONSES_ANSWERS = openapi.Answers(
    ResponseObject,
    ResponseStreamEvent,
    "The response: one JSON object, or a stream of its events with `stream: true`.",
    "With `stream: true`: server-sent events, each `event: <type>` and `data: <ResponseStreamEvent as JSON>` "
    "followed by a blank line, from `response.created` to `response.completed` (or `response.incomplete`; "
    "`response.failed` when TGI fails after the first event). No `data: [DONE]`.",
)

def unknown_route_message(app: FastAPI, method: str, path: str) -> str:
    """The 404 of a `/v1/...` route the gateway does not serve: the method and route, and what is served."""
    served = {
        (m, route.path)
        for route in app.routes
        if isinstance(route, APIRoute) and route.path.startswith("/v1/")
        for m in route.methods or ()
        if m != "HEAD"
    }
    listed = ", ".join(f"{m} {p.replace(':path}', '}')}" for p, m in sorted((p, m) for m, p in served))
    return f"Unknown route: {method} {path}. This gateway serves: {listed}."


def _model_card(gateway: Gateway, name: str) -> dict[str, Any]:
    """OpenAI's model object, with vLLM's `root` and `parent`: the base model's `root` is `--model` and it
    has no parent; a LoRA adapter's `root` is where TGI loads it from (its path, else its hub id) and its
    `parent` is the base model's name."""
    settings = gateway.settings
    card = {"id": name, "object": "model", "created": gateway.created, "owned_by": "tgi-gateway"}
    adapter = next((a for a in settings.adapters if a.name == name), None)
    if adapter is None:
        return {**card, "root": settings.model, "parent": None}
    return {**card, "root": adapter.source, "parent": settings.model_name}
