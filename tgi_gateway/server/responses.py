"""The Responses API flow (``POST /v1/responses``): the chat route's pipeline with another mapping.

Theory of operation
-------------------
The request is converted to the chat request (:func:`tgi_gateway.responses.request.to_chat`, after the
stored conversation of ``previous_response_id``), then served by the chat route's own steps on the
:class:`~.chat.Gateway`: the model check, ``check_supported``, admission (``_admit``: normalise, grammar,
TGI's limits, render), ``_upstream`` (TGI's limits applied, the retry when they changed, the client's
disconnect), TGI's stream or ``/generate``, and the same :class:`~tgi_gateway.streaming.Answer` (stop
filter → parser), whose sink is an :class:`~tgi_gateway.responses.output.OutputBuilder` instead of the chat
chunks. A stream is written by the chat route's ``Gateway._stream`` (one write per batch of tokens, the
disconnect watch, TGI's request closed at the end), framed as ``event: <type>`` / ``data: <json>`` blocks.

The store (``app.state.store``, opened by the app's lifespan) is called here and nowhere else:
``_previous`` reads the conversation a request continues, ``_save`` keeps the response once it is complete,
before its last event or its JSON is sent (a client may continue from it at once). Without a store, every
request is ``store: false`` and ``previous_response_id`` is unknown.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from ..api.params import check_supported
from ..errors import GatewayError, InvalidRequestError
from ..responses.output import OutputBuilder, ResponseShape, new_response_id
from ..responses.request import Conversion, ResponsesRequest, responses_error, to_chat
from ..responses.stored import ResponseStore, StoredResponse, context_of
from ..streaming import Answer, ResponseContext
from ..tgi.client import StreamEnd
from .asgi import EventStreamResponse, json_response, until_disconnect
from .auth import KEY_ID_SCOPE
from .chat import SSE_HEADERS, Gateway, _close_upstream, feed_whole
from .telemetry import STREAM_CUT_KEY, RequestRecord, record_of

logger = logging.getLogger("tgi_gateway")

# What a stored conversation too long to continue is kept as (one item; never shown: input_items lists the input).
TOO_LONG = "tgi_gateway.conversation_too_long"

# A stored conversation up to this many items is converted on the event loop (with a small body), like a chat
# body up to INLINE_BODY_BYTES; a longer one in the admission thread.
INLINE_CONTEXT_ITEMS = 256

__all__ = ["create_response", "encode_event"]


def encode_event(event: dict[str, Any]) -> bytes:
    """One Responses stream event: ``event: <type>`` and ``data: <compact JSON>`` (as OpenAI sends them)."""
    try:
        body = orjson.dumps(event)
    except orjson.JSONEncodeError:  # a lone surrogate: the standard library escapes it
        import json

        body = json.dumps(event, separators=(",", ":")).encode("ascii")
    return b"event: " + event["type"].encode() + b"\ndata: " + body + b"\n\n"


async def create_response(gateway: Gateway, request: Request, body: ResponsesRequest) -> Response:
    """``POST /v1/responses``: a Response as JSON, or its events (``stream: true``)."""
    rec = record_of(request.scope) or RequestRecord("", time.perf_counter())  # telemetry (or detached)
    rec.model, rec.stream = body.model, bool(body.stream)
    store: ResponseStore | None = getattr(request.app.state, "store", None)
    owner: str | None = request.scope.get(KEY_ID_SCOPE)
    try:
        gateway.check_model(body.model)
        previous = await _previous(store, body.previous_response_id, owner)
        # A large body, or a long stored conversation, is converted and admitted in the admission thread.
        inline = gateway.inline(request) and len(previous) <= INLINE_CONTEXT_ITEMS
        conversion = await until_disconnect(
            request, gateway.run_admission(inline, partial(to_chat, body, previous))
        )
        req = conversion.chat
        check_supported(req)
        prompt, inputs, grammar = await until_disconnect(request, gateway._admit(request, req, inline))
        response_id, created = new_response_id(), int(time.time())
        keep = store is not None and body.store is not False
        shape = ResponseShape(
            _skeleton(body, response_id, created, keep), keep_first_call_only=req.parallel_tool_calls is False
        )
        builder = OutputBuilder(shape, emit=bool(body.stream))
        ctx = ResponseContext(id=response_id, created=created, model=body.model)
        answer = Answer(gateway.template.parser(prompt), ctx, stream=bool(body.stream), builder=builder)
        save = partial(
            _save, store if keep else None, owner, conversion, previous, body.previous_response_id,
            max_context_bytes=gateway.settings.max_body_bytes,
        )  # fmt: skip

        if body.stream:
            open_stream = partial(gateway._open_stream, inputs, logprobs=False)
            stack, tokens, first = await gateway._upstream(request, req, rec, open_stream, grammar)
            stream = partial(
                gateway._stream,
                tokens=tokens,
                batch=first,
                answer=answer,
                rec=rec,
                end=partial(_end, answer, builder, save),
                fail=partial(_failed, builder),
                encode=encode_event,
                head=b"".join(map(encode_event, builder.start())),
            )
            request.scope[STREAM_CUT_KEY] = partial(_failed, builder)  # the shutdown's cut: response.failed
            return EventStreamResponse(
                stream, on_close=partial(_close_upstream, stack, tokens), headers=SSE_HEADERS
            )

        generate = partial(gateway.client.generate, inputs, logprobs=False)
        generation = await gateway._upstream(request, req, rec, generate, grammar)
    except InvalidRequestError as exc:
        raise responses_error(exc) from None
    rec.first_token_at = time.perf_counter()  # telemetry: the whole answer arrived at once
    rec.prompt_tokens, rec.completion_tokens = generation.input_length, generation.generated_tokens
    feed_whole(answer, generation)
    response = builder.response(
        generation.finish_reason, generation.input_length or 0, generation.generated_tokens
    )
    await save(response)
    return json_response(response)


def _skeleton(body: ResponsesRequest, response_id: str, created: int, store: bool) -> dict[str, Any]:
    """The Response as `response.created` shows it: the request's fields echoed, as OpenAI does."""
    fmt = body.text.format if body.text is not None and body.text.format is not None else {"type": "text"}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "background": False,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "model": body.model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": fmt},
        "tool_choice": "auto" if body.tool_choice is None else body.tool_choice,
        "tools": body.tools or [],
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": body.truncation or "disabled",
        "usage": None,
        "user": body.user,
    }


