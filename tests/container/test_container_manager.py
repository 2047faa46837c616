"""The container manager: launch recipe, pull progress, failure hints (unit); scenarios against the Docker
Engine double through the real docker SDK are further below."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest

from tgi_gateway.cli import launch_spec
from tgi_gateway.container_manager import (
    LaunchSpec,
    PullProgress,
    _hint,
    _split_image,
    is_local_endpoint,
)
from tgi_gateway.settings import Settings

DEFAULT_IMAGE = Settings.model_fields["tgi_image"].default


def make_spec(model: str = "m", endpoint: str = "http://127.0.0.1:8080", **fields: object) -> LaunchSpec:
    """The LaunchSpec the CLI builds from the default settings (without HF_TOKEN), `fields` replaced."""
    spec = launch_spec(Settings(model=model, endpoint=endpoint))
    return dataclasses.replace(spec, **{"hf_token": None, **fields})


def test_launch_recipe_for_a_hub_model(tmp_path: Path) -> None:
    spec = make_spec(
        model="meetkai/functionary-small-v3.2",
        endpoint="http://127.0.0.1:8080",
        hf_cache=tmp_path,
        hf_token="hf_secret",
        revision="main",
        max_input_tokens=4096,
        max_total_tokens=8192,
        quantize="awq",
        extra_args=("--max-batch-prefill-tokens", "4096"),
    )
    assert spec.port == 8080 and spec.name == "tgi-gateway-8080"
    assert spec.command() == [
        "--model-id", "meetkai/functionary-small-v3.2", "--revision", "main", "--max-input-tokens", "4096",
        "--max-total-tokens", "8192", "--quantize", "awq", "--max-batch-prefill-tokens", "4096",
    ]  # fmt: skip
    assert spec.volumes() == {str(tmp_path): {"bind": "/data", "mode": "rw"}}
    assert spec.environment() == {"HF_TOKEN": "hf_secret"}
    assert spec.labels == {
        "tgi-gateway.managed": "true",
        "tgi-gateway.model": "meetkai/functionary-small-v3.2",
        "tgi-gateway.port": "8080",
    }
    assert DEFAULT_IMAGE.rsplit(":", 1)[1][0].isdigit(), "the image is pinned to a release, never latest"


def test_launch_recipe_for_a_local_model_directory(tmp_path: Path) -> None:
    model = tmp_path / "functionary"
    model.mkdir()
    spec = make_spec(
        model=str(model), endpoint="http://localhost:9000", hf_cache=tmp_path / "cache", revision="x"
    )
    assert spec.command() == ["--model-id", "/model"], "a local directory is mounted; no revision"
    assert spec.volumes()[str(model)] == {"bind": "/model", "mode": "ro"}
    assert spec.port == 9000 and spec.environment() == {}


def test_launch_recipe_with_a_top_logprobs_limit_the_launched_tgi_takes_too() -> None:
    from tests.fakes.docker_engine import _launcher_args

    spec = make_spec(max_top_n_tokens=10)
    assert spec.command() == ["--model-id", "m", "--max-top-n-tokens", "10"]
    assert _launcher_args(spec.command())["max_top_n_tokens"] == 10, "the double's TGI takes it as TGI would"
    assert make_spec().command() == ["--model-id", "m"], "TGI's default (5) needs no flag"


def test_launch_recipe_with_lora_adapters(tmp_path: Path) -> None:
    """Hub adapters go to TGI as given; a `name=path` whose path is a directory here is mounted read-only
    on /adapters/<name> and TGI is given that path; any other path is TGI's own (inside the container)."""
    local = tmp_path / "sql-lora"
    local.mkdir()
    spec = make_spec(
        hf_cache=tmp_path / "cache",
        lora_adapters=("org/a@v1", f"sql={local}", "other=/data/adapters/other", f"gone={tmp_path}/missing",
                       f"again={local}/"),
    )  # fmt: skip
    assert spec.environment()["LORA_ADAPTERS"] == (
        f"org/a@v1,sql=/adapters/sql,other=/data/adapters/other,gone={tmp_path}/missing,again=/adapters/sql"
    ), "a directory given twice is mounted once"
    assert spec.volumes() == {
        str(tmp_path / "cache"): {"bind": "/data", "mode": "rw"},
        str(local): {"bind": "/adapters/sql", "mode": "ro"},
    }
    assert spec.labels["tgi-gateway.lora-adapters"] == ",".join(spec.lora_adapters)
    plain = make_spec()
    assert "LORA_ADAPTERS" not in plain.environment() and "tgi-gateway.lora-adapters" not in plain.labels


