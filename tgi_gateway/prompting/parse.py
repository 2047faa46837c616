"""Functionary's raw output → :data:`Event`s, incrementally, one parser per template family.

Theory of operation
-------------------
TGI streams the model's answer as token texts. A parser is fed them in order
(``feed(text, special)``) and returns the events that text makes certain; ``finish()`` flushes
what was held back. The parser is told the tool-choice generation prefix that ended the prompt and
parses ``prefix + output``, as functionary's ``parse_assistant_response`` does. The non-stream path
is ``feed(whole) + finish()``: the same code, so for **any** split of the output into pieces the
events are the same once adjacent text / argument fragments are merged.

Every family is a small state machine over five kinds of state, each with a fixed job for plain text:

=========  ===================================================================================
``TEXT``   assistant text, streamed to :class:`TextDelta`
``NAME``   a recipient / function name, collected until its terminator (a marker)
``ARGS``   a call's arguments, streamed to :class:`ToolCallArgs`
``CODE``   raw code after v3-llama3.1's ``<|python_tag|>`` (not lstripped), streamed the same way
``ROLE``   v2's role header between ``<|from|>`` and ``<|recipient|>``, ignored
=========  ===================================================================================

A family is one table ``state → {marker: next state}`` plus its stop markers, which are live in every
state and end the output. Leaving ``NAME`` through its terminator (the pseudo-target ``OPEN``) opens a
text segment if the name is the family's text recipient (``all``) and a call otherwise; leaving it
any other way means the name was cut short: a call with empty arguments, unless the name is blank
(or ``all``). A whitespace terminator (``"\\n"``) met while the name is still blank is just leading
whitespace. The grammars, with ``T = prefix + output`` cut at the first stop marker:

=============  ==================================================================================
v1             ``content [<|START_OF_FUNCTION_CALL|> name ":" arguments]``
v2             ``recipient <|content|> content (<|from|> role <|recipient|> recipient <|content|> …)*``
v2.llama3      ``content (<|reserved_special_token_249|> name "\\n" arguments)*``
v3.llama3      ``name "\\n" body (">>>" name "\\n" body)*`` (name ``all`` = text)
v3-llama3.1    ``(text | <function= name ">" arguments </function> )* [<|python_tag|> code]``
=============  ==================================================================================

Functionary strips each field; stripping is streamed: a field drops its leading whitespace and holds
trailing whitespace until something non-blank follows (then it is released) or the field ends (then it
is dropped). Several text segments are joined with ``"\\n"``. v3-llama3.1 text is not stripped per
segment, only at the ends of the whole output (see :class:`V31Parser`).

Only an ambiguous suffix is ever held back: the longest tail of the buffer that is a proper prefix of
a marker live in the current state (:meth:`.markers.MarkerSet.hold`), so the buffer never holds more than
29 characters (the longest marker, ``<|reserved_special_token_249|>``, has 30). Names are collected
whole; only the model's token limit bounds them. Each state's markers are one unambiguous
:class:`~.markers.MarkerSet` (no marker occurs inside another before its end, checked when the family's
class is defined), so the first complete marker in the buffer is always the one to act on.

Worked example: v3.llama3 with tool choice auto (the prompt ended with ``>>>``), fed token by token::

    feed("all")         → []                                 NAME "all"
    feed("\\n")          → []                                 the name "all" opens a text segment
    feed("It")          → [TextDelta("It")]
    feed(" is")         → [TextDelta(" is")]
    feed(">>")          → []                                 held: it may become ">>>"
    feed(">get")        → []                                 ">>>" ends the text; NAME "get"
    feed("_weather")    → []
    feed("\\n")          → [ToolCallStart(0, "get_weather")]
    feed('{"city"')     → [ToolCallArgs(0, '{"city"')]
    feed(": 1}")        → [ToolCallArgs(0, ": 1}")]
    feed("<|eot_id|>")  → [ToolCallEnd(0)]                   stop marker: stopped is True
    finish()            → []
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from .markers import MarkerSet
from .types import Event, TextDelta, TextSpans, ToolCallArgs, ToolCallEnd, ToolCallStart, Version

__all__ = [
    "PARSERS",
    "STOP_TOKENS",
    "TRACKED_PARSERS",
    "Parser",
    "V1Parser",
    "V2Llama3Parser",
    "V2Parser",
    "V3Llama3Parser",
    "V31Parser",
]

Table = dict[str, dict[str, str]]  # state -> {marker: next state}

# States (see the module docstring) and the pseudo-target "the name is complete".
TEXT, NAME, ARGS, CODE, ROLE, OPEN = "text", "name", "args", "code", "role", "open"

LLAMA3_STOPS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
# Tokenizer end-of-sequence texts: they end the output only when TGI flags the token as special.
EOS_TEXTS = frozenset({"</s>", "<|endoftext|>"})


class Parser(Protocol):
    """What every family's parser offers."""

    stopped: bool  # a stop marker (or a special EOS token) was seen; later input is ignored

    def __init__(self, prefix: str = "") -> None: ...
    def feed(self, text: str, special: bool = False) -> list[Event]: ...
    def finish(self) -> list[Event]: ...


