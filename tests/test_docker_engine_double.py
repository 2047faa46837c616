"""The Docker Engine double (tests/fakes/docker_engine.py), driven through the real docker SDK
(``docker.from_env()`` against ``DOCKER_HOST=tcp://127.0.0.1:PORT``)."""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time

import docker
import docker.errors
import docker.types
import httpx
import pytest

from tests.fakes.docker_engine import TGI_IMAGE, FakeDockerEngine, TGIBehavior

MODEL = "HuggingFaceH4/zephyr-7b-beta"
REPO, TAG = TGI_IMAGE.rsplit(":", 1)
COMMAND = ["--model-id", MODEL, "--max-input-tokens", "1024", "--max-total-tokens", "2048"]
GPUS = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except ConnectionRefusedError:
        return True


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch):
    with FakeDockerEngine(behavior=TGIBehavior(load_delay=0.3, fail_after=0.2)) as eng:
        eng.apply_env(monkeypatch)
        yield eng


@pytest.fixture
def client(engine: FakeDockerEngine):
    c = docker.from_env()
    yield c
    c.close()


def run_tgi(client: docker.DockerClient, port: int, *, name: str = "tgi-test", command=COMMAND, **kw):
    return client.containers.run(
        TGI_IMAGE,
        command=command,
        device_requests=GPUS,
        shm_size="1g",
        ports={"80/tcp": port},
        volumes={"/srv/tgi-data": {"bind": "/data", "mode": "rw"}},
        environment={"HF_TOKEN": "hf_xxx"},
        labels={"app": "tgi-gateway"},
        name=name,
        detach=True,
        **kw,
    )


# ------------------------------------------------------------------------------ system


def test_from_env_negotiates_then_ping_version_info(
    engine: FakeDockerEngine, client: docker.DockerClient
) -> None:
    assert client.ping() is True
    assert client.version()["ApiVersion"] == "1.45"
    info = client.info()
    assert "nvidia" in info["Runtimes"] and info["ServerVersion"] == "26.1.0"
    assert engine.routes()[:4] == [
        ("GET", "/version"),
        ("GET", "/_ping"),
        ("GET", "/version"),
        ("GET", "/info"),
    ]
    first, ping = engine.requests[:2]
    assert first.version is None and first.path == "/version"  # the constructor's unversioned call
    assert ping.path == "/v1.45/_ping" and ping.headers["user-agent"].startswith("docker-sdk-python/")
    engine.config.gpu = False
    assert "nvidia" not in client.info()["Runtimes"]


def test_any_version_prefix_and_unknown_routes(engine: FakeDockerEngine) -> None:
    with httpx.Client(base_url=engine.url) as http:
        assert http.get("/v1.41/_ping").text == "OK"
        assert http.get("/_ping").headers["api-version"] == "1.45"
        assert http.get("/v1.24/version").json()["ApiVersion"] == "1.45"
        too_new = http.get("/v1.99/version")
        assert too_new.status_code == 400 and "too new" in too_new.json()["message"]
        assert http.get("/v1.45/nope").json() == {"message": "page not found"}


def test_from_env_against_a_closed_port_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{free_port()}")
    monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
    monkeypatch.delenv("DOCKER_CERT_PATH", raising=False)
    with pytest.raises(docker.errors.DockerException, match="Error while fetching server API version"):
        docker.from_env()


# ------------------------------------------------------------------------------ images and pulls


