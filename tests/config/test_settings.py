"""Settings as the one source of configuration: the command line derived from the fields, the documentation's
flag tables and variable names checked against them, settings.py a leaf module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tgi_gateway.cli import build_parser, default_text, flag_name, flag_of
from tgi_gateway.prompting.types import Version
from tgi_gateway.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
FIELDS = Settings.model_fields
FLAGGED = {name: field for name, field in FIELDS.items() if flag_of(field).action is not None}


def test_settings_imports_only_the_template_versions_from_the_gateway() -> None:
    tree = ast.parse((ROOT / "tgi_gateway" / "settings.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert {name for name in imported if name.startswith((".", "tgi_gateway"))} == {".prompting.types"}


def test_every_field_is_described_and_every_flag_or_variable_is_unique() -> None:
    assert all(field.description for field in FIELDS.values())
    flags = [flag_name(name, field) for name, field in FLAGGED.items()]
    assert len(flags) == len(set(flags))
    assert set(FIELDS) - set(FLAGGED) == {"tgi_api_key"}, "a secret on the command line would show in ps"


def test_the_parser_is_derived_from_the_fields() -> None:
    actions = {a.dest: a for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    assert set(actions) == set(FLAGGED)
    for name, field in FLAGGED.items():
        action = actions[name]
        assert action.option_strings == [flag_name(name, field)]
        assert action.default is None, "a flag not typed leaves the field to its variable, then its default"
        shown = default_text(field)
        assert action.help == f"{field.description} ({'required' if shown is None else f'default: {shown}'})"
    assert actions["template_version"].choices == [v.value for v in Version]
    assert actions["log_format"].choices == ["text", "json"]
    assert (actions["port"].type, actions["connect_timeout"].type) == (int, float)
    groups = {g.title: [a.dest for a in g._group_actions] for g in build_parser()._action_groups}
    assert groups["access control (see docs/operations.md)"][0] == "api_keys"
    assert groups["launching TGI with Docker (when nothing answers at a local --endpoint)"][-1] == "keep_tgi"


@pytest.mark.parametrize(
    "name,shown",
    [("model", None), ("port", "8000"), ("connect_timeout", "2"), ("max_body_bytes", "4194304"),
     ("protect_health", "off"), ("launch", "off"), ("api_keys", "none"),
     ("max_concurrent_per_key", "unlimited")],
)  # fmt: skip
def test_defaults_are_shown_from_the_fields(name: str, shown: str | None) -> None:
    assert default_text(FIELDS[name]) == shown


def test_help_lists_the_variables_named_otherwise_and_the_environment_only_ones() -> None:
    epilog = build_parser().epilog or ""
    for variable, flag in (("API_KEYS", "--api-key"), ("LAUNCH", "--no-launch"), ("TGI_ARGS", "--tgi-arg")):
        assert f"{ENV_PREFIX}{variable} for {flag}" in epilog
    assert f"{ENV_PREFIX}TGI_API_KEY, {FIELDS['tgi_api_key'].description}" in epilog


def test_settings_survive_the_worker_environment_with_every_field_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-file\n")
    values = {
        "model": "org/m", "served_model_name": "fn", "endpoint": ["http://10.0.0.1:81,http://tgi.svc:82"],
        "host": "0.0.0.0",
        "port": 8001, "template_version": Version.V2, "revision": "r1", "tgi_api_key": "tk",
        "connect_timeout": 2.5, "first_token_timeout": 3.0, "read_timeout": 4.0, "request_timeout": 5.0,
        "connect_retries": 4, "log_level": "debug", "log_format": "json", "shutdown_grace": 6.0,
        "drain_seconds": 1.5, "workers": 3, "max_body_bytes": 1024, "api_keys": ["sk-a", "sk-b"],
        "api_key_file": str(keys), "max_concurrent_per_key": 2, "protect_health": True, "launch": False,
        "tgi_image": "localhost:5000/tgi:1", "gpus": "0,1", "tgi_publish_host": "0.0.0.0", "hf_cache": "/c",
        "max_input_tokens": 100, "max_total_tokens": 200, "num_shard": 2, "quantize": "awq",
        "dtype": "bfloat16",
        "tgi_args": ["--x", "1"], "startup_timeout": 7.0, "keep_tgi": True,
        "max_head_bytes": 4096, "max_headers": 20, "head_timeout": 2.0, "body_timeout": 3.0,
        "keep_alive_timeout": 4.0, "max_connections": 50, "lora_adapters": ["org/a@v1", "b=/p"],
        "max_top_n_tokens": 10, "grammar": False, "redis_url": "redis://127.0.0.1:6390/1",
        "health_interval": 0.5, "resolve_interval": 3.0, "eject_seconds": 0.25, "eject_max_seconds": 8.0,
        "affinity": False, "affinity_load_factor": 1.5,
        "data_dir": str(tmp_path / "data"), "response_store": "postgresql://u:p@db:5432/gw", "response_ttl": 60.0,
    }  # fmt: skip
    assert set(values) == set(FIELDS), "every field is set"
    settings = Settings(**values)
    assert all(getattr(settings, name) != field.default for name, field in FIELDS.items()), (
        "none at its default"
    )
    for name, value in settings.as_environment().items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings
    assert settings.endpoint == ("http://10.0.0.1:81", "http://tgi.svc:82")


@pytest.mark.parametrize(
    "given,endpoints",
    [
        ("http://127.0.0.1:8080/", ("http://127.0.0.1:8080",)),  # one URL: as before
        ("http://a:1, http://b:2,", ("http://a:1", "http://b:2")),  # comma-separated
        (["http://a:1", "http://b:2,http://c:3"], ("http://a:1", "http://b:2", "http://c:3")),  # repeated
        (["http://a:1", "http://a:1/"], ("http://a:1",)),  # the same replica once
    ],
)
def test_endpoints_are_repeatable_and_comma_separated_and_survive_the_environment(
    given: str | list[str], endpoints: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(model="m", endpoint=given)
    assert settings.endpoint == endpoints
    for name, value in settings.as_environment().items():
        monkeypatch.setenv(name, value)
    assert Settings().endpoint == endpoints
    monkeypatch.setenv("TGI_GATEWAY_ENDPOINT", ",".join(endpoints))  # as an operator writes it
    assert Settings().endpoint == endpoints


def test_the_endpoint_flag_repeats_and_takes_commas() -> None:
    args = build_parser().parse_args(["--endpoint", "http://a:1,http://b:2", "--endpoint", "http://c:3"])
    assert Settings(model="m", endpoint=args.endpoint).endpoint == ("http://a:1", "http://b:2", "http://c:3")


@pytest.mark.parametrize("bad", ["", "ftp://a", "http://a:1,ftp://b", "[1]"])
def test_bad_endpoints_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Settings(model="m", endpoint=bad)


@pytest.mark.parametrize(
    "argv,env,expected",
    [
        ([], {"LAUNCH": "false"}, {"launch": False}),
        (["--no-launch"], {"LAUNCH": "true"}, {"launch": False}),
        ([], {"KEEP_TGI": "true", "PROTECT_HEALTH": "1"}, {"keep_tgi": True, "protect_health": True}),
        (["--tgi-arg=--a", "--tgi-arg", "b"], {"TGI_ARGS": '["--c"]'}, {"tgi_args": ("--a", "b")}),
        ([], {"TGI_ARGS": '["--c", "2"]'}, {"tgi_args": ("--c", "2")}),
        (["--template-version", "v2"], {"TEMPLATE_VERSION": "v1"}, {"template_version": Version.V2}),
        (["--port", "9000"], {"PORT": "9001", "HOST": "::1"}, {"port": 9000, "host": "::1"}),
        (
            ["--lora-adapters", "a,b=/p", "--lora-adapters=c@v1"],
            {"LORA_ADAPTERS": "d"},
            {"lora_adapters": ("a", "b=/p", "c@v1")},
        ),
        ([], {"LORA_ADAPTERS": " org/a@v1 , b = /p ,, "}, {"lora_adapters": ("org/a@v1", "b=/p")}),
        ([], {"LORA_ADAPTERS": '["a", "b=/p"]'}, {"lora_adapters": ("a", "b=/p")}),
        ([], {"LORA_ADAPTERS": ""}, {"lora_adapters": ()}),
    ],
)
def test_flags_win_over_variables(
    argv: list[str], env: dict[str, str], expected: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(ENV_PREFIX + name, value)
    args = build_parser().parse_args(["--model", "m", *argv])
    settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})  # as cli.main does
    assert {name: getattr(settings, name) for name in expected} == expected


def test_lora_adapters_are_parsed_as_tgi_parses_them() -> None:
    settings = Settings(model="m", lora_adapters=["org/sql@v2", "local=/x/y@r", "plain"])
    assert [(a.name, a.path, a.revision) for a in settings.adapters] == [
        ("org/sql", None, "v2"), ("local", "/x/y", "r"), ("plain", None, None),
    ]  # fmt: skip
    assert [a.source for a in settings.adapters] == ["org/sql", "/x/y", "plain"]
    assert settings.model_names == ("m", "org/sql", "local", "plain")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lora-adapters", "a,a=/p"], "--lora-adapters: the adapter name 'a' is given more than once"),
        (["--lora-adapters", "m"], "--lora-adapters: the adapter name 'm' is the model's name"),
        (["--served-model-name", "fn", "--lora-adapters", "fn@v1"], "adapter name 'fn' is the model's name"),
        (["--lora-adapters", "a=b=c"], "LoRA adapter 'a=b=c': at most one '=' (name=path) and one '@'"),
        (["--lora-adapters", "a=@v1"], "LoRA adapter 'a=@v1': no path after '='"),
        (["--lora-adapters", "a@"], "LoRA adapter 'a@': no revision after '@'"),
        (["--lora-adapters", "../etc"], "LoRA adapter '../etc': the name must be letters, digits"),
        (["--lora-adapters", "a b"], "LoRA adapter 'a b': the name must be"),
        (["--lora-adapters", "org//x"], "LoRA adapter 'org//x': the name must be"),
        (["--lora-adapters", "x" * 129], "at most 128 characters"),
    ],
)
def test_bad_lora_adapters_are_refused_with_the_flag_named(argv: list[str], message: str) -> None:
    from pydantic import ValidationError

    from tgi_gateway.cli import settings_errors

    args = build_parser().parse_args(["--model", "m", *argv])
    given = {k: v for k, v in vars(args).items() if v is not None}
    with pytest.raises(ValidationError) as refused:
        Settings(**given)
    [line] = settings_errors(refused.value, given)
    assert line.startswith("error: --lora-adapters: ") and message in line, line


# --- The documentation ------------------------------------------------------------------------------------


def flag_rows(path: Path, heading: str) -> list[dict[str, str]]:
    """The rows of the Markdown tables whose first column is ``flag``, in the section `heading` of `path`,
    each as {column header: cell}."""
    section = path.read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    rows: list[dict[str, str]] = []
    header: list[str] = []
    for line in section.splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not header:
            header = cells
        elif set(line) <= set("|-: "):
            continue
        elif header[0] == "flag":
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def documented_defaults(cell: str, count: int) -> list[str | None]:
    """A default cell as written for `count` flags (``a / b`` or ``a, b`` for two), without backticks or an
    explanation in parentheses; None for ``(required)``."""
    parts = re.split(r" / |, ", cell) if count > 1 else [cell]
    if len(parts) != count:
        parts = [cell] * count
    values = [part.replace("`", "").strip() for part in parts]
    return [None if value == "(required)" else value.split(" (", 1)[0] for value in values]


@pytest.mark.parametrize(
    "path,heading", [("README.md", "## Flags"), ("docs/operations.md", "## Flags and environment")]
)
def test_documented_flags_and_defaults_are_the_settings(path: str, heading: str) -> None:
    fields = {flag_name(name, field): name for name, field in FLAGGED.items()}
    seen = []
    for row in flag_rows(ROOT / path, heading):
        flags = re.findall(r"`(--[a-z0-9-]+)`", row["flag"])
        assert flags, row
        unknown = [flag for flag in flags if flag not in fields]
        assert not unknown, f"{path} documents flags the gateway does not have: {unknown}"
        seen += flags
        defaults = documented_defaults(row["default"], len(flags))
        for flag, documented in zip(flags, defaults, strict=True):
            assert documented == default_text(FIELDS[fields[flag]]), f"{path}: the default of {flag}"
        if "env" in row:  # the variables the row spells out are the flags' own
            variables = set(re.findall(rf"{ENV_PREFIX}[A-Z0-9_]+", row["env"]))
            own = {ENV_PREFIX + fields[flag].upper() for flag in flags}
            assert variables <= own and (len(flags) > 1 or variables == own), f"{path}: {row['env']}"
    assert sorted(seen) == sorted(fields), f"{path} documents every flag once"


def test_every_variable_the_documentation_names_is_a_setting() -> None:
    documents = [ROOT / name for name in ("README.md", ".env.example", "Dockerfile", "compose.yaml")]
    for document in [*documents, *(ROOT / "docs").glob("*.md")]:
        for variable in re.findall(rf"{ENV_PREFIX}[A-Z0-9_]+", document.read_text()):
            assert variable.removeprefix(ENV_PREFIX).lower() in FIELDS, f"{document.name}: {variable}"
    for name in set(FIELDS) - set(FLAGGED):  # a variable without a flag is documented by name
        for document in ("README.md", "docs/operations.md"):
            assert ENV_PREFIX + name.upper() in (ROOT / document).read_text(), document


def test_env_example_lists_the_template_versions() -> None:
    line = next(
        line for line in (ROOT / ".env.example").read_text().splitlines() if "template version" in line
    )
    assert re.search(r"\((.*)\)", line)[1].split(", ") == [v.value for v in Version]  # type: ignore[index]