class _Field:
    """A streamed, stripped field: assistant text (`index` None) or one call's arguments."""

    __slots__ = ("emitted", "index", "lead", "pending")

    def __init__(self, index: int | None, lead: bool = True) -> None:
        self.index = index
        self.lead = lead  # still dropping leading whitespace
        self.pending = ""  # trailing whitespace, released only if something non-blank follows
        self.emitted = False


class _Parser:
    """The machine shared by every family; a subclass is its tables (see the module docstring)."""

    STOPS: ClassVar[tuple[str, ...]] = ()
    START: ClassVar[str] = TEXT
    TABLE: ClassVar[Table] = {}
    TEXT_NAME: ClassVar[str | None] = None  # the recipient that means "text" (v2, v3.llama3: "all")
    CODE_NAME: ClassVar[str] = "python"  # the call a CODE state is
    WHOLE_TEXT: ClassVar[bool] = False  # text stripped at the ends of the output, not per segment
    _scanners: ClassVar[dict[str, MarkerSet]]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for state, moves in cls.TABLE.items():
            for target in moves.values():
                if target not in cls.TABLE and not (target == OPEN and state == NAME):
                    raise TypeError(f"{cls.__name__}: {state} → {target} leads nowhere")
        cls._scanners = {state: MarkerSet(cls.STOPS + tuple(moves)) for state, moves in cls.TABLE.items()}
        for state, markers in cls._scanners.items():
            if markers.ambiguity:  # the first complete marker would not always be the one to act on
                inner, outer = markers.ambiguity
                raise TypeError(f"{cls.__name__}: in {state}, marker {inner!r} occurs inside {outer!r}")

    def __init__(self, prefix: str = "") -> None:
        self.stopped = False
        self._finished = False
        self._out: list[Event] = []
        self._calls = 0
        self._spoke = False  # some TextDelta was emitted (the next text segment starts with "\n")
        self._whole = _Field(None) if self.WHOLE_TEXT else None
        self._field: _Field | None = None  # where plain text goes (None: NAME collects, ROLE drops)
        self._name = ""
        self._enter(self.START)
        self._buf = prefix
        self._scan(final=False)  # its events are returned by the first feed() / finish()

    # -- public API ---------------------------------------------------------------------------

    def feed(self, text: str, special: bool = False) -> list[Event]:
        """Parse the next piece of output; `special` is TGI's ``token.special``."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not self.stopped:
            if special and text.strip() in EOS_TEXTS:
                self._scan(final=True)
                self._leave(end=True)
                self.stopped = True
            else:
                self._buf += text
                self._scan(final=False)
        out, self._out = self._out, []
        return out

    def finish(self) -> list[Event]:
        """The output is complete: release held text, end the open segment (and call)."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if not self.stopped:
            self._scan(final=True)
            self._leave(end=True)
        out, self._out = self._out, []
        return out

    # -- scanning -----------------------------------------------------------------------------

    def _scan(self, final: bool) -> None:
        buf = self._buf
        while buf:
            m = self._scanner.search(buf)
            if m is None:
                cut = len(buf) if final else self._scanner.hold(buf)
                if cut:
                    self._text(buf[:cut])
                self._buf = buf[cut:]
                return
            start, end = m.span()
            if start:
                self._text(buf[:start])
            buf = buf[end:]
            marker = m.group()
            if marker in self.STOPS:
                self._leave(end=True)
                self.stopped = True
                buf = ""
            else:
                self._move(marker)
        self._buf = ""

    def _text(self, s: str) -> None:
        """Plain text (no marker in it) in the current state."""
        f = self._field
        if f is not None:
            self._push(f, s)
        elif self._state == NAME:
            self._name += s
        # ROLE: ignored

    def _push(self, f: _Field, s: str) -> None:
        if f.lead:
            s = s.lstrip()
            if not s:
                return
            f.lead = False
        body = s.rstrip()
        if not body:
            f.pending += s
            return
        out = f.pending + body
        f.pending = s[len(body) :]
        if not f.emitted:
            f.emitted = True
            if f.index is None:
                if self._spoke:
                    out = "\n" + out  # text segments are joined with "\n"
                self._spoke = True
        self._emit(f.index, out)

    def _emit(self, index: int | None, s: str) -> None:
        out = self._out
        last = out[-1] if out else None
        if index is None:
            if type(last) is TextDelta:
                out[-1] = TextDelta(last.text + s)
            else:
                out.append(TextDelta(s))
        elif type(last) is ToolCallArgs and last.index == index:
            out[-1] = ToolCallArgs(index, last.text + s)
        else:
            out.append(ToolCallArgs(index, s))

    # -- transitions --------------------------------------------------------------------------

    def _enter(self, state: str, name: str = "") -> None:
        self._state = state
        self._scanner = self._scanners[state]
        if state == TEXT:
            self._field = self._whole if self._whole is not None else _Field(None)
        elif state == ARGS or state == CODE:
            self._field = _Field(self._start_call(name), lead=state == ARGS)
        else:
            self._field = None
            self._name = ""

    def _move(self, marker: str) -> None:
        target = self.TABLE[self._state][marker]
        if target == OPEN:
            name = self._name.strip()
            if not name and marker.isspace():  # still in the whitespace before the name
                self._name += marker
            elif name == self.TEXT_NAME:
                self._enter(TEXT)
            else:
                self._enter(ARGS, name)
            return
        self._leave(end=False)
        self._enter(target, self.CODE_NAME if target == CODE else "")

    def _leave(self, end: bool) -> None:
        """The current segment ends: at a marker, or at the end of the output (`end`)."""
        state, f = self._state, self._field
        if state == NAME:
            name = self._name.strip()
            if name and name != self.TEXT_NAME:  # cut short before its terminator: no arguments
                index = self._start_call(name)
                self._out.append(ToolCallEnd(index))
        elif state == ARGS or state == CODE:
            self._out.append(ToolCallEnd(f.index))
        elif f is not None and f is self._whole and not end:
            f.lead = False  # the output has started: later whitespace is content
            if f.emitted and f.pending:
                self._emit(None, f.pending)
                f.pending = ""
        # Otherwise a text segment ends: its trailing whitespace is dropped.

    def _start_call(self, name: str) -> int:
        index = self._calls
        self._calls += 1
        self._out.append(ToolCallStart(index, name))
        return index


