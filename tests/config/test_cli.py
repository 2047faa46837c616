"""`python3 server_tgi.py ...` as a user runs it: a real process, a model directory, the TGI double."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.fakes.tgi import EOT, FakeTGI, tokens
from tests.gateway_process import run_cli, start_gateway

ROOT = Path(__file__).resolve().parents[2]


def test_serves_a_local_model_directory(model_dir: Path) -> None:
    with FakeTGI(script=tokens("Hello", "!", EOT)) as tgi:
        started = time.monotonic()
        proc, url = start_gateway(
            "--model", str(model_dir), "--served-model-name", "fn", "--endpoint", tgi.url
        )
        try:
            ready = time.monotonic() - started
            with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
                r = client.chat.completions.create(model="fn", messages=[{"role": "user", "content": "Hi"}])
            assert r.choices[0].message.content == "Hello!"
            assert tgi.last_generation.inputs.startswith("<|start_header_id|>system<|end_header_id|>")
            assert ready < 10
        finally:
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out
        assert "v3-llama3.1" in out


def test_missing_model_flag_exits_2() -> None:
    r = run_cli()
    assert r.returncode == 2 and "--model" in r.stderr


def test_bad_flag_values_exit_2(model_dir: Path) -> None:
    r = run_cli("--model", str(model_dir), "--endpoint", "ftp://x")
    assert r.returncode == 2 and "--endpoint" in r.stderr and "http" in r.stderr


def test_request_timeout_flag_environment_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from tgi_gateway.cli import build_parser
    from tgi_gateway.settings import Settings

    def settings(*argv: str) -> Settings:
        args = build_parser().parse_args(["--model", "m", *argv])
        return Settings(**{k: v for k, v in vars(args).items() if v is not None})  # as cli.main does

    assert settings().request_timeout == 600.0  # the OpenAI SDK's own default total timeout
    monkeypatch.setenv("TGI_GATEWAY_REQUEST_TIMEOUT", "90")
    assert settings().request_timeout == 90.0
    assert settings("--request-timeout", "2.5").request_timeout == 2.5  # the flag wins


def test_help_shows_each_flag_with_the_default_of_its_setting() -> None:
    from tgi_gateway.settings import Settings

    r = run_cli("--help")
    text = re.sub(r"\s+", " ", re.sub(r"-\n\s+", "-", r.stdout))  # argparse wraps long values at dashes
    assert r.returncode == 0, r.stderr
    assert "--port PORT port to listen on (default: 8000)" in text
    assert f"--tgi-image TGI_IMAGE TGI image (default: {Settings.model_fields['tgi_image'].default})" in text
    assert "--max-concurrent-per-key N requests in flight per key and worker process; over it: 429 " in text
    assert "(default: unlimited)" in text and "--no-launch never start TGI" in text


def test_launch_spec_takes_every_launch_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from tgi_gateway.cli import launch_spec
    from tgi_gateway.container_manager import LaunchSpec
    from tgi_gateway.settings import Settings

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    settings = Settings(
        model="org/m", endpoint="http://127.0.0.1:8081", revision="r", tgi_image="img:1", gpus="1",
        tgi_publish_host="0.0.0.0", hf_cache="~/cache", max_input_tokens=10, max_total_tokens=20, num_shard=2,
        quantize="awq", dtype="bfloat16", tgi_args=["--x"], startup_timeout=5, keep_tgi=True,
        lora_adapters="a,b=/p", max_top_n_tokens=10,
    )  # fmt: skip
    assert launch_spec(settings) == LaunchSpec(
        model="org/m", endpoint="http://127.0.0.1:8081", image="img:1", gpus="1", publish_host="0.0.0.0",
        hf_cache=Path("~/cache").expanduser(), hf_token="hf_x", revision="r", max_input_tokens=10,
        max_total_tokens=20, num_shard=2, quantize="awq", dtype="bfloat16", extra_args=("--x",),
        lora_adapters=("a", "b=/p"), max_top_n_tokens=10, startup_timeout=5.0, keep=True,
    )  # fmt: skip
    assert launch_spec(Settings(model="org/m")).max_top_n_tokens is None, "TGI's default needs no flag"


def test_bad_request_timeout_exits_2(model_dir: Path) -> None:
    r = run_cli("--model", str(model_dir), "--request-timeout", "0")
    assert r.returncode == 2 and "--request-timeout" in r.stderr


def test_not_a_functionary_model_exits_2(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    r = run_cli("--model", str(tmp_path))
    assert r.returncode == 2
    assert "v3-llama3.1" in r.stderr and "--template-version" in r.stderr


def test_sigterm_lets_in_flight_streams_finish(model_dir: Path) -> None:
    import threading

    with FakeTGI(script=tokens(*[f" w{i}" for i in range(20)], EOT), token_delay=0.05) as tgi:
        proc, url = start_gateway("--model", str(model_dir), "--endpoint", tgi.url, "--shutdown-grace", "10")
        try:
            got: list[str] = []

            def consume() -> None:
                with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
                    for chunk in client.chat.completions.create(
                        model=str(model_dir), messages=[{"role": "user", "content": "Hi"}], stream=True
                    ):
                        got.extend(c.delta.content or "" for c in chunk.choices)

            reader = threading.Thread(target=consume)
            reader.start()
            assert tgi.wait_until(lambda: tgi.streams_open == 1, 5)
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)  # mid-stream: about 0.8 s of tokens still to come
            time.sleep(0.2)
            with pytest.raises(httpx.TransportError):
                httpx.get(url + "/health", timeout=1)  # no longer accepting
            reader.join(10)
            out, _ = proc.communicate(timeout=15)
        finally:
            proc.kill()
    assert "".join(got) == "".join(f" w{i}" for i in range(20)).strip(), "the stream finished"
    assert proc.returncode == 0, out


def test_workers_serve_from_several_processes(model_dir: Path) -> None:
    with FakeTGI(script=tokens("Hello", "!", EOT)) as tgi:
        proc, url = start_gateway("--model", str(model_dir), "--served-model-name", "fn", "--endpoint", tgi.url,
                                  "--workers", "2", "--shutdown-grace", "2")  # fmt: skip
        try:
            with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
                for _ in range(6):
                    r = client.chat.completions.create(
                        model="fn", messages=[{"role": "user", "content": "Hi"}]
                    )
                    assert r.choices[0].message.content == "Hello!"
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            workers = [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
            assert len(workers) == 2, children
            assert tgi.last_generation.inputs.startswith("<|start_header_id|>system"), (
                "workers use the template"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out


def test_the_server_process_tunes_the_collector_and_create_app_does_not() -> None:
    code = (
        "import gc\n"
        "from tgi_gateway.server.app import create_app\nfrom tgi_gateway.server.process import tune_gc\n"
        "from tgi_gateway.prompting import Template\n"
        "from tgi_gateway.settings import Settings\n"
        "before = gc.get_threshold()\n"
        "app = create_app(Settings(model='m', endpoint='http://127.0.0.1:9'), Template('v3-llama3.1'))\n"
        "assert gc.get_threshold() == before and gc.get_freeze_count() == 0\n"
        "tune_gc()\n"
        "print(gc.get_threshold(), gc.get_freeze_count() > 10_000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["(10000,", "10,", "10)", "True"]


# What start-up imports: huggingface_hub only to fetch a hub model's tokenizer files, docker only to launch TGI
# (each costs 0.1-0.2 s of start-up). The CLI's `main` runs in a fresh interpreter up to the point of serving.
IMPORTS = """
import sys
from tgi_gateway import cli

