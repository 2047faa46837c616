"""Which Functionary template version a model uses (FORMATS.md §1 "Detection").

Two steps, so the startup code can report what it read and the tests can feed either half:

* :func:`load_model_files` reads the tokenizer files of a local directory or of a hub model (fetched
  with ``huggingface_hub.snapshot_download``, only the small JSON files) into a :class:`ModelFiles`;
* :func:`detect_version` decides the :class:`~tgi_gateway.prompting.types.Version` from it, in
  functionary's order (``get_prompt_template_from_tokenizer``): an explicit override, the chat template's
  ``{# version=NAME #}`` comment, a hub v2.x ``{#v2.2#}`` comment, then which marker strings are single
  tokens (``<|eom_id|>`` = 128008 → v3-llama3.1; ``<|reserved_special_token_249|>`` = 128254 → the
  Llama-3 family, split by the template; ``<|from|>`` → v2; ``<|START_OF_FUNCTION_CALL|>`` → v1).

A Llama-3 ``tokenizer.json`` is 9 MB, most of it the BPE vocabulary and merges. Only its leading
``added_tokens`` array is parsed: the JSON is decoded key by key and decoding stops there (the cost against
``json.load`` and ``tokenizers`` is in ``docs/performance.md``). The ``tokenizers`` library is loaded only
when a known marker string occurs in the file without being an added token (a plain vocabulary entry): then
whether it encodes to one token depends on the pre-tokenizer, and only the library can tell.
"""

from __future__ import annotations

import json
import logging
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .types import Version

__all__ = ["OVERRIDE_FLAG", "TOKENIZER_FILES", "ModelFiles", "detect_version", "load_model_files"]

logger = logging.getLogger(__name__)

OVERRIDE_FLAG = "--template-version"

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")
"""The files read (and fetched from the hub). Any of them may be missing."""

# Newer `transformers` versions save the chat template beside tokenizer_config.json instead of inside it.
# They are read only when tokenizer_config.json has no "chat_template".
_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

EOM = "<|eom_id|>"
EOM_ID = 128008
RESERVED_249 = "<|reserved_special_token_249|>"
RESERVED_249_ID = 128254
FROM = "<|from|>"
START_OF_FUNCTION_CALL = "<|START_OF_FUNCTION_CALL|>"

_DETECTION_MARKERS = (EOM, RESERVED_249, FROM, START_OF_FUNCTION_CALL)
_EXPECTED_IDS = {EOM: EOM_ID, RESERVED_249: RESERVED_249_ID}

# Every marker string some Functionary format uses; each one that is a single token ends up in
# ModelFiles.special_tokens, even when the tokenizer has it as a plain vocabulary entry.
_KNOWN_MARKERS = _DETECTION_MARKERS + (
    # v1
    "<|END_OF_FUNCTION_CALL|>", "<|END_OF_ASSISTANT|>", "<|END_OF_USER|>", "<|END_OF_SYSTEM|>",
    "<|END_OF_FUNCTION_RESULT|>",
    # v2
    "<|recipient|>", "<|content|>", "<|stop|>",
    # Llama 3 / 3.1
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|python_tag|>",
)  # fmt: skip

_SUPPORTED = tuple(v.value for v in Version)
_SERVED = ", ".join(_SUPPORTED)

# functionary: re.search(r"\{\# version=(?P<version_name>.+) \#\}", chat_template); whitespace-tolerant here.
_VERSION_COMMENT = re.compile(r"\{#-?\s*version\s*=\s*(?P<name>[^\s#]+?)\s*-?#\}")
# Hub v2.x templates (medium-v2.2) start with `{#v2.2#}`; only the Mistral-based v2.x releases mean "v2".
_RELEASE_COMMENT = re.compile(r"\s*\{#-?\s*(?P<name>v\d+(?:\.\d+)*)\s*-?#\}")
_V2_RELEASES = frozenset({"v2", "v2.0", "v2.1", "v2.2", "v2.3", "v2.4"})

_HINT_FIX_HUB = (
    "check the model id (and the revision), set HF_TOKEN for a gated or private model (after accepting its "
    "licence on the model page), or pass a local directory that holds the model's tokenizer files"
)