class V1Parser(_Parser):
    """v1: ``content [<|START_OF_FUNCTION_CALL|> name ":" arguments]``, one call at most.

    Everything after the ``:`` is the arguments, further START markers included.
    """

    STOPS = ("<|END_OF_ASSISTANT|>", "<|END_OF_FUNCTION_CALL|>")
    START = TEXT
    TABLE: ClassVar[Table] = {TEXT: {"<|START_OF_FUNCTION_CALL|>": NAME}, NAME: {":": OPEN}, ARGS: {}}


class V2Parser(_Parser):
    """v2: segments ``<|from|> role <|recipient|> R <|content|> C``; the prompt ended with ``<|recipient|>``.

    R ``all`` makes C text, anything else a call named R with arguments C. In the content only
    ``<|from|>`` is a marker; the role text is ignored.
    """

    STOPS = ("<|stop|>",)
    START = NAME
    TEXT_NAME = "all"
    TABLE: ClassVar[Table] = {
        ROLE: {"<|recipient|>": NAME},
        NAME: {"<|content|>": OPEN, "<|from|>": ROLE},
        TEXT: {"<|from|>": ROLE},
        ARGS: {"<|from|>": ROLE},
    }


class V2Llama3Parser(_Parser):
    """v2.llama3: ``content (<|reserved_special_token_249|> name "\\n" arguments)*``."""

    STOPS = LLAMA3_STOPS
    START = TEXT
    _SEP = "<|reserved_special_token_249|>"
    TABLE: ClassVar[Table] = {TEXT: {_SEP: NAME}, NAME: {"\n": OPEN, _SEP: NAME}, ARGS: {_SEP: NAME}}


class V3Llama3Parser(_Parser):
    """v3.llama3: ``name "\\n" body (">>>" name "\\n" body)*``; the prompt ended with ``>>>``.

    Name ``all`` makes the body text. ``>>>`` inside arguments splits them, as in functionary.
    """

    STOPS = LLAMA3_STOPS
    START = NAME
    TEXT_NAME = "all"
    TABLE: ClassVar[Table] = {NAME: {"\n": OPEN, ">>>": NAME}, TEXT: {">>>": NAME}, ARGS: {">>>": NAME}}


