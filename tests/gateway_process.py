"""The gateway as a user runs it, for the tests: ``server_tgi.py`` in a process of its own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
V31_TEMPLATE = "{# version=v3-llama3.1 #}{%- for message in messages %}...{%- endfor %}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "server_tgi.py"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def start_gateway(*args: str) -> tuple[subprocess.Popen[str], str]:
    """`server_tgi.py *args --port <free>` as a user runs it; returns once its /health is 200 (≤ 30 s)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "server_tgi.py"), *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the gateway did not become ready:\n{proc.communicate()[0]}")


def write_model_dir(path: Path) -> Path:
    """A model directory whose tokenizer config names the v3-llama3.1 template (no tokenizer: the version is
    read from the template's comment)."""
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": V31_TEMPLATE}))
    return path


def read_until(proc: subprocess.Popen[str], text: str, count: int = 1, timeout: float = 30) -> str:
    """Read the gateway's output line by line until ``text`` has appeared in ``count`` lines (each worker of
    ``--workers N`` logs its own start-up); returns what was read, so the caller can prepend it to the rest
    of the output. Fails after ``timeout`` seconds (the process's output then stays unread)."""
    read: list[str] = []
    done = threading.Event()

    def reader() -> None:
        seen = 0
        for line in proc.stdout:  # type: ignore[union-attr]
            read.append(line)
            seen += text in line
            if seen == count:
                break
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    if not done.wait(timeout) or sum(text in line for line in read) < count:
        raise AssertionError(f"{text!r} not seen {count} times in {timeout:g} s:\n{''.join(read)}")
    return "".join(read)


def stop_gateway(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    """SIGTERM, then its output once it exits (killed if it has not within ``timeout`` seconds)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=timeout)[0] or ""
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0] or ""


@contextmanager
def served_gateway(tgi_url: str, version: str, model: str, **settings: Any) -> Iterator[str]:
    """The gateway app (`create_app`) for template `version` and `model`, in front of TGI at `tgi_url`,
    served by uvicorn in this process (`tests/fakes/serve.py`): its base URL while the block runs."""
    from tests.fakes.serve import serve
    from tgi_gateway.prompting import Template
    from tgi_gateway.server.app import create_app
    from tgi_gateway.settings import Settings

    with serve(create_app(Settings(model=model, endpoint=tgi_url, **settings), Template(version))) as url:
        yield url