@dataclass(frozen=True)
class ModelFiles:
    """What was read from a model's tokenizer files (for detection, messages and later use).

    `special_tokens` holds every string that is a single token: the added tokens of tokenizer.json and
    tokenizer_config.json, the entries of added_tokens.json and special_tokens_map.json, and each known
    Functionary marker that the tokenizer encodes as one vocabulary token. `token_ids` maps those whose
    id is known. `files_read` lists the files actually read, in the order above.
    """

    source: str
    directory: Path | None
    chat_template: str | None
    special_tokens: frozenset[str] = frozenset()
    token_ids: Mapping[str, int] = field(default_factory=lambda: types.MappingProxyType({}))
    eos_token: str | None = None
    files_read: tuple[Path, ...] = ()

    def single_token_id(self, marker: str) -> int | None:
        """The id of `marker` if it is a single token with a known id, else None."""
        return self.token_ids.get(marker) if marker in self.special_tokens else None


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load_model_files(
    model: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    download: Callable[..., Any] | None = None,
) -> ModelFiles:
    """Read the tokenizer files of `model`: a local directory, or a hub id fetched with `download`.

    `download(repo_id, revision=..., token=..., allow_patterns=[...])` must return the local snapshot
    directory; the default (None) is ``huggingface_hub.snapshot_download``, which honours HF_TOKEN, HF_HOME,
    HF_HUB_CACHE and HF_HUB_OFFLINE by itself. Raises ConfigurationError when the model cannot be found
    or fetched, or when a file is not valid JSON.
    """
    directory = _resolve_directory(model, revision=revision, token=token, download=download)
    return _read_directory(model, directory)


def _resolve_directory(
    model: str, *, revision: str | None, token: str | None, download: Callable[..., Any] | None
) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigurationError(
            f"--model {model!r} is a file; pass the model's directory (the one holding tokenizer_config.json "
            "and tokenizer.json) or a Hugging Face hub id such as meetkai/functionary-small-v3.2."
        )
    if not _is_plausible_hub_id(model):
        raise ConfigurationError(
            f"--model {model!r}: no such directory ({path.resolve()}), and it is not a Hugging Face hub id "
            "(expected 'organisation/name', e.g. meetkai/functionary-small-v3.2). Check the path, or pass a "
            "hub id."
        )
    if download is None:  # imported only for a hub id: importing huggingface_hub slows start-up
        from huggingface_hub import snapshot_download as download
    where = f"hub model {model!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        result = download(
            model, revision=revision, token=token, allow_patterns=[*TOKENIZER_FILES, *_CHAT_TEMPLATE_FILES]
        )
    except Exception as exc:
        raise ConfigurationError(_download_failure_message(model, where, exc)) from exc
    if not isinstance(result, (str, Path)) or not Path(result).is_dir():
        raise ConfigurationError(
            f"Fetching the tokenizer files of {where} returned {result!r}, not a directory."
        )
    return Path(result)


def _is_plausible_hub_id(model: str) -> bool:
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(model)
    except ValueError:  # HFValidationError
        return False
    return True


def _download_failure_message(model: str, where: str, exc: Exception) -> str:
    from huggingface_hub import constants, utils

    kind = type(exc).__name__
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, utils.GatedRepoError):
        hint = "the model is gated: accept its licence on the model page, then set HF_TOKEN"
    elif isinstance(exc, utils.RevisionNotFoundError):
        hint = "the revision does not exist: check the revision (branch, tag or commit)"
    elif isinstance(exc, utils.RepositoryNotFoundError):
        hint = "no such model, or a private one: check the id, set HF_TOKEN for a private model"
    elif (
        isinstance(exc, (utils.LocalEntryNotFoundError, utils.OfflineModeIsEnabled))
        or kind == "IncompleteSnapshotError"
    ):
        if constants.HF_HUB_OFFLINE:
            hint = (
                f"HF_HUB_OFFLINE is set and the files are not in the cache ({constants.HF_HUB_CACHE}): "
                "fetch the model once with network access, unset HF_HUB_OFFLINE, or point "
                "HF_HOME/HF_HUB_CACHE at the cache that holds it"
            )
        else:
            hint = "the hub could not be reached and the files are not in the local cache: check the network"
    else:
        hint = ""
    lines = [
        f"Could not fetch the tokenizer files of {where} ({kind}{': ' + detail if detail else ''}).",
        f"{model!r} is not a local directory either.",
    ]
    if hint:
        lines.append(f"Likely cause: {hint}.")
    lines.append(f"To fix: {_HINT_FIX_HUB}.")
    return "\n".join(lines)