@pytest.mark.parametrize(
    "gpus,count,ids", [("all", -1, []), ("2", 2, []), ("0,1", 0, ["0", "1"]), ("3", 3, [])]
)
def test_gpu_device_requests(gpus: str, count: int, ids: list[str]) -> None:
    [req] = make_spec(gpus=gpus).device_requests()
    assert (req["Count"], req["DeviceIDs"], req["Capabilities"]) == (count, ids, [["gpu"]])


@pytest.mark.parametrize(
    "image,repo,tag",
    [
        ("ghcr.io/huggingface/text-generation-inference:3.3.5", "ghcr.io/huggingface/text-generation-inference", "3.3.5"),
        ("localhost:5000/tgi", "localhost:5000/tgi", "latest"),
        ("localhost:5000/tgi:2", "localhost:5000/tgi", "2"),
        ("tgi", "tgi", "latest"),
    ],
)
def test_split_image(image: str, repo: str, tag: str) -> None:
    assert _split_image(image) == (repo, tag)


def test_local_endpoints() -> None:
    assert is_local_endpoint("http://127.0.0.1:8080") and is_local_endpoint("http://localhost:80")
    assert not is_local_endpoint("http://tgi:80") and not is_local_endpoint("https://tgi.example.com")


def test_pull_progress_log_lines_sum_layers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="tgi_gateway.container")
    progress = PullProgress(io.StringIO(), every=0)
    for event in (
        {"status": "Pulling from huggingface/text-generation-inference", "id": "3.3.5"},
        {"status": "Downloading", "progressDetail": {"current": 1_000_000, "total": 4_000_000}, "id": "a"},
        {"status": "Downloading", "progressDetail": {"current": 500_000, "total": 1_000_000}, "id": "b"},
        {"status": "Download complete", "progressDetail": {}, "id": "b"},
    ):
        progress.update(event)
    assert progress.totals == (2_000_000, 5_000_000)
    assert "pulling TGI image: 2.0 MB of 5.0 MB (2 layers)" in caplog.text


def test_pull_progress_bar_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    progress = PullProgress(out)
    progress.update({"status": "Downloading", "progressDetail": {"current": 50, "total": 100}, "id": "a"})
    progress.close()
    assert out.getvalue().startswith("\rpulling TGI image [###############...............]")
    assert out.getvalue().endswith("\n")


@pytest.mark.parametrize(
    "tail,code,oom,fragment",
    [
        ("torch.cuda.OutOfMemoryError: CUDA out of memory.\nError: ShardCannotStart", 1, False, "--max-total-tokens"),
        ("", 137, True, "host memory"),
        ("401 Client Error ... Cannot access gated repo", 1, False, "HF_TOKEN"),
        ("Error: DownloadError\nRepository Not Found for url", 1, False, "check the model id"),
    ],
)
def test_failure_hints(tail: str, code: int, oom: bool, fragment: str) -> None:
    assert fragment in _hint(tail, code, oom, make_spec(model="org/m"))


# ------------------------------------------------------------------------------------------------
# Scenarios: the manager against the Docker Engine double, through the real docker SDK
# ------------------------------------------------------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import httpx  # noqa: E402

from tests.fakes.docker_engine import FakeDockerEngine, TGIBehavior  # noqa: E402
from tests.fakes.tgi import FakeTGI  # noqa: E402
from tgi_gateway.container_manager import ContainerManager, LaunchError  # noqa: E402

MODEL = "meetkai/functionary-small-v3.2"
TOKEN = "hf_secret_never_logged"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDockerEngine]:
    with FakeDockerEngine(behavior=TGIBehavior(load_delay=0.3, fail_after=0.2)) as eng:
        eng.apply_env(monkeypatch)
        eng.config.stop_grace_scale = 0.01
        yield eng


def manager(tmp_path: Path, port: int, **spec: object) -> ContainerManager:
    return ContainerManager(
        make_spec(
            model=MODEL, endpoint=f"http://127.0.0.1:{port}", hf_cache=tmp_path, hf_token=TOKEN, **spec
        ),
        out=io.StringIO(),
        poll_interval=0.05,
    )


