"""Functionary prompting: exact prompts in, OpenAI-shaped events out, for every template version.

One :class:`Template` per model joins the pieces of its version::

    template = Template(detect_version(load_model_files("meetkai/functionary-small-v3.2")))
    prompt = normalize(request_body)          # InvalidRequestError (400) for bad requests
    text = template.render(prompt)            # the exact prompt, generation prefix included, no BOS
    parser = template.parser(prompt)          # parses prefix + output: feed(token, special) / finish()
    template.stop_sequences                   # stop strings to send to TGI

Everything here is pure except :mod:`.detect`, which reads the model's tokenizer files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .detect import ModelFiles, detect_version, load_model_files
from .parse import PARSERS, STOP_TOKENS, TRACKED_PARSERS, Parser
from .render import generation_prefix, render
from .request import normalize
from .types import ChatPrompt, Event, Version

__all__ = [
    "ChatPrompt",
    "Event",
    "ModelFiles",
    "Template",
    "Version",
    "detect_version",
    "load_model_files",
    "normalize",
]


@dataclass(frozen=True, slots=True)
class Template:
    """The prompt renderer, output parser and stop sequences of one template version."""

    version: Version

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        """The version's stop tokens, as stop strings for TGI (which stops on EOS ids by itself)."""
        return STOP_TOKENS[self.version]

    def render(self, prompt: ChatPrompt, *, max_tokens: int | None = None) -> str:
        """The prompt text the model was trained on, ending with the tool choice's generation prefix
        (refused, ContextLengthExceededError, when it cannot fit `max_tokens`: :func:`.render.render`)."""
        return render(self.version, prompt, max_tokens=max_tokens)

    def parser(self, prompt: ChatPrompt, *, tracked: bool = False) -> Parser:
        """A fresh parser for the answer to `prompt` (it knows the generation prefix); `tracked`: one that
        also says where its text came from (``TextSpans`` events, for ``logprobs``)."""
        parsers = TRACKED_PARSERS if tracked else PARSERS
        return parsers[self.version](generation_prefix(self.version, prompt.choice))

    def parse(self, prompt: ChatPrompt, pieces: str | Iterable[tuple[str, bool]]) -> list[Event]:
        """All events of a complete answer: the whole text, or ``(token_text, special)`` pairs."""
        parser = self.parser(prompt)
        if isinstance(pieces, str):
            events = parser.feed(pieces)
        else:
            events = [ev for text, special in pieces for ev in parser.feed(text, special)]
        return events + parser.finish()
