"""Parser events → OpenAI Chat Completions: the non-stream message and the stream chunks.

Theory of operation
-------------------
A template parser turns the model's text into :data:`~tgi_gateway.prompting.types.Event`s. This module is
the second, pure step: it maps those events to the Chat Completions contract as the official SDK consumes
it (``shared/reference/openai/CHAT_COMPLETIONS.md`` §2.1). It does no I/O and never looks at the text.

* :func:`collect` folds a whole event list into ``choices[0]`` of a ``chat.completion`` (non-stream);
  :func:`chat_completion` wraps it into the full response with ``usage``.
* :class:`ChunkBuilder` maps events to ``chat.completion.chunk`` dicts as they arrive (stream);
  :func:`encode_sse` turns a chunk (or any dict, e.g. an error envelope) into one SSE event.

Both apply the same rules, so ``.stream()`` in the SDK rebuilds exactly the message :func:`collect` returns
(``tests/streaming/test_streaming.py`` checks this for every case):

* every chunk has the stream's ``id``, ``object: "chat.completion.chunk"``, ``created`` and ``model``;
* ``role`` is sent once, in the first chunk: ``{"role":"assistant","content":""}`` on its own when the answer
  starts with text (or is empty), merged into the first call's header (``content: null``) when it starts with
  a call — so a calls-only answer rebuilds ``content: null`` and an empty one ``content: ""``;
* a call is a header delta
  ``{"index":k,"id":"call_…","type":"function","function":{"name":…,"arguments":""}}``
  then ``{"index":k,"function":{"arguments":fragment}}`` deltas; one entry per chunk, indices dense from 0;
* legacy ``functions`` requests get ``delta.function_call`` (``{"name","arguments":""}`` then
  ``{"arguments":fragment}``) for the first call only; ``parallel_tool_calls: false`` keeps the first call
  only too; dropped calls are counted in :attr:`ChunkBuilder.dropped_calls`;
* consecutive events of one kind from one ``feed`` are merged into one chunk; empty fragments are not sent;
* the last chunk is ``delta: {}`` with the finish reason (:func:`finish_reason`);
* with ``logprobs`` (:class:`ScoredAnswer`), a :class:`~tgi_gateway.logprobs.Logprobs` event after a text
  puts its entries in that text's chunk (``logprobs: {"content": [...], "refusal": null}``) and in the
  message's list; which tokens are listed: :mod:`tgi_gateway.logprobs`;
* each chunk and choice carries the choice's ``index`` (``ResponseContext.index``: ``n`` > 1 builds one
  answer per choice).

Worked example (``parallel_tool_calls`` true, ``tool_choice: "auto"``)::

    feed([TextDelta("Hi")])          → {"role":"assistant","content":""}, {"content":"Hi"}
    feed([ToolCallStart(0, "f"),
          ToolCallArgs(0, '{"a"'),
          ToolCallArgs(0, ": 1}")])  → {"tool_calls":[{"index":0,"id":"call_…","type":"function",
                                                      "function":{"name":"f","arguments":""}}]},
                                       {"tool_calls":[{"index":0,"function":{"arguments":"{\\"a\\": 1}"}}]}
    feed([ToolCallEnd(0)])           → (nothing)
    finish("eos_token")              → {} with finish_reason "tool_calls"

Chunks are plain dicts, built fresh for each call (callers may keep or mutate them). JSON is encoded with
orjson, with the standard library as the fallback for strings orjson refuses (:func:`encode_sse`); the cost
per token of each stage is in ``docs/performance.md`` (``benchmarks/bench_stream.py``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson

from tgi_gateway.logprobs import ContentTokens, Logprobs, Top
from tgi_gateway.prompting.types import ChatPrompt, Event, NamedChoice, TextDelta, ToolCallArgs, ToolCallStart
from tgi_gateway.stop_sequences import StopFilter

__all__ = [
    "SSE_DONE",
    "Answer",
    "ChunkBuilder",
    "EventSink",
    "ResponseContext",
    "chat_completion",
    "collect",
    "encode_sse",
    "finish_reason",
    "new_call_id",
    "new_completion_id",
    "new_id",
    "usage",
]

# --------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# Random bytes 0..247 map to _ALPHABET[b % 62]: 248 = 4 * 62, so every character has exactly four
# preimages (uniform). Bytes 248..255 are deleted (rejection sampling), hence the spare bytes drawn below.
_TO_ALNUM = bytes(_ALPHABET[b % 62] for b in range(248)) + bytes(8)
_REJECTED = bytes(range(248, 256))


def _random_alnum(n: int) -> str:
    """`n` characters from [A-Za-z0-9], uniform, from the OS CSPRNG (fork-safe)."""
    while True:
        # n + n//4 + 4 bytes: fewer than n survive with probability ~4e-9 for n = 24 (then draw again).
        s = os.urandom(n + n // 4 + 4).translate(_TO_ALNUM, _REJECTED)
        if len(s) >= n:
            return s[:n].decode("ascii")


def new_id(prefix: str, n: int) -> str:
    """`prefix` + `n` characters of [A-Za-z0-9] (the Responses API's ``resp_``, ``msg_``, ``fc_`` ids)."""
    return prefix + _random_alnum(n)


def new_call_id() -> str:
    """A tool call id as OpenAI and functionary make them: ``"call_"`` + 24 characters of [A-Za-z0-9]."""
    return "call_" + _random_alnum(24)


def new_completion_id() -> str:
    """A completion id: ``"chatcmpl-"`` + 29 characters of [A-Za-z0-9] (OpenAI's length)."""
    return "chatcmpl-" + _random_alnum(29)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseContext:
    """What the mapping needs to know about the request; one per response.

    `named_choice`: the request forced one function (`tool_choice: {"type":"function",...}` or
    `function_call: {"name": ...}`); such answers finish with `"stop"`, as OpenAI's do.
    `include_usage`: `stream_options.include_usage`; every chunk then carries `"usage": null` and the
    caller ends the stream with :meth:`ChunkBuilder.usage_chunk` (as OpenAI documents it).
    `call_ids` makes tool call ids; tests inject a deterministic one.
    `index` is the choice's index (`n` > 1: one context per choice, :meth:`for_choice`); `logprobs`: the
    client asked for them (the message then has ``logprobs: {"content": [...], "refusal": null}``).
    """

    id: str
    created: int
    model: str
    legacy_functions: bool = False
    named_choice: bool = False
    parallel_tool_calls: bool = True
    include_usage: bool = False
    call_ids: Callable[[], str] = new_call_id
    index: int = 0
    logprobs: bool = False

    @classmethod
    def for_prompt(
        cls,
        prompt: ChatPrompt,
        model: str,
        *,
        parallel_tool_calls: bool = True,
        include_usage: bool = False,
        logprobs: bool = False,
    ) -> ResponseContext:
        """A context with a fresh completion id and the current time, the choice read from `prompt`."""
        return cls(
            id=new_completion_id(),
            created=int(time.time()),
            model=model,
            legacy_functions=prompt.legacy_functions,
            named_choice=isinstance(prompt.choice, NamedChoice),
            parallel_tool_calls=parallel_tool_calls,
            include_usage=include_usage,
            logprobs=logprobs,
        )

    def for_choice(self, index: int) -> ResponseContext:
        """The same response's context for choice `index` (same id, created, model and options)."""
        return replace(self, index=index)

    @property
    def keep_first_call_only(self) -> bool:
        """Legacy `functions` carry one `function_call`; `parallel_tool_calls: false` allows one call."""
        return self.legacy_functions or not self.parallel_tool_calls


def finish_reason(tgi_finish_reason: str | None, has_call: bool, ctx: ResponseContext) -> str:
    """OpenAI's finish reason from TGI's (`length` | `eos_token` | `stop_sequence`).

    `length` wins even inside a call (a cut call is not a finished call). Otherwise a call made under
    `auto`/`required` gives `function_call` (legacy `functions`) or `tool_calls`; a named choice, like
    no call at all, gives `stop` — OpenAI answers a forced `function_call: {"name"}` with `stop` too.
    Any other TGI value (`None` when the upstream gave none) counts as a normal end.
    """
    if tgi_finish_reason == "length":
        return "length"
    if has_call and not ctx.named_choice:
        return "function_call" if ctx.legacy_functions else "tool_calls"
    return "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# --------------------------------------------------------------------------------------------
# Non-stream
# --------------------------------------------------------------------------------------------


def collect(events: Iterable[Event], tgi_finish_reason: str | None, ctx: ResponseContext) -> dict[str, Any]:
    """`choices[0]` of a `chat.completion` for the whole answer's events.

    `content` is the concatenated text; `null` when there are only calls and `""` when there is nothing.
    `tool_calls` is present only when there are calls (legacy: `function_call` instead, first call only).
    """
    keep_first = ctx.keep_first_call_only
    text: list[str] = []
    calls: list[tuple[str, list[str]]] = []  # (name, argument fragments) per kept call
    kept: dict[int, list[str]] = {}  # parser index → fragments of a kept call
    entries: list[dict[str, Any]] = []
    for ev in events:
        t = type(ev)
        if t is TextDelta:
            text.append(ev.text)  # type: ignore[union-attr]
        elif t is Logprobs:
            entries += ev.entries  # type: ignore[union-attr]
        elif t is ToolCallArgs:
            parts = kept.get(ev.index)
            if parts is not None:
                parts.append(ev.text)  # type: ignore[union-attr]
        elif t is ToolCallStart:
            if keep_first and calls:
                continue
            parts = []
            kept[ev.index] = parts
            calls.append((ev.name, parts))  # type: ignore[union-attr]
    content = "".join(text)
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        if ctx.legacy_functions:
            name, parts = calls[0]
            message["function_call"] = {"name": name, "arguments": "".join(parts)}
        else:
            message["tool_calls"] = [
                {
                    "id": ctx.call_ids(),
                    "type": "function",
                    "function": {"name": name, "arguments": "".join(parts)},
                }
                for name, parts in calls
            ]
    return {
        "index": ctx.index,
        "message": message,
        "logprobs": {"content": entries, "refusal": None} if ctx.logprobs else None,
        "finish_reason": finish_reason(tgi_finish_reason, bool(calls), ctx),
    }


def chat_completion(
    ctx: ResponseContext,
    choice: dict[str, Any] | list[dict[str, Any]],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """The full non-stream `chat.completion` body around `choice` (from :func:`collect`; a list for
    `n` > 1: usage counts the prompt once and the completion tokens of every choice)."""
    return {
        "id": ctx.id,
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": choice if isinstance(choice, list) else [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


# --------------------------------------------------------------------------------------------
# Stream
# --------------------------------------------------------------------------------------------

_TEXT = -1  # run kind in ChunkBuilder.feed: text; a kind >= 0 is the arguments of output call k


class ChunkBuilder:
    """Maps one answer's events to `chat.completion.chunk` dicts, as they arrive.

    `feed(events)` returns the chunks those events make (often none or one); `finish(tgi_finish_reason)`
    returns the last one(s). After :meth:`finish` the builder refuses more input.
    """

    __slots__ = (
        "_base",
        "_ctx",
        "_finished",
        "_index",
        "_keep_first",
        "_legacy",
        "_n_calls",
        "_out_index",
        "_scored",
        "_started",
        "_usage_null",
        "dropped_calls",
    )

    def __init__(self, ctx: ResponseContext) -> None:
        self._ctx = ctx
        # The constant part of every chunk, copied per chunk (cheaper than a literal of the whole chunk).
        self._base: dict[str, Any] = {
            "id": ctx.id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model,
        }
        self._usage_null = ctx.include_usage
        self._index = ctx.index
        self._legacy = ctx.legacy_functions
        self._keep_first = ctx.keep_first_call_only
        self._out_index: dict[int, int] = {}  # parser call index → output index, kept calls only
        self._n_calls = 0
        self._started = False  # the role has been sent
        self._finished = False
        self._scored = False  # a chunk carried logprobs entries
        #: Calls dropped by the keep-first rule. Once it is non-zero the first call is complete, and a
        #: server may stop the generation (functionary does, at the second call's header).
        self.dropped_calls = 0

    @property
    def has_call(self) -> bool:
        return self._n_calls > 0

    def _chunk(self, delta: dict[str, Any]) -> dict[str, Any]:
        c = self._base.copy()
        c["choices"] = [{"index": self._index, "delta": delta, "logprobs": None, "finish_reason": None}]
        if self._usage_null:
            c["usage"] = None
        return c

    def _flush(
        self,
        out: list[dict[str, Any]],
        kind: int,
        parts: list[str],
        entries: list[dict[str, Any]] | None = None,
    ) -> None:
        text = parts[0] if len(parts) == 1 else "".join(parts)
        if kind == _TEXT:
            if not self._started:
                self._started = True
                out.append(self._chunk({"role": "assistant", "content": ""}))
            chunk = self._chunk({"content": text})
            if entries:
                chunk["choices"][0]["logprobs"] = {"content": entries, "refusal": None}
                self._scored = True
            out.append(chunk)
        elif self._legacy:
            out.append(self._chunk({"function_call": {"arguments": text}}))
        else:
            out.append(self._chunk({"tool_calls": [{"index": kind, "function": {"arguments": text}}]}))

    def _header(self, ev: ToolCallStart) -> dict[str, Any] | None:
        if self._keep_first and self._n_calls:
            self.dropped_calls += 1
            return None
        k = self._n_calls
        self._n_calls = k + 1
        self._out_index[ev.index] = k
        if self._legacy:
            delta: dict[str, Any] = {"function_call": {"name": ev.name, "arguments": ""}}
        else:
            header = {
                "index": k,
                "id": self._ctx.call_ids(),
                "type": "function",
                "function": {"name": ev.name, "arguments": ""},
            }
            delta = {"tool_calls": [header]}
        if not self._started:
            self._started = True
            delta = {"role": "assistant", "content": None, **delta}
        return self._chunk(delta)

    def feed(self, events: Sequence[Event]) -> list[dict[str, Any]]:
        """The chunks for `events` (in order; consecutive text or arguments of one call merged)."""
        if self._finished:
            raise RuntimeError("ChunkBuilder.feed() after finish()")
        if len(events) == 1 and self._started:
            # The per-token case, a text or an arguments fragment, inlined: the same chunk `_feed` makes.
            ev = events[0]
            t = type(ev)
            if t is TextDelta:
                if not ev.text:  # type: ignore[union-attr]
                    return []
                delta: dict[str, Any] = {"content": ev.text}  # type: ignore[union-attr]
            elif t is ToolCallArgs:
                k = self._out_index.get(ev.index)
                if k is None or not ev.text:  # type: ignore[union-attr]
                    return []
                if self._legacy:
                    delta = {"function_call": {"arguments": ev.text}}  # type: ignore[union-attr]
                else:
                    delta = {"tool_calls": [{"index": k, "function": {"arguments": ev.text}}]}  # type: ignore[union-attr]
            else:
                return self._feed(events)
            c = self._base.copy()
            c["choices"] = [{"index": self._index, "delta": delta, "logprobs": None, "finish_reason": None}]
            if self._usage_null:
                c["usage"] = None
            return [c]
        return self._feed(events)

    def _feed(self, events: Sequence[Event]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        kind = _TEXT  # kind of the pending run in `parts`
        parts: list[str] = []
        entries: list[dict[str, Any]] | None = None  # logprobs of the pending text run (after its text)
        for ev in events:
            t = type(ev)
            if t is TextDelta:
                if ev.text:  # type: ignore[union-attr]
                    if kind != _TEXT and parts:
                        self._flush(out, kind, parts)
                        parts = []
                    kind = _TEXT
                    parts.append(ev.text)  # type: ignore[union-attr]
            elif t is ToolCallArgs:
                k = self._out_index.get(ev.index)
                if k is not None and ev.text:  # type: ignore[union-attr]
                    if kind != k and parts:
                        self._flush(out, kind, parts, entries)
                        parts, entries = [], None
                    kind = k
                    parts.append(ev.text)  # type: ignore[union-attr]
            elif t is ToolCallStart:
                if parts:
                    self._flush(out, kind, parts, entries)
                    parts, entries = [], None
                chunk = self._header(ev)  # type: ignore[arg-type]
                if chunk is not None:
                    out.append(chunk)
            elif t is Logprobs:
                entries = ev.entries if entries is None else entries + ev.entries  # type: ignore[union-attr]
            # ToolCallEnd: nothing to send; the next header or the finish chunk shows the call is over.
        if parts:
            self._flush(out, kind, parts, entries)
        return out

    def finish(self, tgi_finish_reason: str | None) -> list[dict[str, Any]]:
        """The last chunk (`delta: {}` + finish reason), preceded by the role chunk if nothing was sent."""
        if self._finished:
            raise RuntimeError("ChunkBuilder.finish() called twice")
        self._finished = True
        out: list[dict[str, Any]] = []
        if not self._started:
            self._started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        last = self._chunk({})
        last["choices"][0]["finish_reason"] = finish_reason(tgi_finish_reason, self._n_calls > 0, self._ctx)
        if self._ctx.logprobs and not self._scored:  # no token listed: as the message, an empty list
            last["choices"][0]["logprobs"] = {"content": [], "refusal": None}
        out.append(last)
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The `stream_options.include_usage` chunk: `choices: []`; send it after :meth:`finish`, last."""
        c = self._base.copy()
        c["choices"] = []
        c["usage"] = usage(prompt_tokens, completion_tokens)
        return c


# --------------------------------------------------------------------------------------------
# SSE
# --------------------------------------------------------------------------------------------

SSE_DONE = b"data: [DONE]\n\n"


def encode_sse(obj: dict[str, Any]) -> bytes:
    """One SSE event, ``data: <compact JSON>\\n\\n``; non-ASCII is sent as UTF-8."""
    try:
        body = orjson.dumps(obj)
    except orjson.JSONEncodeError:
        # orjson refuses strings that are not valid UTF-8 (lone surrogates); the standard library
        # escapes them, so a malformed string never breaks a stream.
        body = json.dumps(obj, separators=(",", ":")).encode("ascii")
    return b"data: " + body + b"\n\n"


# --------------------------------------------------------------------------------------------
# One answer: tokens → stop filter → template parser → chunks / message
# --------------------------------------------------------------------------------------------


class EventSink(Protocol):
    """What :class:`Answer` feeds the parser's events to: :class:`ChunkBuilder` for Chat Completions streams;
    another API's mapping (``tgi_gateway.responses.output.OutputBuilder``) for both of its paths."""

    def feed(self, events: Sequence[Event]) -> list[dict[str, Any]]: ...

    def finish(self, tgi_finish_reason: str | None) -> list[dict[str, Any]]: ...


class Answer:
    """The whole per-answer pipeline, fed TGI's tokens: the client's stop sequences, the template's
    parser, then chunks (``stream=True``) or the collected events (non-stream). Both paths are this class,
    so they cannot disagree.

    Stream: `feed(text, special)` returns the chunks for one token, `finish(tgi_finish_reason)` the last
    ones. Non-stream: both return nothing and :meth:`message` folds the events. A client stop sequence
    ends the answer with finish reason ``stop`` (the tokens after it are ignored).

    `builder`: another API's sink for the events (:class:`EventSink`), used on both paths in place of the
    chunks or the collected events (the Responses API: ``tgi_gateway.responses.output.OutputBuilder``, which
    returns events only when it emits them, and keeps the output items itself).
    """

    __slots__ = ("_builder", "_ctx", "_events", "_parser", "_stops")

    def __init__(
        self,
        parser: Any,
        ctx: ResponseContext,
        stops: Sequence[str] = (),
        *,
        stream: bool,
        builder: EventSink | None = None,
    ) -> None:
        self._stops = StopFilter(stops)
        self._parser = parser
        self._ctx = ctx
        # Another API's mapping (the Responses API's, stream and non-stream alike) in place of the chunks.
        self._builder = builder if builder is not None else ChunkBuilder(ctx) if stream else None
        self._events: list[Event] = []

    def _out(self, events: list[Event]) -> list[dict[str, Any]]:
        if self._builder is None:
            self._events += events
            return []
        return self._builder.feed(events) if events else []

    def feed(self, text: str, special: bool = False) -> list[dict[str, Any]]:
        events: list[Event] = []
        for piece, sp in self._stops.feed(text, special):
            events += self._parser.feed(piece, sp)
        return self._out(events)

    def finish(self, tgi_finish_reason: str | None) -> list[dict[str, Any]]:
        events: list[Event] = []
        for piece, sp in self._stops.finish():
            events += self._parser.feed(piece, sp)
        out = self._out(events + self._parser.finish())
        if self._builder is None:
            return out
        return out + self._builder.finish(self._reason(tgi_finish_reason))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        assert self._builder is not None, "usage_chunk() is for streams"
        return self._builder.usage_chunk(prompt_tokens, completion_tokens)

    def message(self, tgi_finish_reason: str | None) -> dict[str, Any]:
        """`choices[0]` of the non-stream response (after :meth:`finish`)."""
        return collect(self._events, self._reason(tgi_finish_reason), self._ctx)

    def reason(self, tgi_finish_reason: str | None) -> str | None:
        """TGI's finish reason, or ``stop_sequence`` when a client stop sequence ended the answer."""
        return "stop_sequence" if self._stops.stopped else tgi_finish_reason

    _reason = reason


class ScoredAnswer(Answer):
    """An :class:`Answer` whose content tokens carry their ``logprobs`` (``logprobs: true``): built with a
    tracking parser (``Template.parser(prompt, tracked=True)``), it is told every token with :meth:`score`
    — in order, before or after its text is fed — and lists those whose characters are all content
    (:mod:`tgi_gateway.logprobs`), in the chunk that carries their last character, or in the message.
    """

    __slots__ = ("_tokens",)

    def __init__(
        self, parser: Any, ctx: ResponseContext, stops: Sequence[str] = (), *, stream: bool, top_n: int = 0
    ) -> None:
        super().__init__(parser, ctx, stops, stream=stream)
        self._tokens = ContentTokens(top_n)

    def score(self, text: str, logprob: float | None, top: Top = ()) -> None:
        """The next token of the output: its text, TGI's logprob and TGI's top tokens (text, logprob)."""
        self._tokens.add(text, logprob, top)

    def _out(self, events: list[Event]) -> list[dict[str, Any]]:
        return super()._out(self._tokens.convert(events) if events else events)
