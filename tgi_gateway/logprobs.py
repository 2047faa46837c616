"""Which generated tokens the answer's ``logprobs`` list, and when (no I/O).

Theory of operation
-------------------
OpenAI's ``choices[].logprobs.content`` lists the tokens of the message's ``content``. A Functionary
answer is more than its content: markers (``>>>``, ``<|content|>``), recipients and names, call arguments,
stop tokens, whitespace the parsers strip, text after a client's stop sequence. The rule, the same for
stream and non-stream:

    **A token is listed when every character of its text is text of the answer and its last character is
    content**, where content is what the parser released as the message's ``content`` (not a marker,
    name, arguments, text cut by a stop sequence, or whitespace dropped at the end of a segment), and text
    is content plus the whitespace dropped at the *start* of a text segment. **It is listed with the text
    that releases its last character.**

So a token that is partly a marker (``"all\\n"``, ``"Hi>>"``), partly arguments, or ends in whitespace
dropped at the end of a segment (``".\\n"`` before ``>>>``) is not listed; a token that starts with the
whitespace a segment drops (``" Hello"`` after ``<|content|>``: SentencePiece models start most words
with a space) is, with its text as TGI gave it; a whitespace-only token that is dropped is not; the
``"\\n"`` the parser puts between two text segments belongs to no token. A token with empty text (TGI
gives the first tokens of a character split over several tokens ``""``, the last one the character) goes
with the token after it: listed when that one is. The listed tokens' texts are thus the content, less
the dropped and inserted characters, plus the dropped leading whitespace of listed tokens.

How: the tracking parser (``prompting.parse.TRACKED_PARSERS``) follows every :class:`TextDelta` with a
:class:`~tgi_gateway.prompting.types.TextSpans`, the offsets of the output characters that text released
(and of the leading whitespace its segment dropped). :class:`ContentTokens` knows each token's offsets
(:meth:`ContentTokens.add`, in order) and turns each ``TextSpans`` into a :class:`Logprobs` event holding
the entries of the tokens it completed (:meth:`ContentTokens.convert`). Spans only ever move forward, so
a token is decided once: when the spans first reach its end, it is listed if the run of consecutive
spans reaching there started at or before its first character and the span holding its last character
is content. Offsets count the characters of the output the parser is fed (the stop filter's output:
TGI's tokens, cut at a client stop sequence), the same for any split of the output into pieces — so the
stream's entries, chunk after chunk, are the non-stream list.

Worked example (v3.llama3, tokens ``"all"``, ``"\\n"``, ``"It"``, ``" is"``, ``">>>"``)::

    add × 5                   offsets all [0,3), \\n [3,4), It [4,6), " is" [6,9), >>> [9,12)
    feed("all"), feed("\\n")   no text                               → nothing listed yet
    feed("It")                TextDelta("It"), TextSpans(((4, 6, True),))  → Logprobs([It])
    feed(" is")               TextDelta(" is"), TextSpans(((6, 9, True),)) → Logprobs([" is"])
    feed(">>>")               a marker                               → nothing; "all", "\\n", ">>>" never
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tgi_gateway.prompting.types import Event, TextSpans

__all__ = ["FLOOR", "ContentTokens", "Logprobs", "entry"]

#: OpenAI's logprob for a token too unlikely to score; given when TGI sends none (its `logprob` is nullable).
FLOOR = -9999.0

Top = Sequence[tuple[str, float | None]]  # a token's most likely alternatives: (text, logprob)


@dataclass(frozen=True, slots=True)
class Logprobs:
    """The ``logprobs.content`` entries of the tokens completed by the text just before this event."""

    entries: list[dict[str, Any]]


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", "surrogatepass"))


def entry(text: str, logprob: float | None, top: Top, top_n: int) -> dict[str, Any]:
    """One ``logprobs.content`` item: the token, its logprob, its UTF-8 bytes, its ``top_n`` likeliest
    alternatives (TGI may send more on ties, in any order: sorted here, cut at ``top_n``)."""
    best = sorted(top, key=lambda t: FLOOR if t[1] is None else t[1], reverse=True)[:top_n] if top_n else ()
    return {
        "token": text,
        "logprob": FLOOR if logprob is None else logprob,
        "bytes": _bytes(text),
        "top_logprobs": [
            {"token": t, "logprob": FLOOR if lp is None else lp, "bytes": _bytes(t)} for t, lp in best
        ],
    }


class ContentTokens:
    """The tokens of one answer, in order, and the content released so far (see the module docstring).

    ``add`` every token as it arrives (before or after the text that holds it is fed to the parser: only
    the order matters); ``convert`` every event list the tracking parser returns.
    """

    __slots__ = ("_carry", "_end", "_run_end", "_run_start", "_tokens", "_top_n")

    def __init__(self, top_n: int) -> None:
        self._top_n = top_n
        self._tokens: deque[tuple[int, int, str, float | None, Top]] = deque()  # (start, end, text, lp, top)
        self._end = 0  # the offset after the last token added
        self._run_start = self._run_end = 0  # the last run of consecutive released characters
        self._carry: list[tuple[int, int, str, float | None, Top]] = []  # empty tokens before the next one

    def add(self, text: str, logprob: float | None, top: Top = ()) -> None:
        start = self._end
        self._end = end = start + len(text)
        self._tokens.append((start, end, text, logprob, top))

    def release(self, spans: Iterable[tuple[int, int, bool]]) -> list[dict[str, Any]]:
        """The entries of the tokens these released spans complete (in order)."""
        out: list[dict[str, Any]] = []
        tokens, carry = self._tokens, self._carry
        for a, b, content in spans:
            if a >= b:
                continue
            if a == self._run_end:
                self._run_end = b
            else:
                self._run_start, self._run_end = a, b
            # Every token ending in (a, b] has its last character in this span: it is decided now.
            while tokens and tokens[0][1] <= b:
                token = tokens.popleft()
                start, end = token[0], token[1]
                if start == end:
                    carry.append(token)
                    continue
                if content and start >= self._run_start:
                    out += [entry(t[2], t[3], t[4], self._top_n) for t in carry]
                    out.append(entry(token[2], token[3], token[4], self._top_n))
                carry.clear()
        return out

    def convert(self, events: list[Event]) -> list[Event]:
        """`events` with each :class:`TextSpans` replaced by the :class:`Logprobs` of the tokens it completes
        (left out when it completes none)."""
        out: list[Event | Logprobs] = []
        for ev in events:
            if type(ev) is TextSpans:
                entries = self.release(ev.spans)  # type: ignore[union-attr]
                if entries:
                    out.append(Logprobs(entries))
            else:
                out.append(ev)
        return out  # type: ignore[return-value]
