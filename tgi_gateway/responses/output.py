"""Parser events → the Responses API: output items, the streamed events, the Response object (no I/O).

Theory of operation
-------------------
The Responses API answers with a list of *output items* instead of a message: a ``message`` item (one
``output_text`` part) for text, one ``function_call`` item per call. Streams carry the item lifecycle
(``shared/reference/openai/RESPONSES.md`` §4.3): items are sequential — one is closed before the next is
opened —, ``output_index`` is the item's place in the final ``output``, and every event has a
``sequence_number`` counting from 0 across the whole stream.

:class:`OutputBuilder` is fed the parser's events (it is the :class:`~tgi_gateway.streaming.Answer`'s
sink, in place of the chat chunks) and keeps the items it has built; with ``emit`` (streams) it also
returns the events that describe each step. The non-stream path runs the very same builder without
``emit`` and takes :attr:`OutputBuilder.output`, so the two paths give the same items by construction:

* ``TextDelta`` — opens a ``message`` item if none is open (``output_item.added`` with ``content: []``,
  ``content_part.added`` with an empty ``output_text``), then ``output_text.delta``;
* ``ToolCallStart`` — closes the open item, opens a ``function_call`` item (``fc_…`` id, ``call_…``
  ``call_id``, ``arguments: ""``); ``ToolCallArgs`` → ``function_call_arguments.delta``; ``ToolCallEnd`` →
  ``function_call_arguments.done`` (with ``name``) and ``output_item.done``;
* :meth:`OutputBuilder.finish` closes what is open (a message: ``output_text.done``, ``content_part.done``,
  ``output_item.done``); items cut by the token limit end ``incomplete``. An answer with nothing in it is
  one empty message (the chat route's ``content: ""``);
* :meth:`OutputBuilder.terminal` is the last event: ``response.completed``, or ``response.incomplete`` with
  ``incomplete_details.reason = "max_output_tokens"``, carrying the full Response (output and usage);
  :meth:`OutputBuilder.failed` ends a stream that TGI broke (open items closed ``incomplete``, then
  ``response.failed`` with the error).

``parallel_tool_calls: false`` keeps the first call only (its later calls are not items at all).
Consecutive deltas from one ``feed`` are merged into one event; empty ones are not sent.

Worked example (a text, then one call; ``seq`` is the ``sequence_number``)::

    start()                         → created (0), in_progress (1)
    feed([TextDelta("Let me")])     → output_item.added msg (2), content_part.added (3), output_text.delta (4)
    feed([ToolCallStart(0, "f"),
          ToolCallArgs(0, "{}")])   → output_text.done (5), content_part.done (6), output_item.done msg (7),
                                      output_item.added fc (8), function_call_arguments.delta (9)
    feed([ToolCallEnd(0)])          → function_call_arguments.done (10), output_item.done fc (11)
    finish("eos_token")             → (nothing open)
    terminal("eos_token", 12, 9)    → response.completed (12), output [message, function_call]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..prompting.types import Event, TextDelta, ToolCallArgs, ToolCallEnd, ToolCallStart
from ..streaming import new_call_id, new_id

__all__ = ["OutputBuilder", "ResponseShape", "new_item_id", "new_response_id", "response_usage"]


def new_response_id() -> str:
    """``resp_`` + 48 characters, the length of OpenAI's ids (never parsed by the SDKs)."""
    return new_id("resp_", 48)


def new_item_id(prefix: str) -> str:
    """An item id: ``msg_``, ``fc_``, ``fco_`` + 48 characters."""
    return new_id(prefix, 48)