def test_launch_pull_start_wait_and_release(engine, tmp_path, caplog):
    caplog.set_level("INFO")
    port = free_port()
    m = manager(tmp_path, port, max_total_tokens=4096)
    assert m.ensure_tgi() == "started"
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    [pull] = engine.pulls
    assert pull.outcome == "ok" and f"pulling {DEFAULT_IMAGE}" in caplog.text and f"pulled {DEFAULT_IMAGE}" in caplog.text
    [body] = engine.create_bodies
    assert body["Image"] == DEFAULT_IMAGE
    assert body["Cmd"] == ["--model-id", MODEL, "--max-total-tokens", "4096"]
    assert body["Env"] == [f"HF_TOKEN={TOKEN}"]
    assert body["Labels"] == {"tgi-gateway.managed": "true", "tgi-gateway.model": MODEL, "tgi-gateway.port": str(port)}
    host = body["HostConfig"]
    assert host["ShmSize"] == 1 << 30
    assert host["DeviceRequests"] == [{"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
    assert host["PortBindings"] == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    assert host["Binds"] == [f"{tmp_path}:/data:rw"]
    assert "tgi | " in caplog.text and "Waiting for shard to be ready" in caplog.text, "TGI's logs are shown"
    assert TOKEN not in caplog.text
    m.release()
    assert engine.containers == [] and engine.history("destroy") == [f"tgi-gateway-{port}"]


def test_healthy_endpoint_is_used_without_any_docker_call(engine, tmp_path):
    with FakeTGI() as tgi:
        m = manager(tmp_path, int(tgi.url.rsplit(":", 1)[1]))
        assert m.ensure_tgi() == "existing"
        m.release()
    assert engine.requests == []


def test_adopts_a_running_container_of_ours_and_leaves_it_running(engine, tmp_path):
    port = free_port()
    labels = {"tgi-gateway.managed": "true", "tgi-gateway.model": MODEL, "tgi-gateway.port": str(port)}
    seeded = engine.add_container(
        command=["--model-id", MODEL], name=f"tgi-gateway-{port}", labels=labels,
        ports={"80/tcp": ("127.0.0.1", port)}, behavior=TGIBehavior(load_delay=0.5), wait_ready=False,
    )  # fmt: skip
    m = manager(tmp_path, port)
    assert m.ensure_tgi() == "adopted"
    m.release()
    assert seeded.status == "running" and engine.history("create") == [f"tgi-gateway-{port}"]
    assert engine.pulls == []


def test_lora_adapters_reach_the_tgi_it_starts(engine, tmp_path):
    """Through the real SDK: the container gets LORA_ADAPTERS and the local adapter's mount, and the TGI it
    runs applies an adapter it was started with (an unknown id silently gets the base model)."""
    local = tmp_path / "sql-lora"
    local.mkdir()
    port = free_port()
    m = manager(tmp_path, port, lora_adapters=("org/a", f"sql={local}"))
    assert m.ensure_tgi() == "started"
    [body] = engine.create_bodies
    assert body["Env"] == [f"HF_TOKEN={TOKEN}", "LORA_ADAPTERS=org/a,sql=/adapters/sql"]
    assert set(body["HostConfig"]["Binds"]) == {f"{tmp_path}:/data:rw", f"{local}:/adapters/sql:ro"}
    assert body["Labels"]["tgi-gateway.lora-adapters"] == f"org/a,sql={local}"
    [container] = engine.containers
    for adapter_id in ("sql", "org/a", "nope"):
        body = {"inputs": "x", "parameters": {"adapter_id": adapter_id}}
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json=body)
        assert r.status_code == 200, r.text
    assert [g.adapter for g in container.tgi.generations] == ["sql", "org/a", None]
    m.release()


def test_a_running_container_with_other_adapters_is_not_adopted(engine, tmp_path):
    port = free_port()
    labels = {"tgi-gateway.managed": "true", "tgi-gateway.model": MODEL, "tgi-gateway.port": str(port)}
    seeded = engine.add_container(
        command=["--model-id", MODEL], name=f"tgi-gateway-{port}", labels=labels,
        ports={"80/tcp": ("127.0.0.1", port)}, behavior=TGIBehavior(load_delay=0.5), wait_ready=False,
    )  # fmt: skip
    m = manager(tmp_path, port, lora_adapters=("org/a",))
    with pytest.raises(LaunchError, match=r"with the LoRA adapters 'none', not 'org/a'\. Stop it"):
        m.ensure_tgi()
    assert seeded.status == "running", "not ours to stop: the operator decides"
    assert engine.history("create") == [f"tgi-gateway-{port}"]


def test_a_stopped_leftover_is_replaced(engine, tmp_path):
    port = free_port()
    labels = {"tgi-gateway.managed": "true", "tgi-gateway.model": MODEL, "tgi-gateway.port": str(port)}
    engine.add_container(command=["--model-id", MODEL], name=f"tgi-gateway-{port}", labels=labels,
                         ports={"80/tcp": ("127.0.0.1", port)}, state="exited", exit_code=1)  # fmt: skip
    m = manager(tmp_path, port)
    assert m.ensure_tgi() == "started"
    m.release()
    assert engine.history("destroy") == [f"tgi-gateway-{port}"] * 2


def test_crash_while_loading_reports_and_leaves_nothing(engine, tmp_path):
    engine.set_behavior("crash_loading", model=MODEL)
    m = manager(tmp_path, free_port())
    start = time.monotonic()
    with pytest.raises(LaunchError) as e:
        m.ensure_tgi()
    assert time.monotonic() - start < 5, "stops waiting as soon as the container exits"
    msg = str(e.value)
    assert "exit code 1" in msg and "OOMKilled false" in msg
    assert "Error: ShardCannotStart" in msg and "CUDA out of memory" in msg
    assert "--max-total-tokens" in msg and "--quantize" in msg
    assert engine.containers == []


def test_oom_killed_and_gated_model(engine, tmp_path):
    engine.set_behavior("oom_killed", model=MODEL)
    with pytest.raises(LaunchError) as e:
        manager(tmp_path, free_port()).ensure_tgi()
    assert "exit code 137" in str(e.value) and "OOMKilled true" in str(e.value) and "host memory" in str(e.value)
    engine.set_behavior("gated_model", model=MODEL)
    with pytest.raises(LaunchError) as e:
        manager(tmp_path, free_port()).ensure_tgi()
    assert "HF_TOKEN" in str(e.value)
    assert engine.containers == []


def test_no_gpu_runtime(engine, tmp_path):
    engine.config.gpu = False
    with pytest.raises(LaunchError) as e:
        manager(tmp_path, free_port()).ensure_tgi()
    assert "could not select device driver" in str(e.value) and "NVIDIA Container Toolkit" in str(e.value)
    assert engine.containers == [], "the created-but-not-started container is removed"


@pytest.mark.parametrize("mid_stream", [False, True])
def test_pull_errors_carry_the_registry_message(engine, tmp_path, mid_stream):
    engine.fail_pull(DEFAULT_IMAGE, status=404, message="manifest unknown: no such tag", mid_stream=mid_stream)
    with pytest.raises(LaunchError) as e:
        manager(tmp_path, free_port()).ensure_tgi()
    assert "Pulling" in str(e.value) and "manifest unknown: no such tag" in str(e.value)
    assert engine.containers == []


def test_port_already_in_use(engine, tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(LaunchError) as e:
            manager(tmp_path, port).ensure_tgi()
    assert f"Port {port}" in str(e.value) and "already in use" in str(e.value)
    assert engine.containers == []


def test_no_docker_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{free_port()}")
    monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
    with pytest.raises(LaunchError) as e:
        manager(tmp_path, free_port()).ensure_tgi()
    assert "no Docker engine answers" in str(e.value) and "--endpoint" in str(e.value)


def test_startup_timeout_stops_and_removes(engine, tmp_path):
    engine.set_behavior("serve", model=MODEL, load_delay=30)
    with pytest.raises(LaunchError) as e:
        manager(tmp_path, free_port(), startup_timeout=0.5).ensure_tgi()
    assert "within 0.5 s (--startup-timeout)" in str(e.value) and "download process" in str(e.value)
    assert engine.containers == []


# ------------------------------------------------------------------------------------------------
# A signal at any moment of the start-up
# ------------------------------------------------------------------------------------------------

import inspect  # noqa: E402
import threading  # noqa: E402
from types import FrameType  # noqa: E402

import tgi_gateway.container_manager as container_manager  # noqa: E402
from tgi_gateway.container_manager import StartupInterrupted  # noqa: E402

# The code a signal is swept over: the manager's methods, and threading's code under Thread.start() called by
# _follow_logs (it waits there for the log follower to run: the window of the once-flaky CLI test below).
MANAGER_CODE = {f.__code__ for f in vars(ContainerManager).values() if inspect.isfunction(f)}


def _in_follower_start(frame: FrameType) -> bool:
    outer = frame
    while outer.f_back is not None and outer.f_back.f_code.co_filename == threading.__file__:
        outer = outer.f_back
    return outer.f_code is threading.Thread.start.__code__ and outer.f_back.f_code.co_name == "_follow_logs"


class SignalAtLine:
    """``sys.settrace`` that calls ``manager.interrupt(SIGTERM)``, as the CLI's signal handler does, at the
    `at`-th line the main thread runs in the swept code; whatever ``interrupt`` raises is raised at that line,
    as from a real handler. `at=None`: record the lines of a whole start-up and one health-poll cycle (its
    sleep included), then signal."""

    def __init__(self, manager: ContainerManager, at: int | None) -> None:
        self.manager, self.at, self.where = manager, at, ""
        self.lines: list[tuple[str, int]] = []

    def __enter__(self) -> SignalAtLine:
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)

    def _call(self, frame: FrameType, event: str, arg: object) -> object:
        code = frame.f_code
        if code in MANAGER_CODE or code.co_filename == threading.__file__ and _in_follower_start(frame):
            return self._line
        return None

    def _line(self, frame: FrameType, event: str, arg: object) -> object:
        if event != "line":
            return self._line
        name = frame.f_code.co_name
        self.lines.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} ({name})")
        slept = self.at is None and name == "_wait_healthy" and any("(_sleep)" in line for line in self.lines)
        if len(self.lines) == self.at or slept:
            sys.settrace(None)
            self.where = self.lines[-1]
            self.manager.interrupt(signal.SIGTERM)
            return None
        return self._line


