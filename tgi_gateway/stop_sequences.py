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

"First occurrence" is the one completed first as the text streams in: the occurrence that ends first,
and of those ending at one place the longest (:meth:`~tgi_gateway.prompting.markers.MarkerSet.search`).
That is where TGI itself stops, and it does not depend on how the text was split into tokens: with
``stop=["b", "abc"]`` the output ``"abc"`` keeps ``"a"``, whole or in pieces. Searching and holding back
are the parsers' own :class:`~tgi_gateway.prompting.markers.MarkerSet`, whose memory is linear in the
length of the client's sequences.

Special tokens (the template's own markers, EOS) are never part of a client stop sequence: they release
the held text and pass through unchanged.

Example with ``stop=["END"]``::

    feed("The E", False)  → [("The ", False)]         "E" is held: it may start "END"
    feed("NDING", False)  → [] and stopped             "The " was all there was before "END"
"""

from __future__ import annotations

from collections.abc import Sequence

from tgi_gateway.prompting.markers import MarkerSet

__all__ = ["StopFilter"]

Piece = tuple[str, bool]  # (text, special), as TGI streams tokens


class StopFilter:
    """Cuts the output at the first occurrence of any of `stops` (the text before it is kept)."""

    __slots__ = ("_held", "_stops", "stopped")

    def __init__(self, stops: Sequence[str]) -> None:
        markers = MarkerSet(stops)
        self._stops = markers if markers.markers else None
        self._held = ""
        self.stopped = False

    def feed(self, text: str, special: bool = False) -> list[Piece]:
        """The pieces that are certain to come before any stop sequence."""
        stops = self._stops
        if stops is None:
            return [(text, special)]
        if self.stopped:
            return []
        if special:
            out = [(self._held, False)] if self._held else []
            self._held = ""
            return out + [(text, True)]
        buf = self._held + text
        m = stops.search(buf)
        if m is not None:
            self.stopped = True
            self._held = ""
            cut = m.start()
            return [(buf[:cut], False)] if cut else []
        keep = stops.hold(buf)
        self._held = buf[keep:]
        return [(buf[:keep], False)] if keep else []

    def finish(self) -> list[Piece]:
        """The output ended: release what was held (it never became a stop sequence)."""
        held, self._held = self._held, ""
        return [(held, False)] if held and not self.stopped else []
