"""The client's `stop` sequences, applied to the raw model output before the template parser.

Theory of operation
-------------------
OpenAI's contract: generation stops at the first occurrence of any stop sequence and the returned text
does not contain it. TGI's `stop` parameter differs: it only matches when the decoded text *ends* with
the sequence after a token (a sequence completed in the middle of a token is missed), and the stop text
stays in the output. So the gateway sends the client's sequences to TGI (to stop early when TGI can) and
also applies them itself, here: :class:`StopFilter` sits between TGI's tokens and the parser, releases
text as soon as it cannot be the start of a stop sequence, holds back only a suffix that still could be,
and on a match releases the text before it and reports :attr:`StopFilter.stopped` — the caller then ends
the answer with finish reason ``stop`` and closes the upstream request.

Special tokens (the template's own markers, EOS) are never part of a client stop sequence: they release
the held text and pass through unchanged.

Example with ``stop=["END"]``::

    feed("The E", False)  → [("The ", False)]         "E" is held: it may start "END"
    feed("NDING", False)  → [] and stopped             "The " was all there was before "END"
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopFilter"]

Piece = tuple[str, bool]  # (text, special), as TGI streams tokens


class StopFilter:
    """Cuts the output at the first occurrence of any of `stops` (the text before it is kept)."""

    __slots__ = ("_stops", "_prefixes", "_span", "_held", "stopped")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._prefixes = frozenset(s[:i] for s in self._stops for i in range(1, len(s)))
        self._span = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self.stopped = False

    def feed(self, text: str, special: bool = False) -> list[Piece]:
        """The pieces that are certain to come before any stop sequence."""
        if self.stopped:
            return []
        if not self._stops:
            return [(text, special)]
        if special:
            out = [(self._held, False)] if self._held else []
            self._held = ""
            return out + [(text, True)]
        buf = self._held + text
        cut = self._find(buf)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return [(buf[:cut], False)] if cut else []
        keep = self._hold_from(buf)
        self._held = buf[keep:]
        return [(buf[:keep], False)] if keep else []

    def finish(self) -> list[Piece]:
        """The output ended: release what was held (it never became a stop sequence)."""
        held, self._held = self._held, ""
        return [(held, False)] if held and not self.stopped else []

    def _find(self, buf: str) -> int | None:
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _hold_from(self, buf: str) -> int:
        """Start of the longest suffix of `buf` that is a proper prefix of a stop sequence."""
        n = len(buf)
        for i in range(max(0, n - self._span), n):
            if buf[i:] in self._prefixes:
                return i
        return n