async def _end(answer: Answer, builder: OutputBuilder, save: Any, end: StreamEnd) -> bytes:
    """The end of a stream: the open item closed, the response stored, `response.completed` (or
    `response.incomplete`)."""
    events = answer.finish(end.finish_reason)
    response = builder.response(end.finish_reason, end.input_length or 0, end.generated_tokens)
    await save(response)
    events.append(builder.terminal(response))
    return b"".join(map(encode_event, events))


def _failed(builder: OutputBuilder, exc: GatewayError) -> bytes:
    """A stream TGI broke after it started: `response.failed` with the error (never a top-level `error`
    key, which the SDK would raise as a chat error)."""
    return b"".join(map(encode_event, builder.failed(exc.code or "server_error", exc.message)))


# ------------------------------------------------------------------------------------------------
# The store: every call to it is here
# ------------------------------------------------------------------------------------------------


async def _previous(
    store: ResponseStore | None, response_id: str | None, owner: str | None
) -> list[dict[str, Any]]:
    """The conversation `previous_response_id` continues (its stored context); [] without one."""
    if response_id is None:
        return []
    stored = await store.get(response_id, owner) if store is not None else None
    if stored is None:
        raise InvalidRequestError(
            f"Previous response with id '{response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    if stored.context and stored.context[0].get("type") == TOO_LONG:
        size, limit = stored.context[0]["bytes"], stored.context[0]["limit"]
        raise InvalidRequestError(
            f"The conversation of response '{response_id}' is {size:,} bytes, more than this gateway continues "
            f"({limit:,} bytes, its request size limit): send the conversation again, shortened, or start a "
            "new one.",
            param="previous_response_id",
            code="context_length_exceeded",
        )
    return list(stored.context)


async def _save(
    store: ResponseStore | None,
    owner: str | None,
    conversion: Conversion,
    previous: list[dict[str, Any]],
    previous_response_id: str | None,
    response: dict[str, Any],
    *,
    max_context_bytes: int,
) -> None:
    """Keep a complete response (`store` None: `store: false`, or no store). A store that fails is logged;
    the client still gets its answer (a later `previous_response_id` to it is then a 400).

    A conversation longer, as JSON, than `max_context_bytes` (the request size limit: no client could send it
    in one request either) is kept as a marker of its size instead: continuing it is a 400 that says so,
    without the store ever decoding a conversation that grew turn after turn on the event loop."""
    if store is None:
        return
    context = context_of(previous, conversion.items, response["output"])
    try:
        size = len(orjson.dumps(context))
    except orjson.JSONEncodeError:  # (not JSON the store could keep either: its save fails, logged below)
        size = 0
    if size > max_context_bytes:
        context = [{"type": TOO_LONG, "bytes": size, "limit": max_context_bytes}]
    stored = StoredResponse(
        id=response["id"],
        owner=owner,
        created_at=response["created_at"],
        response=response,
        input_items=conversion.items,
        context=context,
        previous_response_id=previous_response_id,
    )
    try:
        await store.save(stored)
    except Exception:
        logger.exception("could not store response %s", response["id"])