class V31Parser(_Parser):
    """v3-llama3.1: text, ``<function=name>arguments</function>`` calls, ``<|python_tag|>`` code to the end.

    The text is the whole output's text with only its two ends stripped (functionary strips the output,
    not the text): whitespace before the first non-blank character of the output is dropped, other
    whitespace is held until non-blank text follows, released at a marker only once some text was
    emitted (so blank text between calls is no content), and dropped at the end. An unclosed call is
    kept (functionary turns it into text). The code after ``<|python_tag|>`` keeps its leading
    whitespace.
    """

    STOPS = LLAMA3_STOPS
    START = TEXT
    WHOLE_TEXT = True
    TABLE: ClassVar[Table] = {
        TEXT: {"<function=": NAME, "<|python_tag|>": CODE},
        NAME: {">": OPEN, "</function>": TEXT},
        ARGS: {"</function>": TEXT},
        CODE: {},
    }


PARSERS: dict[Version, type[_Parser]] = {
    Version.V1: V1Parser,
    Version.V2: V2Parser,
    Version.V2_LLAMA3: V2Llama3Parser,
    Version.V3_LLAMA3: V3Llama3Parser,
    Version.V3_LLAMA31: V31Parser,
}

STOP_TOKENS: dict[Version, tuple[str, ...]] = {version: cls.STOPS for version, cls in PARSERS.items()}


class _Tracking(_Parser):
    """A family's parser that also says where its text came from: after each text emission a
    :class:`TextSpans` event gives the offsets, in the output fed so far, of the characters that text
    released, and of the whitespace dropped at the start of its segment (``tgi_gateway.logprobs`` lists a
    token when all its characters are there and its last one is content).

    It watches the family's machine rather than re-implementing it: every character of the output is
    consumed in order, as plain text of a state (``_text``) or as a marker (``_move``; after a stop marker
    nothing is consumed any more), so one counter gives each piece its offset. In a text field, a push
    releases the field's held whitespace (its pending spans) and the body of the piece: from its first
    character (after the leading whitespace a field still dropping it drops: a span that is not content)
    to what the field now holds back. Whitespace held and then dropped (the end of a field) is in no
    event. A subclass of each family is made below (:data:`TRACKED_PARSERS`); the plain parsers pay nothing.
    """

    def __init__(self, prefix: str = "") -> None:
        self._at = -len(prefix)  # the offset of the next character to consume (the prefix is before 0)
        self._pending_of: _Field | None = None  # the text field `_pending` belongs to
        self._pending: list[tuple[int, int, bool]] = []  # its dropped lead and held whitespace, not released
        self._piece: tuple[int, str, bool] | None = None  # (offset, text, lead) of the text being pushed
        self._released = False
        super().__init__(prefix)

    def _move(self, marker: str) -> None:
        self._at += len(marker)
        super()._move(marker)

    def _text(self, s: str) -> None:
        at = self._at
        self._at = end = at + len(s)
        f = self._field
        if f is None or f.index is not None:  # a name, a role, arguments: no content
            super()._text(s)
            return
        if f is not self._pending_of:
            self._pending_of, self._pending = f, []
        lead, held = f.lead, len(f.pending)
        if lead and (dropped := len(s) - len(s.lstrip())):
            self._pending.append((at, at + dropped, False))
        self._piece, self._released = (at, s, lead), False
        try:
            super()._text(s)
        finally:
            self._piece = None
        if self._released:  # what the field holds now is the piece's trailing whitespace
            self._pending = [(end - len(f.pending), end, True)] if f.pending else []
        elif len(f.pending) > held:
            self._pending.append((end - (len(f.pending) - held), end, True))

    def _emit(self, index: int | None, s: str) -> None:
        if index is not None:
            super()._emit(index, s)
            return
        out = self._out
        before: tuple[tuple[int, int, bool], ...] = ()
        if out and type(out[-1]) is TextSpans:  # one TextDelta + TextSpans for consecutive text
            before = out.pop().spans  # type: ignore[union-attr]
        super()._emit(index, s)
        spans = self._pending
        piece = self._piece
        if piece is not None:  # a push: the dropped and held whitespace, then the piece's body
            at, text, lead = piece
            start = at + len(text) - len(text.lstrip()) if lead else at
            spans = [*spans, (start, at + len(text) - len(self._field.pending), True)]  # type: ignore[union-attr]
            self._released = True
        self._pending = []  # a field releasing at a marker releases all it held
        out.append(TextSpans(before + tuple(spans)))


TRACKED_PARSERS: dict[Version, type[_Parser]] = {
    version: type(f"Tracked{cls.__name__}", (_Tracking, cls), {}) for version, cls in PARSERS.items()
}