def test_images_get_missing_then_seeded(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    with pytest.raises(docker.errors.ImageNotFound, match=re.escape(f"No such image: {TGI_IMAGE}")):
        client.images.get(TGI_IMAGE)
    assert engine.requests[-1].path == f"/v1.45/images/{TGI_IMAGE}/json"  # slashes and colon raw
    image = engine.add_image(TGI_IMAGE)
    got = client.images.get(TGI_IMAGE)
    assert got.id == image.id and got.tags == [TGI_IMAGE]
    assert client.images.get(image.id.split(":")[1]).id == image.id  # by bare id, as Container.image does
    engine.add_image("ubuntu")
    assert client.images.get("docker.io/library/ubuntu:latest").tags == ["ubuntu:latest"]


def test_api_pull_streams_progress_dicts(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    items = list(client.api.pull(REPO, tag=TAG, stream=True, decode=True))
    assert (
        engine.requests[-1].query == "tag=3.3.5&fromImage=ghcr.io%2Fhuggingface%2Ftext-generation-inference"
    )
    assert items[0] == {"status": "Pulling from huggingface/text-generation-inference", "id": "3.3.5"}
    downloading = [i for i in items if i["status"] == "Downloading"]
    extracting = [i for i in items if i["status"] == "Extracting"]
    assert len({i["id"] for i in downloading}) >= 3 and extracting
    assert all(
        0 < i["progressDetail"]["current"] <= i["progressDetail"]["total"] for i in downloading + extracting
    )
    assert items[-2]["status"].startswith("Digest: sha256:")
    assert items[-1] == {"status": f"Status: Downloaded newer image for {TGI_IMAGE}"}
    assert client.images.get(TGI_IMAGE).tags == [TGI_IMAGE]
    again = list(client.api.pull(REPO, tag=TAG, stream=True, decode=True))
    assert again[-1] == {"status": f"Status: Image is up to date for {TGI_IMAGE}"}
    assert [p.outcome for p in engine.pulls] == ["ok", "up_to_date"]


def test_pull_stream_is_chunked_crlf_json(engine: FakeDockerEngine) -> None:
    with httpx.Client(base_url=engine.url) as http:
        r = http.post("/v1.45/images/create", params={"fromImage": "busybox", "tag": "1.36"})
    assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
    lines = r.content.split(b"\r\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
    assert b" " not in lines[0].split(b'"status"')[0]  # compact Go-style JSON


@pytest.mark.parametrize(
    "status,exc,text",
    [
        (404, docker.errors.ImageNotFound, "repository does not exist"),
        (401, docker.errors.APIError, "unauthorized"),
        (500, docker.errors.APIError, "no such host" if False else "dial tcp"),
    ],
)
def test_pull_error_before_output_raises_at_call_time(
    engine: FakeDockerEngine, client: docker.DockerClient, status: int, exc: type, text: str
) -> None:
    engine.fail_pull(REPO, status)
    with pytest.raises(exc) as info:
        client.api.pull(REPO, tag=TAG, stream=True, decode=True)
    assert info.value.status_code == status and text in info.value.explanation
    assert engine.pulls[-1].outcome == "http_error"


def test_pull_error_mid_stream(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    engine.fail_pull(TGI_IMAGE, mid_stream=True, message="toomanyrequests: rate limit", after_lines=3)
    items = list(client.api.pull(REPO, tag=TAG, stream=True, decode=True))  # no exception
    assert len(items) == 4 and items[0]["status"].startswith("Pulling from")
    assert items[-1] == {
        "errorDetail": {"message": "toomanyrequests: rate limit"},
        "error": "toomanyrequests: rate limit",
    }
    with pytest.raises(docker.errors.ImageNotFound):  # images.pull ignores the stream, then inspects
        client.images.pull(REPO, tag=TAG)
    assert [p.outcome for p in engine.pulls] == ["stream_error", "stream_error"]


# ------------------------------------------------------------------------------ run: the TGI recipe


def test_run_auto_pulls_records_the_create_body_and_serves_after_load(
    engine: FakeDockerEngine, client: docker.DockerClient
) -> None:
    port = free_port()
    container = run_tgi(client, port)
    assert container.status == "created"  # run() returns the inspect from before start
    cid = container.id
    assert engine.routes() == [
        ("GET", "/version"),
        ("POST", "/containers/create"),
        ("POST", "/images/create"),
        ("GET", f"/images/{TGI_IMAGE}/json"),
        ("POST", "/containers/create"),
        ("GET", f"/containers/{cid}/json"),
        ("POST", f"/containers/{cid}/start"),
    ]
    creates = [r for r in engine.requests if r.route == "/containers/create"]
    assert creates[0].body == creates[1].body and creates[0].query == "name=tgi-test"
    assert creates[0].headers["content-type"] == "application/json"
    assert creates[1].json == {
        "ExposedPorts": {"80/tcp": {}}, "Tty": False, "OpenStdin": False, "StdinOnce": False,
        "AttachStdin": False, "AttachStdout": False, "AttachStderr": False,
        "Env": ["HF_TOKEN=hf_xxx"], "Cmd": COMMAND, "Image": TGI_IMAGE,
        "Volumes": {"/data": {}}, "NetworkDisabled": False,
        "HostConfig": {
            "ShmSize": 1073741824, "NetworkMode": "default", "Binds": ["/srv/tgi-data:/data:rw"],
            "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": str(port)}]},
            "DeviceRequests": [{"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}],
        },
        "Labels": {"app": "tgi-gateway"},
    }  # fmt: skip
    [fake] = engine.created
    assert engine.create_bodies == [creates[1].json] and fake.raw_body == creates[1].body
    assert engine.history("create") == ["tgi-test"] and engine.history("start") == ["tgi-test"]
    assert [p.reference for p in engine.pulls] == [TGI_IMAGE]

    container.reload()
    attrs = container.attrs
    assert container.status == "running" and attrs["State"]["Running"] and attrs["State"]["Pid"] > 0
    assert attrs["Config"]["Tty"] is False and attrs["Config"]["Labels"] == {"app": "tgi-gateway"}
    assert attrs["Config"]["Cmd"] == COMMAND and attrs["Path"] == "/tgi-entrypoint.sh"
    assert "PORT=80" in attrs["Config"]["Env"] and "HF_TOKEN=hf_xxx" in attrs["Config"]["Env"]
    assert container.ports["80/tcp"][0] == {"HostIp": "0.0.0.0", "HostPort": str(port)}
    assert attrs["Mounts"][0]["Source"] == "/srv/tgi-data" and attrs["Mounts"][0]["Destination"] == "/data"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", attrs["State"]["StartedAt"])
    assert attrs["State"]["FinishedAt"] == "0001-01-01T00:00:00Z"
    assert container.image.id == fake.image_id

    assert refused(port)  # loading: nothing listens yet
    engine.wait_until(lambda: fake.connected, timeout=3)
    assert fake.tgi is not None and fake.tgi.ready and "Connected" in fake.log_text().splitlines()[-1]
    health = httpx.get(f"http://127.0.0.1:{port}/health")
    assert health.status_code == 200 and health.content == b""
    info = httpx.get(f"{fake.url}/info").json()
    assert (info["model_id"], info["max_input_tokens"], info["max_total_tokens"]) == (MODEL, 1024, 2048)


def test_create_with_missing_image_does_not_pull(
    engine: FakeDockerEngine, client: docker.DockerClient
) -> None:
    with pytest.raises(docker.errors.ImageNotFound, match="No such image: ubuntu:latest"):
        client.containers.create("ubuntu", command=["true"])
    assert engine.created == [] and engine.pulls == []


def test_name_conflict(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    engine.add_image(TGI_IMAGE)
    first = client.containers.create(TGI_IMAGE, name="tgi-test")
    with pytest.raises(docker.errors.APIError) as info:
        client.containers.create(TGI_IMAGE, name="tgi-test")
    assert info.value.status_code == 409
    assert info.value.explanation == (
        f'Conflict. The container name "/tgi-test" is already in use by container "{first.id}". '
        "You have to remove (or rename) that container to be able to reuse that name."
    )


def test_list_filters_and_get(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    a = engine.add_container(
        name="tgi-a", labels={"app": "tgi-gateway", "port": "1"}, ports={"80/tcp": free_port()}
    )
    engine.add_container(
        name="my-tgi-2", labels={"app": "tgi-gateway", "port": "2"}, state="exited", exit_code=1
    )
    engine.add_container(name="other", labels={"app": "else"}, state="created")

    def names(**kw) -> list[str]:
        return sorted(c.name for c in client.containers.list(**kw))

    assert names(filters={"label": "app=tgi-gateway"}, all=True) == ["my-tgi-2", "tgi-a"]
    assert engine.requests[-3].query.startswith("limit=-1&all=1&size=0&trunc_cmd=0&filters=")
    assert names(filters={"label": ["app=tgi-gateway", "port=2"]}, all=True) == ["my-tgi-2"]  # AND
    assert names(filters={"label": ["app", "port"]}, all=True) == ["my-tgi-2", "tgi-a"]
    assert names(filters={"label": "app=tgi-gateway"}) == ["tgi-a"]  # all=False: running only
    assert names(filters={"name": "tgi"}, all=True) == ["my-tgi-2", "tgi-a"]  # unanchored regex
    assert names(filters={"name": "^/tgi"}, all=True) == ["tgi-a"]
    assert names(filters={"status": "exited"}) == ["my-tgi-2"]
    assert names(all=True) == ["my-tgi-2", "other", "tgi-a"]
    assert client.containers.get("tgi-a").id == a.id == client.containers.get(a.id[:12]).id
    with pytest.raises(docker.errors.NotFound, match="No such container: nope"):
        client.containers.get("nope")
    raw = client.api.containers(all=True, filters={"name": "tgi-a"})
    assert (
        raw[0]["Names"] == ["/tgi-a"] and raw[0]["State"] == "running" and raw[0]["Status"].startswith("Up ")
    )


def test_adopt_a_seeded_running_container(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    port = free_port()
    seeded = engine.add_container(
        TGI_IMAGE, ["--model-id", "meetkai/functionary-small-v3.2"], name="tgi-gateway-8080",
        labels={"tgi-gateway.managed": "true", "tgi-gateway.port": str(port)}, ports={"80/tcp": ("127.0.0.1", port)},
    )  # fmt: skip
    [found] = client.containers.list(
        all=True, filters={"label": ["tgi-gateway.managed=true", f"tgi-gateway.port={port}"]}
    )
    assert found.id == seeded.id and found.status == "running"
    assert found.ports == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    assert httpx.get(f"http://127.0.0.1:{port}/info").json()["model_id"] == "meetkai/functionary-small-v3.2"
    assert "Connected" in found.logs().decode()
    assert engine.routes().count(("POST", "/containers/create")) == 0


# ------------------------------------------------------------------------------ logs


def test_logs_follow_streams_frames_until_exit(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    container = run_tgi(client, free_port())
    stream = container.logs(stream=True, follow=True)
    logs_at = max(i for i, r in enumerate(engine.requests) if r.route.endswith("/logs"))
    assert engine.requests[logs_at].query == "stderr=1&stdout=1&timestamps=0&follow=1&tail=all"
    assert engine.routes()[logs_at + 1] == ("GET", f"/containers/{container.id}/json")  # while logs are open
    assert engine.log_streams_open == 1
    seen: list[bytes] = []
    for chunk in stream:
        seen.append(chunk)
        if b"Connected" in chunk:
            break
    text = b"".join(seen).decode()
    assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in seen)  # one frame per line
    assert "INFO text_generation_launcher: Args {" in text and f'    model_id: "{MODEL}",' in text
    for needle in ("Starting check and download process for", "Waiting for shard to be ready... rank=0",
                   "Shard ready in", "Starting Webserver", "Connected"):  # fmt: skip
        assert needle in text

    done: list[bytes] = []
    reader = threading.Thread(target=lambda: done.extend(stream))
    reader.start()
    container.stop(timeout=5)
    reader.join(3)
    assert not reader.is_alive(), "the follow stream ends when the container exits"
    assert b"Shutting down shards" in b"".join(done)
    engine.wait_until(lambda: engine.log_streams_open == 0)
    assert container.logs(stdout=False, stderr=True) == b""
    assert container.logs(tail=1).endswith(b"shard terminated rank=0\n")


def test_logs_raw_multiplexed_framing(engine: FakeDockerEngine) -> None:
    seeded = engine.add_container(ports={"80/tcp": free_port()}, behavior="crash_loading")
    engine.wait_until(lambda: not seeded.running)
    with httpx.Client(base_url=engine.url) as http:
        r = http.get(
            f"/v1.45/containers/{seeded.name}/logs", params={"stdout": 1, "stderr": 1, "timestamps": 1}
        )
    assert r.headers["content-type"] == "application/vnd.docker.multiplexed-stream"
    data, frames = r.content, []
    while data:
        kind, size = struct.unpack(">BxxxL", data[:8])
        frames.append((kind, data[8 : 8 + size]))
        data = data[8 + size :]
    assert {k for k, _ in frames} == {1, 2}
    assert frames[-1][0] == 2 and frames[-1][1].endswith(b" Error: ShardCannotStart\n")
    assert re.match(rb"\d{4}-\d\d-\d\dT\S+Z ", frames[0][1])


def test_log_stream_closed_by_client(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    container = run_tgi(client, free_port())
    stream = container.logs(stream=True, follow=True)
    next(stream)
    assert engine.log_streams_open == 1
    stream.close()  # docker-py shuts the socket down; the engine notices the disconnect
    stream._response.close()  # else the makefile keeps the closed socket: ResourceWarning at GC (docker-py 7.x)
    engine.wait_until(lambda: engine.log_streams_open == 0, timeout=3)
    container.reload()
    assert container.status == "running"


# ------------------------------------------------------------------------------ failure scenarios


@pytest.mark.parametrize(
    "scenario,code,oom,stderr,needles",
    [
        ("crash_loading", 1, False, "Error: ShardCannotStart\n",
         ["Shard complete standard error output:", "torch.OutOfMemoryError: CUDA out of memory", " rank=0",
          "Shard 0 failed to start", "Shutting down shards"]),
        ("webserver_failed", 1, False, "Error: WebserverFailed\n", ["Warming up model", "Webserver Crashed"]),
        ("oom_killed", 137, True, "", ["Waiting for shard to be ready... rank=0"]),
        ("gated_model", 1, False, "Error: DownloadError\n",
         ["GatedRepoError: 401 Client Error", f"Access to model {MODEL} is restricted",
          f"Cannot access gated repo for url https://huggingface.co/api/models/{MODEL}"]),
    ],
)  # fmt: skip
def test_failure_scenarios(
    engine: FakeDockerEngine,
    client: docker.DockerClient,
    scenario: str,
    code: int,
    oom: bool,
    stderr: str,
    needles: list[str],
) -> None:
    engine.set_behavior(scenario, model=MODEL, fail_after=0.15)
    port = free_port()
    container = run_tgi(client, port)
    assert client.api.wait(container.id) == {"StatusCode": code, "Error": None}
    container.reload()
    state = container.attrs["State"]
    assert (container.status, state["ExitCode"], state["OOMKilled"], state["Running"]) == (
        "exited",
        code,
        oom,
        False,
    )
    assert state["FinishedAt"] > state["StartedAt"] and container.ports == {}
    assert container.logs(stdout=False, stderr=True).decode() == stderr
    out = container.logs(stderr=False).decode()
    for needle in needles:
        assert needle in out
    assert "Connected" not in out and refused(port)
    assert engine.history("die") == ["tgi-test"] and (engine.history("oom") == ["tgi-test"]) == oom
    [summary] = client.api.containers(all=True)
    assert summary["Status"].startswith(f"Exited ({code}) ")


def test_behavior_keyed_by_model_leaves_other_models_serving(
    engine: FakeDockerEngine, client: docker.DockerClient
) -> None:
    engine.set_behavior("crash_loading", model="some/other-model")
    container = run_tgi(client, free_port())
    fake = engine.container(container.id)
    assert fake.behavior is not None and fake.behavior.scenario == "serve"


def test_exit_on_stop_137(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    engine.set_behavior("exit_on_stop_137", load_delay=0.05)
    engine.config.stop_grace_scale = 0.05  # stop(timeout=2) waits 0.1 s before SIGKILL
    container = run_tgi(client, free_port())
    started = time.monotonic()
    container.stop(timeout=2)
    assert 0.09 <= time.monotonic() - started < 1.5
    assert container.wait()["StatusCode"] == 137
    container.reload()
    assert container.attrs["State"]["ExitCode"] == 137 and container.attrs["State"]["OOMKilled"] is False
    assert [r.query for r in engine.requests if r.route.endswith("/stop")] == ["t=2"]
    assert [e.attributes.get("signal") for e in engine.events if e.action == "kill"] == ["15", "9"]


def test_crash_after_serving(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    port = free_port()
    seeded = engine.add_container(ports={"80/tcp": port})
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    engine.crash(seeded)
    container = client.containers.get(seeded.id)
    assert container.status == "exited" and container.attrs["State"]["ExitCode"] == 1
    assert container.logs(stdout=False).decode() == "Error: ShardFailed\n" and refused(port)


# ------------------------------------------------------------------------------ start failures


def test_no_gpu_runtime_start_fails_and_leaves_a_created_container(
    engine: FakeDockerEngine, client: docker.DockerClient
) -> None:
    engine.config.gpu = False
    port = free_port()
    with pytest.raises(docker.errors.APIError) as info:
        run_tgi(client, port)
    assert info.value.status_code == 400
    assert info.value.explanation == 'could not select device driver "" with capabilities: [[gpu]]'
    [left] = client.containers.list(all=True)
    assert left.name == "tgi-test" and left.status == "created"
    assert left.attrs["State"]["Error"] == info.value.explanation and left.attrs["State"]["ExitCode"] == 128
    assert engine.history("start") == [] and refused(port)
    engine.config.gpu = True
    left.start()
    left.reload()
    assert left.status == "running" and left.attrs["State"]["Error"] == ""


def test_port_in_use(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    port = free_port()
    engine.add_container(name="holder", ports={"80/tcp": ("127.0.0.1", port)})
    with pytest.raises(docker.errors.APIError) as info:
        run_tgi(client, port, name="second")
    assert info.value.status_code == 500
    second = engine.container("second")
    assert info.value.explanation == (
        f"driver failed programming external connectivity on endpoint second ({second.endpoint_id}): "
        f"Bind for 0.0.0.0:{port} failed: port is already allocated"
    )
    assert second.status == "created"

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        other = busy.getsockname()[1]
        with pytest.raises(
            docker.errors.APIError, match=rf"Bind for 0.0.0.0:{other} failed: port is already allocated"
        ):
            run_tgi(client, other, name="third")
        engine.config.port_in_use_error = "userland_proxy"
        with pytest.raises(docker.errors.APIError, match="address already in use"):
            client.containers.get("third").start()
    finally:
        busy.close()


# ------------------------------------------------------------------------------ stop / wait / remove


def test_stop_wait_remove(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    port = free_port()
    container = run_tgi(client, port)
    fake = engine.container("tgi-test")
    engine.wait_until(lambda: fake.connected, timeout=3)
    with pytest.raises(docker.errors.APIError) as info:
        container.remove()
    assert info.value.status_code == 409 and info.value.explanation == (
        'cannot remove container "/tgi-test": container is running: stop the container before removing or force remove'
    )
    container.stop(timeout=30)
    assert refused(port) and container.wait() == {"StatusCode": 0, "Error": None}
    container.reload()
    assert container.status == "exited" and container.attrs["State"]["ExitCode"] == 0
    container.stop()  # already stopped: 304, not an error
    container.remove(force=True)
    assert engine.requests[-1].query == "v=False&link=False&force=True"
    with pytest.raises(docker.errors.NotFound, match="No such container: tgi-test"):
        client.containers.get("tgi-test")
    assert engine.history("stop") == ["tgi-test"] and engine.history("destroy") == ["tgi-test"]
    assert engine.containers == [] and engine.created[0].removed


def test_force_remove_kills_and_wait_removed(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    container = run_tgi(client, free_port())
    result: list[dict] = []
    waiter = threading.Thread(target=lambda: result.append(container.wait(condition="removed")))
    waiter.start()
    time.sleep(0.05)
    container.remove(force=True)
    waiter.join(3)
    assert result == [{"StatusCode": 137, "Error": None}]
    assert engine.history("die") == ["tgi-test"]


def test_injected_errors_and_concurrent_clients(
    engine: FakeDockerEngine, client: docker.DockerClient
) -> None:
    engine.inject_error(r"^/containers/json$", 500, "boom")
    with pytest.raises(docker.errors.APIError, match="boom"):
        client.containers.list()
    assert client.containers.list() == []
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            c = docker.from_env()
            for _ in range(10):
                assert c.ping()
                c.containers.list(all=True)
            c.close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == [] and engine.errors == []


def test_healthcheck_kill_restart_and_auto_remove(
    engine: FakeDockerEngine, client: docker.DockerClient
) -> None:
    healthcheck = {
        "test": ["CMD", "curl", "-f", "http://localhost:80/health"],
        "interval": 10**9,
        "retries": 3,
    }
    container = run_tgi(client, free_port(), healthcheck=healthcheck)
    container.reload()
    assert container.attrs["Config"]["Healthcheck"]["Test"][0] == "CMD" and container.health == "starting"
    fake = engine.container(container.id)
    engine.wait_until(lambda: fake.connected, timeout=3)
    container.reload()
    assert container.health == "healthy"
    assert client.api.containers(filters={"health": "healthy"})[0]["Status"].endswith("(healthy)")
    container.kill()
    assert container.wait() == {"StatusCode": 137, "Error": None}
    container.restart(timeout=1)
    container.reload()
    assert container.status == "running" and fake.start_count == 2 and container.health == "starting"

    engine.add_image("busybox")
    temp = client.containers.run("busybox", ["true"], auto_remove=True, detach=True, name="temp")
    temp.kill()
    engine.wait_until(lambda: engine.history("destroy") == ["temp"])
    with pytest.raises(docker.errors.NotFound):
        temp.reload()