def response_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """The Response's `usage`, with the details objects the SDK models require (zeros: no cache, no
    reasoning)."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


@dataclass(frozen=True, slots=True)
class ResponseShape:
    """One response's constant part: the Response object as ``response.created`` shows it (the echoed
    request fields, ``status: "in_progress"``, ``output: []``), and the options of the mapping.

    `ids(prefix)` makes item ids, `call_ids()` call ids and `clock()` the time of `completed_at`; tests
    inject deterministic ones.
    """

    response: Mapping[str, Any]
    keep_first_call_only: bool = False
    ids: Callable[[str], str] = new_item_id
    call_ids: Callable[[], str] = new_call_id
    clock: Callable[[], float] = time.time

    @property
    def id(self) -> str:
        return self.response["id"]


@dataclass(slots=True)
class _Open:
    """The item being built."""

    index: int  # output_index
    item: dict[str, Any]
    parts: list[str] = field(default_factory=list)  # text or arguments so far
    call: int | None = None  # the parser's call index (function_call items)


class OutputBuilder:
    """Maps one answer's events to Responses output items, and (``emit``) to the stream's events."""

    __slots__ = ("_dropped", "_emit", "_finished", "_open", "_seq", "_shape", "has_call", "output")

    def __init__(self, shape: ResponseShape, *, emit: bool) -> None:
        self._shape = shape
        self._emit = emit
        self._seq = 0
        self._open: _Open | None = None
        self._dropped: set[int] = set()  # calls past the first with parallel_tool_calls false
        self._finished = False
        self.has_call = False
        #: The items built so far, each in its final form once closed.
        self.output: list[dict[str, Any]] = []

    # -- events ---------------------------------------------------------------------------------

    def _event(self, out: list[dict[str, Any]], kind: str, **fields: Any) -> None:
        if self._emit:
            out.append({"type": kind, "sequence_number": self._seq, **fields})
            self._seq += 1

    def _response(self, **changes: Any) -> dict[str, Any]:
        return {**self._shape.response, **changes}

    def start(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress`` (streams only)."""
        out: list[dict[str, Any]] = []
        self._event(out, "response.created", response=self._response())
        self._event(out, "response.in_progress", response=self._response())
        return out

    # -- items ----------------------------------------------------------------------------------

    def _open_message(self, out: list[dict[str, Any]]) -> _Open:
        item = {
            "id": self._shape.ids("msg_"),
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        opened = self._open = _Open(len(self.output), item)
        self.output.append(item)
        if self._emit:
            self._event(out, "response.output_item.added", output_index=opened.index, item=_copy(item))
            self._event(
                out,
                "response.content_part.added",
                item_id=item["id"],
                output_index=opened.index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            )
        return opened

    def _open_call(self, out: list[dict[str, Any]], ev: ToolCallStart) -> None:
        item = {
            "id": self._shape.ids("fc_"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": self._shape.call_ids(),
            "name": ev.name,
            "arguments": "",
        }
        self._open = _Open(len(self.output), item, call=ev.index)
        self.output.append(item)
        self.has_call = True
        self._event(out, "response.output_item.added", output_index=self._open.index, item=dict(item))

    def _close(self, out: list[dict[str, Any]], status: str = "completed") -> None:
        opened, self._open = self._open, None
        if opened is None:
            return
        item, text = opened.item, "".join(opened.parts)
        item["status"] = status
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            if self._emit:
                ids = {"item_id": item["id"], "output_index": opened.index, "content_index": 0}
                self._event(out, "response.output_text.done", **ids, text=text, logprobs=[])
                self._event(out, "response.content_part.done", **ids, part=dict(part))
        else:
            item["arguments"] = text
            self._event(
                out,
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=opened.index,
                name=item["name"],
                arguments=text,
            )
        self._event(out, "response.output_item.done", output_index=opened.index, item=_copy(item))

    def _delta(self, out: list[dict[str, Any]], opened: _Open, parts: list[str]) -> None:
        text = parts[0] if len(parts) == 1 else "".join(parts)
        opened.parts.append(text)
        if not self._emit:
            return
        if opened.call is None:
            self._event(
                out,
                "response.output_text.delta",
                item_id=opened.item["id"],
                output_index=opened.index,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        else:
            self._event(
                out,
                "response.function_call_arguments.delta",
                item_id=opened.item["id"],
                output_index=opened.index,
                delta=text,
            )

    def feed(self, events: Sequence[Event]) -> list[dict[str, Any]]:
        """The stream events for `events` (none without ``emit``); consecutive fragments merged."""
        if self._finished:
            raise RuntimeError("OutputBuilder.feed() after finish()")
        opened = self._open
        if len(events) == 1 and opened is not None and self._emit:
            # The per-token case, a fragment for the open item, inlined: the event `_delta` makes.
            ev = events[0]
            t = type(ev)
            if (t is TextDelta and opened.call is None) or (t is ToolCallArgs and opened.call == ev.index):
                text = ev.text  # type: ignore[union-attr]
                if not text:
                    return []
                opened.parts.append(text)
                seq = self._seq
                self._seq = seq + 1
                if t is TextDelta:
                    return [{"type": "response.output_text.delta", "sequence_number": seq,
                             "item_id": opened.item["id"], "output_index": opened.index, "content_index": 0,
                             "delta": text, "logprobs": []}]  # fmt: skip
                return [{"type": "response.function_call_arguments.delta", "sequence_number": seq,
                         "item_id": opened.item["id"], "output_index": opened.index, "delta": text}]  # fmt: skip
        out: list[dict[str, Any]] = []
        pending: list[str] = []  # fragments for the open item
        for ev in events:
            t = type(ev)
            if t is TextDelta:
                if not ev.text:  # type: ignore[union-attr]
                    continue
                opened = self._open
                if opened is None or opened.call is not None:
                    if pending:
                        self._delta(out, opened, pending)  # type: ignore[arg-type]
                        pending = []
                    self._close(out)
                    self._open_message(out)
                pending.append(ev.text)  # type: ignore[union-attr]
            elif t is ToolCallArgs:
                opened = self._open
                if opened is not None and opened.call == ev.index and ev.text:  # type: ignore[union-attr]
                    pending.append(ev.text)  # type: ignore[union-attr]
            elif t is ToolCallStart:
                if pending:
                    self._delta(out, self._open, pending)  # type: ignore[arg-type]
                    pending = []
                if self._shape.keep_first_call_only and self.has_call:
                    self._dropped.add(ev.index)  # type: ignore[union-attr]
                    continue
                self._close(out)
                self._open_call(out, ev)  # type: ignore[arg-type]
            elif t is ToolCallEnd:
                opened = self._open
                if opened is not None and opened.call == ev.index:  # type: ignore[union-attr]
                    if pending:
                        self._delta(out, opened, pending)
                        pending = []
                    self._close(out)
            # TextSpans / logprobs entries: not on this route.
        if pending:
            self._delta(out, self._open, pending)  # type: ignore[arg-type]
        return out

    def finish(self, tgi_finish_reason: str | None) -> list[dict[str, Any]]:
        """Close what is still open (``incomplete`` when TGI stopped on the token limit); an answer with no
        item at all gets one empty message."""
        if self._finished:
            raise RuntimeError("OutputBuilder.finish() called twice")
        self._finished = True
        out: list[dict[str, Any]] = []
        status = "incomplete" if tgi_finish_reason == "length" else "completed"
        if not self.output:
            self._open_message(out)
        self._close(out, status)
        return out

    # -- the Response ---------------------------------------------------------------------------

    def response(
        self, tgi_finish_reason: str | None, input_tokens: int, output_tokens: int
    ) -> dict[str, Any]:
        """The final Response: the items, the status, `usage`."""
        incomplete = tgi_finish_reason == "length"
        return self._response(
            status="incomplete" if incomplete else "completed",
            completed_at=None if incomplete else int(self._shape.clock()),
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            output=[_copy(item) for item in self.output],
            usage=response_usage(input_tokens, output_tokens),
        )

    def terminal(self, response: dict[str, Any]) -> dict[str, Any]:
        """``response.completed`` or ``response.incomplete`` for `response` (from :meth:`response`)."""
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        out: list[dict[str, Any]] = []
        self._event(out, kind, response=response)
        return out[0]

    def failed(self, code: str, message: str) -> list[dict[str, Any]]:
        """The end of a stream TGI broke: the open item closed ``incomplete``, then ``response.failed``."""
        out: list[dict[str, Any]] = []
        self._close(out, "incomplete")
        self._finished = True
        response = self._response(
            status="failed",
            error={"code": code, "message": message},
            output=[_copy(item) for item in self.output],
        )
        self._event(out, "response.failed", response=response)
        return out


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    """An item as sent at one moment (later changes to the builder's item must not show in it)."""
    if item["type"] == "message":
        return {**item, "content": [dict(part) for part in item["content"]]}
    return dict(item)