def _read_directory(source: str, directory: Path) -> ModelFiles:
    files_read: list[Path] = []

    def read_json(name: str) -> Any:
        p = directory / name
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise _unreadable(p, exc) from exc
        files_read.append(p)
        return data

    config = _as_dict(read_json("tokenizer_config.json"), directory / "tokenizer_config.json")
    tokens: dict[str, int | None] = {}  # single-token strings → id (None: id unknown); first source wins

    def add(content: Any, token_id: Any = None) -> None:
        if not isinstance(content, str) or not content:
            return
        tid = token_id if isinstance(token_id, int) and not isinstance(token_id, bool) else None
        if tokens.get(content) is None:
            tokens[content] = tid

    # 1. tokenizer.json: what TGI tokenizes with.
    tokenizer_json = directory / "tokenizer.json"
    tokenizer_raw: bytes | None = None
    if tokenizer_json.is_file():
        try:
            tokenizer_raw = tokenizer_json.read_bytes()
        except OSError as exc:
            raise _unreadable(tokenizer_json, exc) from exc
        files_read.append(tokenizer_json)
        for entry in _leading_added_tokens(tokenizer_raw, tokenizer_json):
            if isinstance(entry, dict):
                add(entry.get("content"), entry.get("id"))

    # 2. tokenizer_config.json "added_tokens_decoder": {"128000": {"content": ...}, ...}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for key, entry in decoder.items():
            if isinstance(entry, dict) and isinstance(key, str) and key.strip().isdigit():
                add(entry.get("content"), int(key))

    # 3. special_tokens_map.json: names only.
    special_map = _as_dict(read_json("special_tokens_map.json"), directory / "special_tokens_map.json")
    for value in special_map.values():
        for item in value if isinstance(value, list) else [value]:
            add(_token_content(item))

    # 4. added_tokens.json (slow tokenizers): {"<|from|>": 32000, ...}
    added_json = _as_dict(read_json("added_tokens.json"), directory / "added_tokens.json")
    for content, token_id in added_json.items():
        add(content, token_id)

    # Known markers that are not added tokens, and special tokens without a known id: when the string
    # occurs in tokenizer.json at all (a vocabulary entry), ask the tokenizers library.
    if tokenizer_raw is not None:
        candidates = [m for m in _KNOWN_MARKERS if m not in tokens] + [
            t for t, i in tokens.items() if i is None
        ]
        unresolved = _occurring(candidates, tokenizer_raw)
        if unresolved:
            _resolve_with_tokenizers(tokenizer_raw, tokenizer_json, unresolved, tokens)

    chat_template = _chat_template(config.get("chat_template"), directory / "tokenizer_config.json")
    if chat_template is None:
        chat_template = _separate_chat_template(directory, files_read)

    eos_token = _token_content(config.get("eos_token")) or _token_content(special_map.get("eos_token"))

    return ModelFiles(
        source=source,
        directory=directory,
        chat_template=chat_template,
        special_tokens=frozenset(tokens),
        token_ids=types.MappingProxyType({t: i for t, i in tokens.items() if i is not None}),
        eos_token=eos_token,
        files_read=tuple(files_read),
    )


def _as_dict(data: Any, path: Path) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} should hold a JSON object, found {type(data).__name__}.")
    return data


def _token_content(item: Any) -> str | None:
    """A token as tokenizer configs write it: a string or an AddedToken dict {"content": ...}."""
    if isinstance(item, str):
        return item or None
    if isinstance(item, dict) and isinstance(item.get("content"), str):
        return item["content"] or None
    return None


_WS = re.compile(r"\s*")
_HEAD_BYTES = 1 << 18