def test_a_signal_at_any_line_of_the_start_up_removes_the_container(engine, tmp_path):
    """The handler notes the signal (an exception raised wherever it lands leaves half-done states: a follower
    thread that cannot be joined, a lock held in urllib3's pool); the start-up stops at its next checkpoint, or
    at once in a sleep, and removes the container: for a signal at each line of the start-up (the image
    already pulled; a signal during the pull finds no container to remove)."""
    engine.set_behavior("serve", model=MODEL, load_delay=30)
    port = free_port()
    for _ in range(2):  # the first one pulls the image
        m = manager(tmp_path, port)
        with SignalAtLine(m, None) as whole, pytest.raises(StartupInterrupted):
            m.ensure_tgi()
        assert whole.where.endswith("(_wait_healthy)") and engine.containers == []
    assert any(line.startswith("threading.py") for line in whole.lines), "Thread.start() of the log follower"
    firsts = {line: at for at, line in reversed(list(enumerate(whole.lines, 1)))}
    assert len(firsts) > 50
    for at in sorted(firsts.values()):
        m = manager(tmp_path, port)
        with SignalAtLine(m, at) as signal_at, pytest.raises(StartupInterrupted) as e:
            m.ensure_tgi()
        assert not e.value.forced and e.value.signum == signal.SIGTERM
        assert engine.containers == [], f"signal at {signal_at.where}: the container was left behind"
        assert m.container is None and m._follower is None and m._log_stream is None
    engine.wait_until(lambda: not [t for t in threading.enumerate() if t.name == "tgi-logs"], timeout=10)


