"""The chat completion flow: an OpenAI request → a prompt → TGI → an OpenAI message or SSE stream.

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

Admission (`Gateway._admit`): `normalize()`, then TGI's limits (`/info`, kept), then `render()` with the
most tokens the prompt may have, so a prompt that cannot fit is refused before it is rendered in full and
before anything is sent. Both are pure CPU work bounded by the request's size (the expansion budget of
`prompting.schema`); a body larger than `INLINE_BODY_BYTES`, or of unknown length, is normalised and rendered
in the gateway's one admission thread instead of on the event loop, which then only waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from functools import partial
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from starlette.types import Send

from ..api.models import ChatCompletionRequest
from ..api.params import (
    check_supported,
    check_token_budget,
    check_top_logprobs,
    choice_parameters,
    prompt_token_limit,
    tgi_parameters,
)
from ..errors import (
    GatewayError,
    ModelNotFoundError,
    TGIProtocolError,
    TGIUnavailableError,
    TGIValidationError,
    UpstreamError,
)
from ..grammar import constrain
from ..prompting import ChatPrompt, Template, normalize
from ..prompting.lru import LRUCache
from ..settings import Settings
from ..streaming import SSE_DONE, Answer, ResponseContext, ScoredAnswer, chat_completion, encode_sse
from ..tgi.client import Generation, StreamEnd, TGIClient, TGIInfo, Token, TokenStream
from ..tgi.replicas import affinity_key
from .asgi import EventStreamResponse, json_response, until_disconnect
from .telemetry import RequestRecord, error_kind, record_of

logger = logging.getLogger("tgi_gateway")

T = TypeVar("T")
Batch = list[Token | StreamEnd]

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

# A body up to this size is normalised and rendered on the event loop: its work is bounded by its size (the
# expansion budget), a few ms at most (docs/performance.md, "Admission"); a larger one, or one sent without a
# Content-Length, in the admission thread.
INLINE_BODY_BYTES = 32 * 1024


def _chat_failure(exc: GatewayError) -> bytes:
    """A chat stream broken after its first chunk: one `data: {"error": {...}}` event (the SDK raises it)."""
    return encode_sse(exc.to_dict())


class Gateway:
    """The request handling: one per app, created in its lifespan."""

    def __init__(self, settings: Settings, template: Template, client: TGIClient) -> None:
        self.settings = settings
        self.template = template
        self.client = client
        self.created = int(time.time())
        self._info: TGIInfo | None = None
        self._warned: LRUCache[str, bool] = LRUCache(256)  # the grammar warnings logged
        # One thread: the loop shares the GIL with at most one other busy thread, so it waits at most one
        # switch interval (5 ms) each time it needs the GIL; large requests queue there, in order.
        self._admission = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tgi-gateway-admission")

    def close(self) -> None:
        """At the app's shutdown: the admission thread ends once its current work is done (nothing queued
        behind it runs: every request still waiting is being cut by the shutdown)."""
        self._admission.shutdown(wait=False, cancel_futures=True)

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

    def check_model(self, model: str) -> None:
        """Raise the OpenAI 404 ``model_not_found`` unless ``model`` is the served model's name or one of
        its LoRA adapters' (TGI would silently answer an unknown adapter with the base model)."""
        if model not in self.settings.model_names:
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")

    def adapter_id(self, model: str) -> str | None:
        """TGI's ``adapter_id`` for the (checked) model name: None for the base model."""
        return None if model == self.settings.model_name else model

    async def chat(self, request: Request, req: ChatCompletionRequest) -> Response:
        rec = record_of(request.scope) or RequestRecord("", time.perf_counter())  # telemetry (or detached)
        rec.model, rec.stream = req.model, bool(req.stream)
        self.check_model(req.model)
        check_supported(req)
        prompt, inputs, grammar = await until_disconnect(request, self._admit(request, req))
        ctx = ResponseContext.for_prompt(
            prompt,
            req.model,  # the base model's name or an adapter's (checked above)
            parallel_tool_calls=req.parallel_tool_calls is not False,
            include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
            logprobs=bool(req.logprobs),
        )
        if req.n is not None and req.n > 1:
            return await self._choices(request, req, rec, prompt, inputs, grammar, ctx)
        answer = self._answer(req, prompt, ctx)
        logprobs, affinity = bool(req.logprobs), self.affinity(req)

        if req.stream:
            open_stream = partial(self._open_stream, inputs, logprobs=logprobs, affinity=affinity)
            stack, tokens, first = await self._upstream(request, req, rec, open_stream, grammar)
            body = partial(
                self._stream, tokens=tokens, batch=first, answer=answer, rec=rec, end=partial(_chat_end, answer, ctx)
            )
            return EventStreamResponse(
                body, on_close=partial(_close_upstream, stack, tokens), headers=SSE_HEADERS
            )

        generation = await self._upstream(
            request,
            req,
            rec,
            partial(self.client.generate, inputs, logprobs=logprobs, affinity=affinity),
            grammar,
        )
        rec.first_token_at = time.perf_counter()  # telemetry: the whole answer arrived at once
        rec.prompt_tokens, rec.completion_tokens = generation.input_length, generation.generated_tokens
        message = _message(answer, generation)
        return json_response(
            chat_completion(ctx, message, generation.input_length or 0, generation.generated_tokens)
        )

    def affinity(self, req: ChatCompletionRequest) -> int | None:
        """The request's prefix key for the replica balancer (its tools and leading system messages), when
        there are several replicas and affinity is on (docs/architecture.md, "Several replicas")."""
        if not self.settings.affinity or not self.client.balanced:
            return None
        return affinity_key(req.messages, req.tools, req.functions)

    async def _open_stream(
        self, inputs: str, parameters: dict[str, Any], *, logprobs: bool, affinity: int | None = None
    ) -> tuple[AsyncExitStack, TokenStream, Batch]:
        """A TGI stream, its first batch read: TGI's request errors arrive there and are still HTTP errors."""
        async with AsyncExitStack() as stack:  # closes the TGI response unless it is returned
            tokens = await stack.enter_async_context(
                self.client.generate_stream(inputs, parameters, logprobs=logprobs, affinity=affinity)
            )
            first = await tokens.batch()
            return stack.pop_all(), tokens, first

    def _answer(self, req: ChatCompletionRequest, prompt: ChatPrompt, ctx: ResponseContext) -> Answer:
        """One choice's pipeline; with `logprobs`, a tracking parser and the tokens' scores."""
        if req.logprobs:
            parser = self.template.parser(prompt, tracked=True)
            return ScoredAnswer(
                parser, ctx, req.stop_list, stream=bool(req.stream), top_n=req.top_logprobs or 0
            )
        return Answer(self.template.parser(prompt), ctx, req.stop_list, stream=bool(req.stream))

    def top_logprobs_limit(self, info: TGIInfo) -> int:
        """TGI's `--max-top-n-tokens`: from its /info when it says (TGI 3.x does not), else the setting."""
        return self.settings.max_top_n_tokens if info.max_top_n_tokens is None else info.max_top_n_tokens

    async def _choices(
        self,
        request: Request,
        req: ChatCompletionRequest,
        rec: RequestRecord,
        prompt: ChatPrompt,
        inputs: str,
        grammar: dict[str, Any] | None,
        ctx: ResponseContext,
    ) -> Response:
        """`n` > 1: one TGI request per choice (`choice_parameters`: seed + k), each its own Answer, all
        sent at once; any error before every choice has its first event is the HTTP error (the others are
        closed). Non-stream: the choices in order, usage counting the prompt once. Stream: the choices'
        chunks interleaved as their tokens arrive (`_stream_choices`)."""
        n, logprobs, affinity = req.n or 1, bool(req.logprobs), self.affinity(req)
        answers = [self._answer(req, prompt, ctx.for_choice(k)) for k in range(n)]

        if req.stream:

            async def open_all(parameters: dict[str, Any]) -> list[tuple[AsyncExitStack, TokenStream, Batch]]:
                return await _all(
                    [
                        partial(
                            self._open_stream,
                            inputs,
                            choice_parameters(parameters, k),
                            logprobs=logprobs,
                            affinity=affinity,
                        )
                        for k in range(n)
                    ],
                    close=lambda opened: opened[0].aclose(),
                )

            opened = await self._upstream(request, req, rec, open_all, grammar)
            body = partial(
                self._stream_choices,
                tokens=[o[1] for o in opened],
                batches=[o[2] for o in opened],
                answers=answers,
                ctx=ctx,
                rec=rec,
            )
            return EventStreamResponse(
                body, on_close=partial(_close_all, [(o[0], o[1]) for o in opened]), headers=SSE_HEADERS
            )

        async def generate_all(parameters: dict[str, Any]) -> list[Generation]:
            calls = [
                partial(
                    self.client.generate,
                    inputs,
                    choice_parameters(parameters, k),
                    logprobs=logprobs,
                    affinity=affinity,
                )
                for k in range(n)
            ]
            return await _all(calls, close=None)

        generations = await self._upstream(request, req, rec, generate_all, grammar)
        rec.first_token_at = time.perf_counter()  # telemetry
        prompt_tokens = generations[0].input_length
        completion_tokens = sum(g.generated_tokens for g in generations)
        rec.prompt_tokens, rec.completion_tokens = prompt_tokens, completion_tokens
        choices = [_message(answer, g) for answer, g in zip(answers, generations)]
        return json_response(chat_completion(ctx, choices, prompt_tokens or 0, completion_tokens))

    def inline(self, request: Request) -> bool:
        """Whether the request's body is small enough to be admitted on the event loop (INLINE_BODY_BYTES)."""
        length = request.headers.get("content-length", "")
        return length.isdigit() and int(length) <= INLINE_BODY_BYTES

    async def run_admission(self, inline: bool, work: Callable[[], T]) -> T:
        """`work()`: on the event loop when `inline`, else in the admission thread (the loop only waits)."""
        if inline:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._admission, work)

    async def _admit(
        self, request: Request, req: ChatCompletionRequest, inline: bool | None = None
    ) -> tuple[ChatPrompt, str, dict[str, Any] | None]:
        """The request's prompt, its text and TGI's grammar: normalised, constrained (`grammar.constrain`),
        TGI's limits read, rendered within them. On the event loop for a body up to INLINE_BODY_BYTES, in
        the admission thread otherwise (`inline` decides instead when given: the Responses API's conversation
        may be longer than its body)."""
        if inline is None:
            inline = self.inline(request)
        run = partial(self.run_admission, inline)

        body = {
            "messages": req.messages,
            "tools": req.tools,
            "tool_choice": req.tool_choice,
            "functions": req.functions,
            "function_call": req.function_call,
        }
        prompt = await run(partial(normalize, body))
        constraint = await run(
            partial(
                constrain,
                prompt,
                self.template.version,
                req.response_format.model_dump() if req.response_format is not None else None,
                parallel_tool_calls=req.parallel_tool_calls is not False,
                enabled=self.settings.grammar,
            )
        )
        if constraint.warning and self._warned.get(constraint.warning) is None:
            self._warned.put(constraint.warning, True)  # once per distinct reason, not per request
            logger.warning("%s (logged once)", constraint.warning)
        info = await self.info()  # before rendering: a prompt that cannot fit is not rendered in full
        check_token_budget(req, info.max_total_tokens)
        check_top_logprobs(req, self.top_logprobs_limit(info))
        limit = prompt_token_limit(req, info.max_input_tokens, info.max_total_tokens)
        return prompt, await run(partial(self.template.render, prompt, max_tokens=limit)), constraint.grammar

    async def _upstream(
        self,
        request: Request,
        req: ChatCompletionRequest,
        rec: RequestRecord,
        call_tgi: Callable[[dict[str, Any]], Awaitable[T]],
        grammar: dict[str, Any] | None = None,
    ) -> T:
        """``call_tgi(parameters)`` with TGI's limits applied, raced against the client's disconnect
        (→ ClientDisconnected, and ``call_tgi`` is cancelled: its TGI request closed).

        TGI may queue the request a long time: a client that leaves meanwhile cancels it. If TGI refuses
        the request (a validation error, before generating anything) after it was restarted with other
        limits (fewer stop sequences, a shorter context), the request is sent once more with its new limits.
        """

        async def once() -> T:
            waiting = time.perf_counter()
            try:
                info = await self.info()
                check_token_budget(req, info.max_total_tokens)
                return await call_tgi(
                    tgi_parameters(
                        req,
                        self.template.stop_sequences,
                        info.max_stop_sequences,
                        adapter_id=self.adapter_id(req.model),
                        grammar=grammar,
                    )
                )
            finally:
                rec.upstream_wait += time.perf_counter() - waiting  # telemetry

        for attempt in (1, 2):
            try:
                return await until_disconnect(request, once())
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
        rec: RequestRecord,
        end: Callable[[StreamEnd], Awaitable[bytes]],
        fail: Callable[[GatewayError], bytes] = _chat_failure,
        encode: Callable[[dict[str, Any]], bytes] = encode_sse,
        head: bytes = b"",
    ) -> None:
        """The SSE body: every batch of tokens TGI sent meanwhile becomes one write; the last write also
        ends the response (TGI's response is then read to its end by `_close_upstream`).

        The API's own parts: `answer` maps the events (chunks, or the Responses API's events), `encode`
        frames one, `head` is sent first (the Responses API's `response.created`), `end(TGI's final event)`
        is the rest of the answer, encoded (it calls `answer.finish`), `fail(error)` the event that ends a
        stream TGI broke."""
        scored = answer if isinstance(answer, ScoredAnswer) else None
        try:
            while True:
                out: list[dict[str, Any]] = []
                for item in batch:
                    if isinstance(item, StreamEnd):
                        rec.prompt_tokens, rec.completion_tokens = item.input_length, item.generated_tokens
                        tail = await end(item)
                        if rec.first_token_at is None:  # the whole answer was held back until the end
                            rec.first_token_at = time.perf_counter()
                        await send(_last_body(head + b"".join(map(encode, out)) + tail))
                        return
                    if scored is not None:
                        scored.score(item.text, item.logprob, item.top)
                    out += answer.feed(item.text, item.special)
                if out:
                    if rec.first_token_at is None:
                        rec.first_token_at = time.perf_counter()
                    chunk = b"".join(map(encode, out))
                    if head:
                        chunk, head = head + chunk, b""
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                elif head:
                    await send({"type": "http.response.body", "body": head, "more_body": True})
                    head = b""
                batch = await _next(tokens, rec)
        except GatewayError as exc:
            rec.upstream_error = error_kind(exc)
            logger.warning("TGI failed mid-stream: %s", exc.message)
            await send(_last_body(head + fail(exc)))
        except Exception:
            logger.exception("unexpected error mid-stream")
            await send(_last_body(head + fail(GatewayError("The gateway failed unexpectedly; see its log."))))

    async def _stream_choices(
        self,
        send: Send,
        tokens: list[TokenStream],
        batches: list[Batch],
        answers: list[Answer],
        ctx: ResponseContext,
        rec: RequestRecord,
    ) -> None:
        """The SSE body of `n` > 1 choices: whatever arrived from any of the TGI streams is fed to its
        choice's Answer and written at once; each choice gets its role chunk and finish chunk, then the usage
        chunk (the prompt once, the completion tokens summed) and `[DONE]` end the response when all are
        done. An error of any stream is the SSE error event that ends the response (`_close_all` then
        closes every TGI request, as a disconnect does)."""
        reads: dict[asyncio.Future[Batch], int] = {}
        ready = list(enumerate(batches))
        live = len(answers)
        prompt_tokens, completion_tokens = 0, 0
        try:
            while True:
                out: list[dict[str, Any]] = []
                for k, batch in ready:
                    answer = answers[k]
                    for item in batch:
                        if isinstance(item, StreamEnd):
                            prompt_tokens = item.input_length or prompt_tokens
                            completion_tokens += item.generated_tokens
                            out += answer.finish(item.finish_reason)
                            live -= 1
                            break
                        if isinstance(answer, ScoredAnswer):
                            answer.score(item.text, item.logprob, item.top)
                        out += answer.feed(item.text, item.special)
                    else:
                        reads[asyncio.ensure_future(_next(tokens[k], rec))] = k
                if live == 0:
                    rec.prompt_tokens, rec.completion_tokens = prompt_tokens, completion_tokens
                    if rec.first_token_at is None:
                        rec.first_token_at = time.perf_counter()
                    if ctx.include_usage:
                        out.append(answers[0].usage_chunk(prompt_tokens, completion_tokens))
                    await send(_last_body(b"".join(map(encode_sse, out)) + SSE_DONE))
                    return
                if out:
                    if rec.first_token_at is None:
                        rec.first_token_at = time.perf_counter()
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"".join(map(encode_sse, out)),
                            "more_body": True,
                        }
                    )
                done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
                ready = sorted((reads.pop(read), read.result()) for read in done)
        except GatewayError as exc:
            rec.upstream_error = error_kind(exc)
            logger.warning("TGI failed mid-stream: %s", exc.message)
            await send(_last_body(encode_sse(exc.to_dict())))
        except Exception:
            logger.exception("unexpected error mid-stream")
            failure = GatewayError("The gateway failed unexpectedly; see its log.")
            await send(_last_body(encode_sse(failure.to_dict())))
        finally:
            for read in reads:
                if read.done():
                    _ = read.cancelled() or read.exception()  # retrieved: never "never retrieved"
                else:
                    read.cancel()