def serve(settings, template):
    import uvicorn, tgi_gateway.server.app  # what serving imports; nothing is served
    return 0

cli._serve = serve
status = cli.main(sys.argv[1:])
packages = {name.split(".")[0] for name in sys.modules}
print(status, sorted(packages & {"huggingface_hub", "docker", "tokenizers"}))
"""


def imported_at_start_up(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", IMPORTS, *args]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, env=env)
    return r.stdout.strip().splitlines()[-1]


def test_start_up_imports_neither_huggingface_hub_nor_docker_when_not_needed(model_dir: Path) -> None:
    assert imported_at_start_up("--model", "m", "--template-version", "v3-llama3.1", "--no-launch") == "0 []"
    with FakeTGI() as tgi:  # TGI answers at --endpoint: no launch; detection from a local directory
        assert imported_at_start_up("--model", str(model_dir), "--endpoint", tgi.url) == "0 []"
    # a hub id needs huggingface_hub (offline here: the files are not cached, so it stops with status 2)
    assert imported_at_start_up("--model", "org/not-cached", "--no-launch") == "2 ['huggingface_hub']"


def test_with_several_endpoints_the_gateway_never_launches_tgi(model_dir: Path) -> None:
    """Several replicas are the operator's: nothing answers at two local endpoints, yet no Docker call (docker
    is not even imported) and the gateway serves; one silent local endpoint is what makes it launch."""
    dead = "http://127.0.0.1:9"
    assert imported_at_start_up("--model", str(model_dir), "--endpoint", f"{dead},http://127.0.0.1:10") == "0 []"
    assert "docker" in imported_at_start_up("--model", str(model_dir), "--endpoint", dead)