def test_a_signal_in_a_sleep_stops_at_once_and_a_second_one_forces(engine, tmp_path):
    m = manager(tmp_path, free_port())
    m._sleeping = True
    with pytest.raises(StartupInterrupted) as e:
        m.interrupt(signal.SIGINT)
    assert (e.value.signum, e.value.forced) == (signal.SIGINT, False)
    m = manager(tmp_path, free_port())
    m.interrupt(signal.SIGTERM)  # noted, not raised
    with pytest.raises(StartupInterrupted) as e:
        m.interrupt(signal.SIGTERM)
    assert e.value.forced, "a second signal raises wherever the main thread is"
    container_manager._join(threading.Thread(target=lambda: None))  # cut short before start(): no RuntimeError


# ------------------------------------------------------------------------------------------------
# The real CLI process: what the user sees, and SIGTERM cleanup
# ------------------------------------------------------------------------------------------------


def gateway_process(engine: FakeDockerEngine, tmp_path: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DOCKER_HOST": engine.docker_host, "NO_PROXY": "127.0.0.1", "HF_TOKEN": TOKEN}
    env.pop("DOCKER_TLS_VERIFY", None)
    gateway_port = free_port()
    cmd = [sys.executable, str(ROOT / "server_tgi.py"), "--model", MODEL, "--template-version", "v3-llama3.1",
           "--endpoint", f"http://127.0.0.1:{port}", "--port", str(gateway_port), "--hf-cache", str(tmp_path),
           "--shutdown-grace", "2", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    proc.gateway_url = f"http://127.0.0.1:{gateway_port}"  # type: ignore[attr-defined]
    return proc


def wait_serving(proc: subprocess.Popen[str], timeout: float = 20) -> None:
    """Until the gateway answers (it serves only once TGI is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(proc.gateway_url + "/v1/models", timeout=1).status_code == 200:  # type: ignore[attr-defined]
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("the gateway did not start serving")


def test_sigterm_stops_and_removes_the_container_it_started(engine, tmp_path):
    port = free_port()
    proc = gateway_process(engine, tmp_path, port)
    try:
        wait_serving(proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert engine.containers == [] and engine.history("destroy") == [f"tgi-gateway-{port}"]
    assert TOKEN not in out


def test_the_gateway_launches_tgi_with_its_lora_adapters_and_serves_them(engine, tmp_path):
    """The whole chain as a user runs it: --lora-adapters → the container's LORA_ADAPTERS → the TGI in it knows
    the adapters; the SDK lists them and a chat naming one is generated with it."""
    import openai

    local = tmp_path / "support-lora"
    local.mkdir()
    port = free_port()
    proc = gateway_process(engine, tmp_path, port, "--lora-adapters", f"acme/sql-lora@v2,support={local}")
    try:
        wait_serving(proc)
        [container] = engine.containers
        url = proc.gateway_url + "/v1"  # type: ignore[attr-defined]
        with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=20) as client:
            assert [m.id for m in client.models.list()] == [MODEL, "acme/sql-lora", "support"]
            for name in ("support", "acme/sql-lora"):
                answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
                assert answer.model == name
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="sql-lora", messages=[{"role": "user", "content": "hi"}])
        assert container.tgi.config.lora_adapters == ("acme/sql-lora@v2", "support=/adapters/support")
        assert [g.adapter for g in container.tgi.generations] == ["support", "acme/sql-lora"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out = proc.communicate(timeout=30)[0]
        finally:
            proc.kill()
    assert "LoRA adapters: acme/sql-lora@v2,support=/adapters/support" in out, "the launch says what TGI gets"
    assert "LoRA adapters served as models: acme/sql-lora, support" in out
    assert engine.containers == []


def test_sigterm_while_tgi_loads_removes_the_container(engine, tmp_path):
    engine.set_behavior("serve", model=MODEL, load_delay=30)
    proc = gateway_process(engine, tmp_path, free_port())
    try:
        engine.wait_until(lambda: engine.history("start") and engine.log_streams_open, timeout=20)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "container was removed" in out, out[-2000:]
    assert engine.containers == []


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    """The test process's SIGTERM/SIGINT handlers back after a test that runs the CLI's `main` in-process."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_a_signal_noted_after_the_start_ups_last_checkpoint_stops_the_gateway(monkeypatch, signal_handlers):
    """A signal that lands after ensure_tgi's last checkpoint is noted, not lost: the gateway does not serve,
    and the container is released."""
    from tgi_gateway import cli

    def ensure_tgi(self: ContainerManager) -> str:
        self.interrupt(signal.SIGTERM)  # what the handler does when the signal lands on the `return`
        return "started"

    released: list[ContainerManager] = []
    monkeypatch.setattr(ContainerManager, "ensure_tgi", ensure_tgi)
    monkeypatch.setattr(ContainerManager, "release", lambda self: released.append(self))
    monkeypatch.setattr(cli, "_serve", lambda *args: pytest.fail("served after SIGTERM"))
    assert cli.main(["--model", MODEL, "--template-version", "v3-llama3.1"]) == 130
    assert len(released) == 1
    assert signal.getsignal(signal.SIGTERM) is cli._exit_cleanly, "from now on a signal exits through release"


def test_keep_tgi_and_failure_exit_status(engine, tmp_path):
    port = free_port()
    proc = gateway_process(engine, tmp_path, port, "--keep-tgi")
    try:
        wait_serving(proc)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert [c.status for c in engine.containers] == ["running"]
    engine.config.gpu = False
    failing = gateway_process(engine, tmp_path, free_port())
    out, _ = failing.communicate(timeout=30)
    assert failing.returncode == 1 and "error: Docker cannot give the TGI container a GPU" in out
