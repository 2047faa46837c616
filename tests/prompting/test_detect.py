"""Template-version detection: `tgi_gateway.prompting.detect`.

Offline and self-contained: every tokenizer is built here with the `tokenizers` library (WordLevel models
whose vocabularies put the marker tokens at the ids the real Llama-3 / Llama-3.1 / Mistral / Llama-2
tokenizers give them) and saved with tokenizer_config.json / special_tokens_map.json / added_tokens.json
into tmp_path. The chat templates are small strings carrying the recognisable features of the ones the
hub models ship (version comments, `{#v2.2#}`, `<|reserved_special_token_249|>`, `>>>`, `image_url`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import utils as hf_utils
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from tgi_gateway.errors import ConfigurationError
from tgi_gateway.prompting import detect
from tgi_gateway.prompting.detect import ModelFiles, detect_version, load_model_files
from tgi_gateway.prompting.types import Version

ALL_VERSIONS = ("v1", "v2", "v2.llama3", "v3.llama3", "v3-llama3.1")

# --------------------------------------------------------------------------------------------
# Tokenizers (special token → id, as in the real tokenizers)
# --------------------------------------------------------------------------------------------

_LLAMA3_COMMON = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
}
LLAMA3 = {  # Meta-Llama-3: 128008 is still reserved, 128254 is reserved_249
    **_LLAMA3_COMMON,
    "<|reserved_special_token_4|>": 128008,
    "<|reserved_special_token_249|>": 128254,
}
LLAMA31 = {  # Llama-3.1: 128008 became <|eom_id|>; the reserved tokens were renumbered
    **_LLAMA3_COMMON,
    "<|eom_id|>": 128008,
    "<|python_tag|>": 128010,
    "<|reserved_special_token_245|>": 128254,
}
_SPM = {"<unk>": 0, "<s>": 1, "</s>": 2}
MISTRAL_V2 = {**_SPM, "<|from|>": 32000, "<|recipient|>": 32001, "<|content|>": 32002, "<|stop|>": 32003}
LLAMA2_V1 = {
    **_SPM,
    "<|END_OF_USER|>": 32000,
    "<|END_OF_SYSTEM|>": 32001,
    "<|END_OF_ASSISTANT|>": 32002,
    "<|START_OF_FUNCTION_CALL|>": 32003,
    "<|END_OF_FUNCTION_CALL|>": 32004,
    "<|END_OF_FUNCTION_RESULT|>": 32005,
}
PLAIN = {"<s>": 1, "</s>": 2}  # a tokenizer with none of the markers

TOKENIZERS = {
    "v1": LLAMA2_V1,
    "v2": MISTRAL_V2,
    "v2.llama3": LLAMA3,
    "v3.llama3": LLAMA3,
    "v3-llama3.1": LLAMA31,
}

# --------------------------------------------------------------------------------------------
# Chat templates (small stand-ins with the hub templates' recognisable features)
# --------------------------------------------------------------------------------------------

T_V31 = (  # medium-v3.1: comment first, Meta's format
    "{# version=v3-llama3.1 #}{%- if not tools is defined -%}{%- set tools = none -%}{%- endif -%}"
    "{{- bos_token }}{%- for message in messages -%}{{ '<|start_header_id|>' + message['role'] }}"
    "{%- if message.tool_calls %}{{ '<|python_tag|>' }}{% endif %}{{ '<|eom_id|>' }}{%- endfor -%}"
)
T_V32 = (  # medium/small-v3.2: comment first, schema macro spliced in, '>>>' recipients
    "{# version=v3.llama3 #}{%- macro append_new_param_info(param_declaration, comment_info) -%}"
    "{%- endmacro -%}{% for message in messages %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{{ '>>>' + tool_call['function']['name'] + '\n' }}{% endfor %}"
)
T_V22 = (  # medium-v2.2 (hub): `{#v2.2#}` first; small-v2.2 GGUF: the same without it
    "{#v2.2#}\n{% for message in messages %}\n{{ '<|from|>' + message['role'] + '\n<|recipient|>all\n"
    "<|content|>' + message['content'] + '\n' }}{% endfor %}"
)
T_V22_BARE = T_V22.removeprefix("{#v2.2#}\n")
T_V25 = (  # small-v2.5: no comment, calls start with <|reserved_special_token_249|>
    "{% for message in messages %}\n{% if message['role'] == 'user' %}"
    "{{ '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% else %}"
    "{{ '<|reserved_special_token_249|>' + tool_call['function']['name'] + '\n' }}{% endif %}{% endfor %}"
)
T_V30 = (  # medium-v3.0 era inline template: no comment, '>>>' recipients
    "{% for message in messages %}\n{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ '>>>' + tool_call['function']['name'] + '\n' }}{% endfor %}"
)
T_LLAVA = (  # v3.llava_llama: '>>>' recipients and image_url content parts
    "{% for message in messages %}{% for part in message['content'] %}{% if part['type'] == 'image_url' %}"
    "{{ '<|reserved_special_token_250|>' }}{% endif %}{% endfor %}{{ '>>>all\n' }}{% endfor %}"
)
T_META = (  # a plain Llama-3.1 instruct template
    "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
)

ABSENT = object()


def build_tokenizer(
    specials: dict[str, int], *, vocab_only: dict[str, int] | None = None, pre_tokenizer=None
) -> Tokenizer:
    """A WordLevel tokenizer: `specials` are in the vocab at their ids and added as special tokens,
    `vocab_only` entries are plain vocabulary (not added tokens)."""
    vocab = {"[UNK]": 5000, "hello": 5001, "world": 5002, **specials, **(vocab_only or {})}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizer or pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer


def write_model(
    directory: Path,
    *,
    specials: dict[str, int] | None = None,
    vocab_only: dict[str, int] | None = None,
    pre_tokenizer=None,
    template=ABSENT,
    config: dict | None = None,
    special_map: dict | None = None,
    added_json: dict | None = None,
) -> Path:
    """Write the files of a model directory; each file only when something is given for it."""
    directory.mkdir(parents=True, exist_ok=True)
    if specials is not None or vocab_only is not None:
        build_tokenizer(specials or {}, vocab_only=vocab_only, pre_tokenizer=pre_tokenizer).save(
            str(directory / "tokenizer.json")
        )
    if template is not ABSENT or config is not None:
        cfg = dict(config or {})
        if template is not ABSENT:
            cfg["chat_template"] = template
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    if special_map is not None:
        (directory / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    if added_json is not None:
        (directory / "added_tokens.json").write_text(json.dumps(added_json), encoding="utf-8")
    return directory


def detect_dir(directory: Path, override: str | None = None) -> Version:
    return detect_version(load_model_files(str(directory)), override)


def no_download(*args, **kwargs):
    raise AssertionError(f"download must not be called (called with {args}, {kwargs})")


# --------------------------------------------------------------------------------------------
# Detection from the chat template's comments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_version_comment_alone_decides(tmp_path, version):
    model = write_model(
        tmp_path, specials=PLAIN, template="{# version=" + version + " #}{% for m in messages %}{% endfor %}"
    )
    assert detect_dir(model) == Version(version)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_version_comment_wins_over_tokens(tmp_path, version):
    other = "v1" if version != "v1" else "v3-llama3.1"
    model = write_model(tmp_path, specials=TOKENIZERS[other], template="{# version=" + version + " #}")
    assert detect_dir(model) == Version(version)


def test_v32_llama31_tokenizer_with_v3_llama3_comment_is_v3_llama3(tmp_path):
    # small-v3.2 is Llama-3.1 based (<|eom_id|> = 128008) and only its comment says v3.llama3.
    model = write_model(tmp_path, specials=LLAMA31, template=T_V32)
    assert detect_dir(model) == Version.V3_LLAMA3


def test_v31_hub_template(tmp_path):
    assert detect_dir(write_model(tmp_path, specials=LLAMA31, template=T_V31)) == Version.V3_LLAMA31


@pytest.mark.parametrize(
    "comment", ["{# version=v3.llama3 #}", "{#- version=v3.llama3 -#}", "{#version = v3.llama3#}"]
)
def test_version_comment_whitespace_variants(tmp_path, comment):
    model = write_model(tmp_path, specials=LLAMA31, template=comment + "{{ bos_token }}")
    assert detect_dir(model) == Version.V3_LLAMA3


def test_version_comment_found_after_leading_text(tmp_path):
    # functionary uses re.search: the comment need not be at offset 0.
    model = write_model(tmp_path, specials=PLAIN, template="{{ bos_token }}\n{# version=v2.llama3 #}")
    assert detect_dir(model) == Version.V2_LLAMA3


@pytest.mark.parametrize(
    "template", [T_V22, "{#v2.4#}" + T_V22_BARE, "  {# v2.1 #}\n" + T_V22_BARE, "{#v2#}"]
)
def test_hub_v2x_release_comment_is_v2(tmp_path, template):
    # A plain tokenizer: the comment alone decides (as for a model without tokenizer.json).
    assert detect_dir(write_model(tmp_path, specials=PLAIN, template=template)) == Version.V2


def test_release_comment_of_other_release_is_ignored(tmp_path):
    plain = write_model(tmp_path / "plain", specials=PLAIN, template="{#v2.5#}" + T_V25)
    with pytest.raises(ConfigurationError, match=r"starting with \{#v2\.5#\}"):
        detect_dir(plain)
    llama3 = write_model(tmp_path / "llama3", specials=LLAMA3, template="{#v2.5#}" + T_V25)
    assert detect_dir(llama3) == Version.V2_LLAMA3


def test_release_comment_must_be_at_the_start(tmp_path):
    model = write_model(tmp_path, specials=PLAIN, template=T_V22_BARE + "{#v2.2#}")
    with pytest.raises(ConfigurationError, match="Cannot tell"):
        detect_dir(model)


@pytest.mark.parametrize("name", ["v3.llava_llama", "v9.future"])
def test_version_comment_this_gateway_does_not_serve(tmp_path, name):
    model = write_model(tmp_path, specials=LLAMA3, template="{# version=" + name + " #}" + T_V30)
    with pytest.raises(ConfigurationError) as info:
        detect_dir(model)
    message = str(info.value)
    assert f"version={name}" in message
    assert "does not serve" in message
    assert "a Functionary template version this gateway does not serve" in message
    assert "v3-llama3.1" in message and "--template-version" in message


# --------------------------------------------------------------------------------------------
# Detection from single tokens (no version comment)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, specials, template",
    [
        ("v3-llama3.1", LLAMA31, T_META),
        ("v3.llama3", LLAMA3, T_V30),
        ("v2.llama3", LLAMA3, T_V25),
        ("v2", MISTRAL_V2, T_V22_BARE),
        ("v1", LLAMA2_V1, ABSENT),  # the v1 models ship no chat template
    ],
)
def test_tokens_decide_without_comment(tmp_path, version, specials, template):
    assert detect_dir(write_model(tmp_path, specials=specials, template=template)) == Version(version)


def test_v25_template_without_comment_is_v2_llama3(tmp_path):
    # The hub's small-v2.5 template has no comment: the Llama-3 tokens and its
    # <|reserved_special_token_249|> decide.
    model = write_model(
        tmp_path, specials=LLAMA3, template=T_V25, special_map={"bos_token": "<|begin_of_text|>"}
    )
    assert detect_dir(model) == Version.V2_LLAMA3


def test_llama3_tokenizer_without_chat_template_is_v3_llama3(tmp_path):
    assert detect_dir(write_model(tmp_path, specials=LLAMA3)) == Version.V3_LLAMA3


def test_llava_template_is_rejected(tmp_path):
    model = write_model(tmp_path, specials=LLAMA3, template=T_LLAVA)
    with pytest.raises(ConfigurationError) as info:
        detect_dir(model)
    message = str(info.value)
    assert "v3.llava_llama" in message and "does not serve" in message
    assert "--template-version" in message


def test_image_url_alone_is_not_llava(tmp_path):
    model = write_model(tmp_path, specials=LLAMA3, template="{{ 'image_url' }}")
    assert detect_dir(model) == Version.V3_LLAMA3


def test_eom_id_with_another_id_is_not_llama31(tmp_path):
    model = write_model(tmp_path, specials={"<s>": 1, "<|eom_id|>": 7}, template=T_META)
    with pytest.raises(ConfigurationError) as info:
        detect_dir(model)
    assert "<|eom_id|> (id 7, not 128008)" in str(info.value)


def test_reserved_249_with_another_id_is_not_llama3(tmp_path):
    specials = {**MISTRAL_V2, "<|reserved_special_token_249|>": 40000}
    assert detect_dir(write_model(tmp_path, specials=specials, template=T_V25)) == Version.V2


def test_order_eom_before_reserved_249(tmp_path):
    # Both markers at their ids (no real tokenizer has that): <|eom_id|> is checked first.
    specials = {**LLAMA3, "<|eom_id|>": 128008}
    del specials["<|reserved_special_token_4|>"]
    assert detect_dir(write_model(tmp_path, specials=specials, template=T_V25)) == Version.V3_LLAMA31


def test_order_from_before_start_of_function_call(tmp_path):
    specials = {**MISTRAL_V2, "<|START_OF_FUNCTION_CALL|>": 32010}
    assert detect_dir(write_model(tmp_path, specials=specials)) == Version.V2


# --------------------------------------------------------------------------------------------
# Where the single tokens come from
# --------------------------------------------------------------------------------------------


def test_model_files_contents(tmp_path):
    model = write_model(
        tmp_path,
        specials=LLAMA31,
        template=T_V32,
        config={"eos_token": {"__type": "AddedToken", "content": "<|eot_id|>"}},
        special_map={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    )
    files = load_model_files(str(model))
    assert files.source == str(model)
    assert files.directory == model
    assert files.chat_template == T_V32
    assert files.eos_token == "<|eot_id|>"
    assert set(LLAMA31) <= files.special_tokens
    assert {t: files.token_ids[t] for t in LLAMA31} == LLAMA31
    assert "<|from|>" not in files.special_tokens
    assert files.files_read == (
        model / "tokenizer_config.json",
        model / "tokenizer.json",
        model / "special_tokens_map.json",
    )


def test_added_tokens_decoder_without_tokenizer_json(tmp_path):
    decoder = {str(i): {"content": t, "special": True} for t, i in LLAMA31.items()}
    model = write_model(tmp_path, config={"added_tokens_decoder": decoder, "eos_token": "<|eot_id|>"})
    files = load_model_files(str(model))
    assert files.token_ids["<|eom_id|>"] == 128008
    assert files.eos_token == "<|eot_id|>"
    assert detect_version(files) == Version.V3_LLAMA31


def test_slow_tokenizer_added_tokens_json_only_v1(tmp_path):
    # functionary-7b-v1.x: tokenizer.model + added_tokens.json, no tokenizer.json, no chat template.
    model = write_model(tmp_path, added_json={t: i for t, i in LLAMA2_V1.items() if i >= 32000})
    files = load_model_files(str(model))
    assert files.files_read == (model / "added_tokens.json",)
    assert files.chat_template is None
    assert detect_version(files) == Version.V1


def test_special_tokens_map_only_v2(tmp_path):
    special_map = {
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "</s>",
        "additional_special_tokens": ["<|from|>", {"content": "<|recipient|>"}, "<|content|>", "<|stop|>"],
    }
    files = load_model_files(str(write_model(tmp_path, special_map=special_map)))
    assert {"<s>", "</s>", "<|from|>", "<|recipient|>", "<|stop|>"} <= files.special_tokens
    assert files.eos_token == "</s>"  # from special_tokens_map.json when tokenizer_config.json has none
    assert "<|from|>" not in files.token_ids  # a name without an id
    assert detect_version(files) == Version.V2


def test_tokenizer_json_ids_win_over_added_tokens_json(tmp_path):
    model = write_model(tmp_path, specials=LLAMA31, added_json={"<|eom_id|>": 5})
    files = load_model_files(str(model))
    assert files.token_ids["<|eom_id|>"] == 128008
    assert detect_version(files) == Version.V3_LLAMA31


def test_marker_as_plain_vocabulary_entry_that_encodes_to_one_token(tmp_path):
    # Not an added token: only the tokenizers library can tell it encodes as one token.
    model = write_model(tmp_path, specials=_LLAMA3_COMMON, vocab_only={"<|eom_id|>": 128008})
    files = load_model_files(str(model))
    assert files.token_ids["<|eom_id|>"] == 128008
    assert detect_version(files) == Version.V3_LLAMA31


def test_marker_in_vocabulary_that_the_pre_tokenizer_splits_is_not_a_single_token(tmp_path):
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    model = write_model(
        tmp_path, specials=_LLAMA3_COMMON, vocab_only={"<|eom_id|>": 128008}, pre_tokenizer=split
    )
    files = load_model_files(str(model))
    assert "<|eom_id|>" not in files.special_tokens
    with pytest.raises(ConfigurationError, match="marker tokens present: none"):
        detect_version(files)


def test_special_token_without_id_gets_it_from_the_vocabulary(tmp_path):
    model = write_model(
        tmp_path,
        specials={"<s>": 1},
        vocab_only={"<|from|>": 32000},
        special_map={"additional_special_tokens": ["<|from|>"]},
    )
    files = load_model_files(str(model))
    assert files.token_ids["<|from|>"] == 32000


def test_added_tokens_only_path_does_not_load_the_tokenizers_library(tmp_path, monkeypatch):
    # The fast path: every marker is an added token or absent from the file → JSON head only.
    def boom(*args, **kwargs):
        raise AssertionError("tokenizers.Tokenizer must not be loaded")

    monkeypatch.setattr(detect, "_resolve_with_tokenizers", boom)
    for version, specials in TOKENIZERS.items():
        files = load_model_files(str(write_model(tmp_path / version, specials=specials)))
        assert set(specials) <= files.special_tokens


def spy_on_json_parses(monkeypatch) -> list[int]:
    """Record the length of every text detect parses added_tokens from."""
    lengths: list[int] = []
    real = detect._parse_added_tokens

    def spy(text):
        lengths.append(len(text))
        return real(text)

    monkeypatch.setattr(detect, "_parse_added_tokens", spy)
    return lengths


def test_large_tokenizer_json_read_from_its_head(tmp_path, monkeypatch):
    # > 256 KiB: only the head is decoded; the markers are found all the same.
    vocab_only = {f"word{i}": 10000 + i for i in range(40000)}
    model = write_model(tmp_path, specials=LLAMA31, vocab_only=vocab_only, template=T_META)
    size = (model / "tokenizer.json").stat().st_size
    assert size > 2 * detect._HEAD_BYTES
    monkeypatch.setattr(detect, "_resolve_with_tokenizers", lambda *a: pytest.fail("library loaded"))
    parses = spy_on_json_parses(monkeypatch)
    assert detect_dir(model) == Version.V3_LLAMA31
    assert parses == [detect._HEAD_BYTES]


def test_tokenizer_json_with_added_tokens_after_the_model(tmp_path, monkeypatch):
    vocab_only = {f"word{i}": 10000 + i for i in range(40000)}
    model = write_model(tmp_path, specials=LLAMA3, vocab_only=vocab_only, template=T_V25)
    data = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    reordered = {"model": data.pop("model"), **data}  # added_tokens now beyond the first 256 KiB
    (model / "tokenizer.json").write_text(
        json.dumps(reordered, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    parses = spy_on_json_parses(monkeypatch)
    files = load_model_files(str(model))
    assert len(parses) == 2 and parses[1] > detect._HEAD_BYTES  # the head, then the whole file
    assert files.token_ids["<|reserved_special_token_249|>"] == 128254
    assert detect_version(files) == Version.V2_LLAMA3


def test_head_cut_inside_a_multibyte_character(tmp_path, monkeypatch):
    vocab_only = {f"ĠwörtÇ{i}": 10000 + i for i in range(30000)}
    model = write_model(tmp_path, specials=LLAMA31, vocab_only=vocab_only)
    raw = (model / "tokenizer.json").read_bytes()
    # Put the head boundary on a UTF-8 continuation byte: the head must be cut before that character.
    boundary = next(i for i in range(len(raw) // 2, len(raw)) if raw[i] & 0xC0 == 0x80)
    monkeypatch.setattr(detect, "_HEAD_BYTES", boundary)
    parses = spy_on_json_parses(monkeypatch)
    assert detect_dir(model) == Version.V3_LLAMA31
    assert len(parses) == 1 and parses[0] < boundary


def test_invalid_json_inside_added_tokens_of_a_large_file(tmp_path):
    model = write_model(tmp_path, specials=LLAMA3, vocab_only={f"w{i}": 10000 + i for i in range(30000)})
    raw = (model / "tokenizer.json").read_bytes()
    broken = raw.replace(b'"content": "<|eot_id|>"', b'"content": <|eot_id|>"', 1)
    assert broken != raw and len(broken) > detect._HEAD_BYTES
    (model / "tokenizer.json").write_bytes(broken)
    with pytest.raises(
        ConfigurationError, match=r"Cannot read .*tokenizer\.json: not a valid tokenizer\.json"
    ):
        load_model_files(str(model))


# --------------------------------------------------------------------------------------------
# chat_template shapes and files
# --------------------------------------------------------------------------------------------


def test_chat_template_list_uses_default(tmp_path):
    templates = [{"name": "tool_use", "template": T_V31}, {"name": "default", "template": T_V32}]
    files = load_model_files(str(write_model(tmp_path, specials=LLAMA31, template=templates)))
    assert files.chat_template == T_V32
    assert detect_version(files) == Version.V3_LLAMA3


def test_chat_template_list_without_default_uses_first(tmp_path):
    templates = [{"name": "rag", "template": T_V31}, {"name": "tool_use", "template": T_V32}]
    files = load_model_files(str(write_model(tmp_path, specials=LLAMA31, template=templates)))
    assert files.chat_template == T_V31


def test_chat_template_empty_list_and_null(tmp_path):
    assert load_model_files(str(write_model(tmp_path / "a", template=[]))).chat_template is None
    assert load_model_files(str(write_model(tmp_path / "b", template=None))).chat_template is None


@pytest.mark.parametrize("bad", [[{"name": "default"}], ["{{ x }}"], 42])
def test_chat_template_of_unexpected_shape(tmp_path, bad):
    with pytest.raises(ConfigurationError, match="chat_template"):
        load_model_files(str(write_model(tmp_path, template=bad)))


def test_chat_template_jinja_file_when_config_has_none(tmp_path):
    model = write_model(tmp_path, specials=LLAMA31, config={})
    (model / "chat_template.jinja").write_text(T_V32, encoding="utf-8")
    files = load_model_files(str(model))
    assert files.chat_template == T_V32
    assert model / "chat_template.jinja" in files.files_read
    assert detect_version(files) == Version.V3_LLAMA3
    # tokenizer_config.json's own template comes first
    write_model(model, template=T_V31)
    assert load_model_files(str(model)).chat_template == T_V31


def test_chat_template_json_file(tmp_path):
    model = write_model(tmp_path, specials=LLAMA31)
    (model / "chat_template.json").write_text(json.dumps({"chat_template": T_V32}), encoding="utf-8")
    assert detect_dir(model) == Version.V3_LLAMA3


# --------------------------------------------------------------------------------------------
# Missing and broken files
# --------------------------------------------------------------------------------------------


def test_only_tokenizer_config(tmp_path):
    model = write_model(tmp_path, template=T_V32)
    files = load_model_files(str(model))
    assert files.files_read == (model / "tokenizer_config.json",)
    assert files.special_tokens == frozenset() and dict(files.token_ids) == {}
    assert detect_version(files) == Version.V3_LLAMA3


def test_only_tokenizer_json(tmp_path):
    model = write_model(tmp_path, specials=MISTRAL_V2)
    files = load_model_files(str(model))
    assert files.chat_template is None and files.eos_token is None
    assert files.files_read == (model / "tokenizer.json",)
    assert detect_version(files) == Version.V2


def test_empty_directory_loads_and_then_cannot_be_detected(tmp_path):
    files = load_model_files(str(tmp_path))
    assert files == ModelFiles(source=str(tmp_path), directory=tmp_path, chat_template=None)
    with pytest.raises(ConfigurationError) as info:
        detect_version(files)
    message = str(info.value)
    assert "no chat template" in message
    assert "no tokenizer file" in message
    assert "tokenizer_config.json, tokenizer.json, special_tokens_map.json, added_tokens.json" in message
    # ... but an override still serves it
    assert detect_version(files, "v2") == Version.V2


@pytest.mark.parametrize(
    "name", ["tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json"]
)
def test_malformed_json_names_the_file(tmp_path, name):
    (tmp_path / name).write_text('{"chat_template": "x", ', encoding="utf-8")
    with pytest.raises(ConfigurationError, match=rf"Cannot read .*{name}"):
        load_model_files(str(tmp_path))


def test_json_of_the_wrong_type_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"tokenizer_config\.json should hold a JSON object"):
        load_model_files(str(tmp_path))


def test_truncated_tokenizer_json(tmp_path):
    model = write_model(tmp_path, specials=LLAMA3)
    raw = (model / "tokenizer.json").read_bytes()
    (model / "tokenizer.json").write_bytes(raw[: raw.index(b'"added_tokens"') + 60])
    with pytest.raises(ConfigurationError, match="not a valid tokenizer.json"):
        load_model_files(str(model))


# --------------------------------------------------------------------------------------------
# Override
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_override_wins(tmp_path, version):
    model = write_model(tmp_path, specials=LLAMA31, template=T_V31)
    assert detect_dir(model, override=version) == Version(version)
    assert detect_dir(model, override=f" {version}\n") == Version(version)
    assert detect_dir(model, override=Version(version)) == Version(version)


def test_override_wins_over_an_unserved_template(tmp_path):
    model = write_model(tmp_path, specials=LLAMA3, template=T_LLAVA)
    assert detect_dir(model, override="v3.llama3") == Version.V3_LLAMA3


@pytest.mark.parametrize("bad", ["v3", "V2", "v3.llava_llama", "llama3", ""])
def test_override_invalid(tmp_path, bad):
    files = ModelFiles(source="m", directory=None, chat_template=T_V32)
    with pytest.raises(ConfigurationError) as info:
        detect_version(files, bad)
    message = str(info.value)
    assert "--template-version" in message and repr(bad) in message
    assert all(v in message for v in ALL_VERSIONS)


# --------------------------------------------------------------------------------------------
# The "cannot tell" message
# --------------------------------------------------------------------------------------------


def test_unknown_model_error_text(tmp_path):
    model = write_model(
        tmp_path, specials={**PLAIN, "<|python_tag|>": 9}, template=T_META, special_map={"eos_token": "</s>"}
    )
    with pytest.raises(ConfigurationError) as info:
        detect_dir(model)
    message = str(info.value)
    assert message.startswith(f"Cannot tell which Functionary template version {str(model)!r} uses.")
    assert "a chat template without a {# version=... #} comment" in message
    assert "marker tokens present: none" in message
    for marker in ("<|eom_id|>", "<|reserved_special_token_249|>", "<|from|>", "<|START_OF_FUNCTION_CALL|>"):
        assert marker in message
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        assert str(model / name) in message
    assert f"not found in {model}: added_tokens.json" in message
    assert "Accepted versions: v1, v2, v2.llama3, v3.llama3, v3-llama3.1." in message
    assert "--template-version VERSION" in message


def test_unknown_model_error_lists_markers_present(tmp_path):
    files = ModelFiles(
        source="x",
        directory=None,
        chat_template=None,
        special_tokens=frozenset({"<|eom_id|>", "<|reserved_special_token_249|>"}),
        token_ids={"<|reserved_special_token_249|>": 12},
    )
    with pytest.raises(ConfigurationError) as info:
        detect_version(files)
    message = str(info.value)
    assert (
        "<|eom_id|> (id unknown, not 128008), <|reserved_special_token_249|> (id 12, not 128254)" in message
    )
    assert "no chat template" in message and "files read: no directory" in message


# --------------------------------------------------------------------------------------------
# --model that is neither a directory nor a hub id
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model", ["./no/such/dir", "/no/such/dir", "a/b/c", "~/missing-model-dir", "bad name"]
)
def test_missing_directory_that_is_no_hub_id(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError) as info:
        load_model_files(model, download=no_download)
    message = str(info.value)
    assert repr(model) in message and "no such directory" in message and "hub id" in message


def test_model_that_is_a_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="is a file"):
        load_model_files(str(tmp_path / "tokenizer.json"), download=no_download)


def test_local_directory_wins_over_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_model(tmp_path / "meetkai" / "functionary-small-v3.2", specials=LLAMA31, template=T_V32)
    files = load_model_files("meetkai/functionary-small-v3.2", download=no_download)
    assert files.directory == Path("meetkai/functionary-small-v3.2")
    assert detect_version(files) == Version.V3_LLAMA3


# --------------------------------------------------------------------------------------------
# Hub ids through the `download` seam
# --------------------------------------------------------------------------------------------


def test_hub_id_through_fake_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snapshot = write_model(tmp_path / "snapshot", specials=LLAMA31, template=T_V32)
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    files = load_model_files(
        "meetkai/functionary-small-v3.2", revision="v1.0", token="hf_not_a_token", download=fake_download
    )
    assert len(calls) == 1
    repo_id, kwargs = calls[0]
    assert repo_id == "meetkai/functionary-small-v3.2"
    assert kwargs["revision"] == "v1.0" and kwargs["token"] == "hf_not_a_token"
    assert set(detect.TOKENIZER_FILES) <= set(kwargs["allow_patterns"])
    assert not any(p.endswith((".safetensors", ".bin", ".gguf", "*")) for p in kwargs["allow_patterns"])
    assert files.source == "meetkai/functionary-small-v3.2"
    assert files.directory == snapshot
    assert detect_version(files) == Version.V3_LLAMA3


def test_hub_id_defaults_passed_to_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(write_model(tmp_path / "snap", specials=MISTRAL_V2))

    assert detect_version(load_model_files("functionary-7b-v2", download=fake_download)) == Version.V2
    assert seen["repo_id"] == "functionary-7b-v2" and seen["revision"] is None and seen["token"] is None


def _hub_error(
    cls, message="404 Client Error.\nRepository Not Found for url: https://example.invalid/api/models/x"
):
    error = cls.__new__(cls)  # huggingface_hub's HTTP errors want a live response object
    Exception.__init__(error, message)
    return error


@pytest.mark.parametrize(
    "error, cause",
    [
        (_hub_error(hf_utils.GatedRepoError), "gated"),
        (_hub_error(hf_utils.RepositoryNotFoundError), "no such model"),
        (_hub_error(hf_utils.RevisionNotFoundError), "the revision does not exist"),
        (ConnectionError("network unreachable"), None),
    ],
)
def test_download_failure_message(tmp_path, monkeypatch, error, cause):
    monkeypatch.chdir(tmp_path)

    def failing_download(repo_id, **kwargs):
        raise error

    secret = "hf_SECRETsecretSECRET"
    with pytest.raises(ConfigurationError) as info:
        load_model_files(
            "meetkai/functionary-medium-v3.1", revision="main", token=secret, download=failing_download
        )
    message = str(info.value)
    assert secret not in message and secret not in repr(info.value.__cause__)
    assert "hub model 'meetkai/functionary-medium-v3.1' at revision 'main'" in message
    assert type(error).__name__ in message
    assert "not a local directory either" in message
    assert "HF_TOKEN" in message and "local directory" in message and "check the model id" in message
    if cause:
        assert cause in message
    assert info.value.__cause__ is error


def test_download_returning_no_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="not a directory"):
        load_model_files("org/name", download=lambda repo_id, **kw: str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------
# Hub ids through the real huggingface_hub.snapshot_download, offline, on a fake cache
# --------------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HOME / HF_HUB_CACHE in tmp_path and HF_HUB_OFFLINE=1.

    huggingface_hub reads these variables when it is imported, so the module constants are patched too
    (test_env_variables_are_honoured_by_a_fresh_process checks the variables alone, in a new process).
    """
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache


def cache_model(cache: Path, repo_id: str, **files) -> Path:
    """The layout snapshot_download leaves: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT, encoding="utf-8")  # no newline, as huggingface_hub writes it
    return write_model(repo / "snapshots" / COMMIT, **files)


@pytest.mark.parametrize("revision", [None, COMMIT])
def test_hub_id_resolved_by_real_snapshot_download_offline(offline_hub, revision):
    snapshot = cache_model(offline_hub, "meetkai/functionary-small-v2.5", specials=LLAMA3, template=T_V25)
    files = load_model_files("meetkai/functionary-small-v2.5", revision=revision)
    assert files.directory.resolve() == snapshot.resolve()
    assert files.source == "meetkai/functionary-small-v2.5"
    assert detect_version(files) == Version.V2_LLAMA3


def test_missing_hub_model_offline(offline_hub):
    cache_model(offline_hub, "meetkai/functionary-small-v2.5", specials=LLAMA3, template=T_V25)
    with pytest.raises(ConfigurationError) as info:
        load_model_files("meetkai/functionary-small-v3.1")
    message = str(info.value)
    assert "hub model 'meetkai/functionary-small-v3.1'" in message
    assert "HF_HUB_OFFLINE is set" in message and str(offline_hub) in message
    assert "HF_TOKEN" in message and "local directory" in message


def test_missing_revision_offline(offline_hub):
    cache_model(offline_hub, "meetkai/functionary-small-v2.5", specials=LLAMA3, template=T_V25)
    with pytest.raises(ConfigurationError, match="at revision 'other-branch'"):
        load_model_files("meetkai/functionary-small-v2.5", revision="other-branch")


def test_env_variables_are_honoured_by_a_fresh_process(tmp_path):
    home = tmp_path / "hf-home"
    cache_model(home / "hub", "meetkai/functionary-medium-v3.1", specials=LLAMA31, template=T_V31)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    script = (
        "from tgi_gateway.prompting.detect import load_model_files, detect_version\n"
        "print(detect_version(load_model_files('meetkai/functionary-medium-v3.1')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "v3-llama3.1"