def _leading_added_tokens(raw: bytes, path: Path) -> list[Any]:
    """tokenizer.json's top-level "added_tokens", decoding the object key by key and stopping there.

    `tokenizers` writes added_tokens before the (large) model, so only the first 256 KiB are decoded
    and the vocabulary and merges never are. A file in another key order is still read correctly, only
    slower. Malformed JSON → ConfigurationError.
    """
    if len(raw) > _HEAD_BYTES:
        end = _HEAD_BYTES
        while end > 0 and raw[end] & 0xC0 == 0x80:  # do not cut a UTF-8 sequence
            end -= 1
        try:
            return _parse_added_tokens(raw[:end].decode("utf-8"))
        except (ValueError, IndexError):
            pass  # not within the head (or malformed): decode everything below
    try:
        return _parse_added_tokens(raw.decode("utf-8"))
    except (ValueError, IndexError) as exc:  # UnicodeDecodeError is a ValueError
        raise _unreadable(path, f"not a valid tokenizer.json ({exc}).") from exc


def _parse_added_tokens(text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    i = _WS.match(text, 0).end()
    if text[i] != "{":
        raise ValueError("not a JSON object")
    i += 1
    while True:
        i = _WS.match(text, i).end()
        if text[i] == "}":
            return []
        key, i = decoder.raw_decode(text, i)
        i = _WS.match(text, i).end()
        if not isinstance(key, str) or text[i] != ":":
            raise ValueError(f"malformed object at character {i}")
        i = _WS.match(text, i + 1).end()
        value, i = decoder.raw_decode(text, i)
        if key == "added_tokens":
            return value if isinstance(value, list) else []
        i = _WS.match(text, i).end()
        if text[i] == ",":
            i += 1
        elif text[i] != "}":
            raise ValueError(f"malformed object at character {i}")


def _occurring(strings: list[str], raw: bytes) -> list[str]:
    """Those of `strings` that occur in `raw`: one regex pass over the file, not one ``in`` per string.

    A pre-filter only. Matches do not overlap, which cannot hide a `<|...|>` marker; it could at worst
    hide a special-token name inside another one, and then only that token's id stays unknown.
    """
    if not strings:
        return []
    alternatives = b"|".join(re.escape(s.encode("utf-8")) for s in sorted(strings, key=len, reverse=True))
    found = {m.decode("utf-8") for m in re.findall(alternatives, raw)}
    return [s for s in strings if s in found]


def _resolve_with_tokenizers(
    raw: bytes, path: Path, strings: list[str], tokens: dict[str, int | None]
) -> None:
    """Encode each string with the real tokenizer; one token → record it (and its id)."""
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:
        raise ConfigurationError(f"Cannot load {path} with the tokenizers library: {exc}") from exc
    for s in strings:
        ids = tokenizer.encode(s, add_special_tokens=False).ids
        if len(ids) == 1:
            tokens[s] = ids[0]


def _chat_template(value: Any, path: Path) -> str | None:
    """tokenizer_config.json "chat_template": a string, or a list of {"name", "template"}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        entries = [e for e in value if isinstance(e, dict) and isinstance(e.get("template"), str)]
        if len(entries) != len(value):
            raise ConfigurationError(
                f'{path}: "chat_template" list entries must be {{"name": ..., "template": ...}}.'
            )
        if not entries:
            return None
        chosen = next((e for e in entries if e.get("name") == "default"), entries[0])
        return chosen["template"]
    raise ConfigurationError(
        f'{path}: "chat_template" should be a string or a list, found {type(value).__name__}.'
    )


def _separate_chat_template(directory: Path, files_read: list[Path]) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            text = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _unreadable(jinja, exc) from exc
        files_read.append(jinja)
        return text
    as_json = directory / "chat_template.json"
    if as_json.is_file():
        try:
            data = json.loads(as_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise _unreadable(as_json, exc) from exc
        files_read.append(as_json)
        return _chat_template(_as_dict(data, as_json).get("chat_template"), as_json)
    return None


# ------------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------------


def detect_version(files: ModelFiles, override: str | None = None) -> Version:
    """The template version of `files` (FORMATS.md §1 order), or `override` when given.

    Raises ConfigurationError for an invalid override, a template of a Functionary version this gateway
    does not serve (e.g. the vision model v3.llava_llama), and a model nothing identifies.
    """
    if override is not None:
        return _parse_override(override)

    template = files.chat_template or ""

    m = _VERSION_COMMENT.search(template)
    if m:
        name = m.group("name")
        if name in _SUPPORTED:
            return _found(files, Version(name), f"the chat template's {{# version={name} #}} comment")
        raise ConfigurationError(
            _unserved_message(
                files, f"the chat template declares {{# version={name} #}}, a Functionary template version"
            )
        )

    release = _RELEASE_COMMENT.match(template)
    if release and release.group("name") in _V2_RELEASES:
        return _found(files, Version.V2, f"the chat template's {{#{release.group('name')}#}} comment")

    if files.single_token_id(EOM) == EOM_ID:
        return _found(files, Version.V3_LLAMA31, f"{EOM} is the single token {EOM_ID}")

    if files.single_token_id(RESERVED_249) == RESERVED_249_ID:
        why = f"{RESERVED_249} is the single token {RESERVED_249_ID} (Llama 3)"
        if "image_url" in template and ">>>" in template:
            raise ConfigurationError(
                _unserved_message(
                    files,
                    "a Llama-3 tokenizer whose chat template mentions image_url and '>>>' is Functionary's "
                    "vision template (v3.llava_llama), which",
                )
            )
        if RESERVED_249 in template:
            return _found(files, Version.V2_LLAMA3, why + " and the chat template uses it")
        return _found(files, Version.V3_LLAMA3, why + " and the chat template does not use it")

    if FROM in files.special_tokens:
        return _found(files, Version.V2, f"{FROM} is a single token")

    if START_OF_FUNCTION_CALL in files.special_tokens:
        return _found(files, Version.V1, f"{START_OF_FUNCTION_CALL} is a single token")

    raise ConfigurationError(_undetected_message(files, release.group("name") if release else None))


def _parse_override(override: str) -> Version:
    value = override.value if isinstance(override, Version) else str(override).strip()
    if value in _SUPPORTED:
        return Version(value)
    raise ConfigurationError(
        f"{OVERRIDE_FLAG} {override!r} is not a template version; use one of: {_SERVED}."
    )


def _found(files: ModelFiles, version: Version, why: str) -> Version:
    logger.info("%s: template version %s (%s)", files.source, version, why)
    return version


def _unserved_message(files: ModelFiles, what: str) -> str:
    """`what` names a template this gateway does not serve; the versions it serves and the override follow."""
    return (
        f"{files.source}: {what} this gateway does not serve (it serves {_SERVED}). If the model really uses "
        f"one of those formats, pass {OVERRIDE_FLAG} VERSION."
    )


def _unreadable(path: Path, why: object) -> ConfigurationError:
    return ConfigurationError(f"Cannot read {path}: {why}")


def _undetected_message(files: ModelFiles, release: str | None) -> str:
    if files.chat_template is None:
        template = "no chat template"
    elif release:
        template = (
            f"a chat template starting with {{#{release}#}} (not a v2.x release), no version=... comment"
        )
    else:
        template = "a chat template without a {# version=... #} comment"
    markers = []
    for marker in _DETECTION_MARKERS:
        if marker not in files.special_tokens:
            continue
        tid = files.token_ids.get(marker)
        expected = _EXPECTED_IDS.get(marker)
        if expected is not None and tid != expected:
            markers.append(f"{marker} (id {tid if tid is not None else 'unknown'}, not {expected})")
        else:
            markers.append(marker)
    present = ", ".join(markers) if markers else "none"
    if files.directory is None:
        read = "no directory"
    else:
        read = ", ".join(str(p) for p in files.files_read) or "no tokenizer file"
        missing = [n for n in TOKENIZER_FILES if not any(p.name == n for p in files.files_read)]
        if missing:
            read += f" (not found in {files.directory}: {', '.join(missing)})"
    return (
        f"Cannot tell which Functionary template version {files.source!r} uses.\n"
        f"  chat template: {template}\n"
        f"  marker tokens present: {present} "
        f"(looked for {', '.join(_DETECTION_MARKERS)} as single tokens)\n"
        f"  files read: {read}\n"
        f"Accepted versions: {_SERVED}. If this is a Functionary model, pass "
        f"{OVERRIDE_FLAG} VERSION."
    )