def _message(answer: Answer, generation: Generation) -> dict[str, Any]:
    """A non-stream choice: TGI's whole answer through the choice's pipeline."""
    feed_whole(answer, generation)
    return answer.message(generation.finish_reason)


def feed_whole(answer: Answer, generation: Generation) -> None:
    """TGI's whole non-stream answer through `answer`'s pipeline, finished."""
    if isinstance(answer, ScoredAnswer):
        for token in generation.tokens:
            answer.score(token.text, token.logprob, token.top)
    for text, special in _pieces(generation.tokens):
        answer.feed(text, special)
    answer.finish(generation.finish_reason)


async def _chat_end(answer: Answer, ctx: ResponseContext, end: StreamEnd) -> bytes:
    """The end of a chat stream: the finish chunk, the usage chunk when asked, `[DONE]`."""
    out = answer.finish(end.finish_reason)
    if ctx.include_usage:
        out.append(answer.usage_chunk(end.input_length or 0, end.generated_tokens))
    return b"".join(map(encode_sse, out)) + SSE_DONE


async def _all(
    calls: list[Callable[[], Awaitable[T]]], close: Callable[[T], Awaitable[Any]] | None
) -> list[T]:
    """Run `calls` at once; all their results, in order. The first failure (or a cancellation) cancels the
    others and gives back (`close`) what those that succeeded opened, then is raised as it is."""
    tasks = [asyncio.ensure_future(call()) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()  # a call cancelled while it opens closes what it opened itself
        try:
            await asyncio.wait(tasks)
        finally:  # even when cancelled again meanwhile (the client left)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is None and close is not None:
                    await close(task.result())
        raise


async def _close_all(opened: list[tuple[AsyncExitStack, TokenStream]]) -> None:
    """After an `n` > 1 response: each TGI stream as `_close_upstream` does; every one is closed even when
    one fails."""
    errors = []
    for stack, tokens in opened:
        try:
            await _close_upstream(stack, tokens)
        except Exception as exc:  # noqa: BLE001 - the others are closed first
            errors.append(exc)
    if errors:
        raise errors[0]


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
