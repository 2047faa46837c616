"""The Docker Engine double (tests/fakes/docker_engine.py) driven by the real docker SDK
(``docker.from_env()`` against ``DOCKER_HOST=tcp://127.0.0.1:PORT``), in the calls the container manager
makes: each test pins a behaviour the manager's tests rely on."""

from __future__ import annotations

import json
import re
import socket
import struct
import threading

import docker
import docker.errors
import docker.types
import httpx
import pytest

from tests.fakes.docker_engine import STDERR, TGI_IMAGE, FakeDockerEngine, TGIBehavior

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
    assert eng.errors == []


@pytest.fixture
def client(engine: FakeDockerEngine):
    c = docker.from_env()
    yield c
    c.close()


def routes(engine: FakeDockerEngine) -> list[tuple[str, str]]:
    return [(r.method, r.route) for r in engine.requests]


def create_tgi(client: docker.DockerClient, port: int, *, name: str = "tgi-test", host_ip: str = "127.0.0.1"):
    """The container manager's create call (its image present)."""
    return client.containers.create(
        TGI_IMAGE,
        command=COMMAND,
        name=name,
        detach=True,
        environment={"HF_TOKEN": "hf_xxx"},
        labels={"app": "tgi-gateway"},
        device_requests=GPUS,
        shm_size="1g",
        ports={"80/tcp": (host_ip, port)},
        volumes={"/srv/tgi-data": {"bind": "/data", "mode": "rw"}},
    )


def start_tgi(engine: FakeDockerEngine, client: docker.DockerClient, port: int | None = None, **kw):
    engine.add_image(TGI_IMAGE)
    container = create_tgi(client, free_port() if port is None else port, **kw)
    container.start()
    return container


# ------------------------------------------------------------------------------ system


def test_from_env_negotiates_then_ping(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    assert client.ping() is True
    assert routes(engine) == [("GET", "/version"), ("GET", "/_ping")]
    first, ping = engine.requests
    assert first.path == "/version" and ping.path == "/v1.45/_ping"  # the constructor's call is unversioned


def test_unknown_routes_answer_404_in_the_engines_shape(engine: FakeDockerEngine) -> None:
    with httpx.Client(base_url=engine.url) as http:
        assert http.get("/v1.41/_ping").text == "OK"  # any version prefix
        r = http.get("/v1.45/info")
    assert r.status_code == 404 and r.json() == {"message": "page not found"}


# ------------------------------------------------------------------------------ images and pulls


def test_images_get_missing_then_seeded(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    with pytest.raises(docker.errors.ImageNotFound, match=re.escape(f"No such image: {TGI_IMAGE}")):
        client.images.get(TGI_IMAGE)
    assert engine.requests[-1].path == f"/v1.45/images/{TGI_IMAGE}/json"  # slashes and colon raw
    image_id = engine.add_image(TGI_IMAGE)
    got = client.images.get(TGI_IMAGE)
    assert got.id == image_id and got.tags == [TGI_IMAGE]
    engine.add_image("localhost:5000/tgi")  # a registry's port is not a tag
    assert client.images.get("localhost:5000/tgi:latest").tags == ["localhost:5000/tgi:latest"]


def test_api_pull_streams_progress_dicts(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    items = list(client.api.pull(REPO, tag=TAG, stream=True, decode=True))
    assert (
        engine.requests[-1].query == "tag=3.3.5&fromImage=ghcr.io%2Fhuggingface%2Ftext-generation-inference"
    )
    assert items[0] == {"status": "Pulling from huggingface/text-generation-inference", "id": "3.3.5"}
    downloading = [i for i in items if i["status"] == "Downloading"]
    assert len({i["id"] for i in downloading}) == 3
    assert all(0 < i["progressDetail"]["current"] <= i["progressDetail"]["total"] for i in downloading)
    assert {i["id"] for i in items if i["status"] == "Download complete"} == {i["id"] for i in downloading}
    assert items[-2]["status"].startswith("Digest: sha256:")
    assert items[-1] == {"status": f"Status: Downloaded newer image for {TGI_IMAGE}"}
    assert client.images.get(TGI_IMAGE).tags == [TGI_IMAGE]
    assert [(p.reference, p.outcome) for p in engine.pulls] == [(TGI_IMAGE, "ok")]


def test_pull_stream_is_chunked_crlf_json(engine: FakeDockerEngine) -> None:
    """docker-py decodes a pull as a stream only when it is chunked (else: one JSON document)."""
    with httpx.Client(base_url=engine.url) as http:
        r = http.post("/v1.45/images/create", params={"fromImage": "busybox", "tag": "1.36"})
    assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
    lines = r.content.split(b"\r\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
    assert b" " not in lines[0].split(b'"status"')[0]  # compact Go-style JSON


@pytest.mark.parametrize(
    "status,message,exc,text",
    [
        (404, None, docker.errors.ImageNotFound, "repository does not exist"),
        (500, "registry down", docker.errors.APIError, "registry down"),
    ],
)
def test_pull_error_before_output_raises_at_call_time(
    engine: FakeDockerEngine,
    client: docker.DockerClient,
    status: int,
    message: str | None,
    exc: type,
    text: str,
) -> None:
    engine.fail_pull(TGI_IMAGE, status, message)
    with pytest.raises(exc) as info:
        client.api.pull(REPO, tag=TAG, stream=True, decode=True)
    assert info.value.status_code == status and text in info.value.explanation
    assert engine.pulls[-1].outcome == "http_error"


def test_pull_error_mid_stream(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    engine.fail_pull(TGI_IMAGE, message="toomanyrequests: rate limit", mid_stream=True)
    items = list(client.api.pull(REPO, tag=TAG, stream=True, decode=True))  # no exception
    assert len(items) == 4 and items[0]["status"].startswith("Pulling from")
    assert items[-1] == {
        "errorDetail": {"message": "toomanyrequests: rate limit"},
        "error": "toomanyrequests: rate limit",
    }
    assert [p.outcome for p in engine.pulls] == ["stream_error"]
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(TGI_IMAGE)


# ------------------------------------------------------------------------------ create, start, inspect


def test_create_records_the_body_start_serves_after_load(
    engine: FakeDockerEngine, client: docker.DockerClient
) -> None:
    with pytest.raises(docker.errors.ImageNotFound, match=re.escape(f"No such image: {TGI_IMAGE}")):
        create_tgi(client, free_port())
    engine.add_image(TGI_IMAGE)
    port = free_port()
    container = create_tgi(client, port)
    assert container.status == "created" and container.name == "tgi-test"
    [create] = [r for r in engine.requests if r.route == "/containers/create"][1:]
    assert create.query == "name=tgi-test"
    [fake] = engine.created
    assert engine.create_bodies == [json.loads(create.body)]
    assert fake.body["HostConfig"]["DeviceRequests"] == [
        {"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert engine.history("create") == ["tgi-test"] and engine.history("start") == []

    container.start()
    assert routes(engine)[-2:] == [
        ("GET", f"/containers/{container.id}/json"),
        ("POST", f"/containers/{container.id}/start"),
    ]
    container.reload()
    attrs = container.attrs
    assert container.status == "running" and attrs["State"]["Running"] and attrs["Config"]["Tty"] is False
    assert container.labels == {"app": "tgi-gateway"} and attrs["Config"]["Cmd"] == COMMAND
    assert attrs["HostConfig"]["ShmSize"] == 1 << 30 and attrs["HostConfig"]["Binds"] == [
        "/srv/tgi-data:/data:rw"
    ]
    assert container.ports == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    assert engine.history("start") == ["tgi-test"]

    assert refused(port)  # loading: nothing listens yet
    engine.wait_until(lambda: fake.connected, timeout=3)
    assert fake.host_port == port and "Connected" in fake.log_text().splitlines()[-1]
    health = httpx.get(f"http://127.0.0.1:{port}/health")
    assert health.status_code == 200 and health.content == b""
    info = httpx.get(f"http://127.0.0.1:{port}/info").json()
    assert (info["model_id"], info["max_input_tokens"], info["max_total_tokens"]) == (MODEL, 1024, 2048)


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


def test_list_by_labels(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    engine.add_container(
        name="tgi-a", labels={"app": "tgi-gateway", "port": "1"}, ports={"80/tcp": free_port()}
    )
    engine.add_container(
        name="tgi-b", labels={"app": "tgi-gateway", "port": "2"}, state="exited", exit_code=1
    )
    engine.add_container(name="other", labels={"app": "else"}, state="created")

    def names(**kw) -> list[str]:
        return sorted(c.name for c in client.containers.list(**kw))

    assert names(filters={"label": "app=tgi-gateway"}, all=True) == ["tgi-a", "tgi-b"]
    assert engine.requests[-3].query.startswith("limit=-1&all=1&size=0&trunc_cmd=0&filters=")
    assert names(filters={"label": ["app=tgi-gateway", "port=2"]}, all=True) == ["tgi-b"]  # AND
    assert names(filters={"label": ["app", "port"]}, all=True) == ["tgi-a", "tgi-b"]  # a key alone
    assert names(filters={"label": "app=tgi-gateway"}) == ["tgi-a"]  # without all: running only
    assert names(all=True) == ["other", "tgi-a", "tgi-b"]
    [exited] = client.containers.list(all=True, filters={"label": "port=2"})
    assert exited.status == "exited" and exited.attrs["State"]["ExitCode"] == 1 and exited.ports == {}


def test_adopt_a_seeded_running_container(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    port = free_port()
    seeded = engine.add_container(
        TGI_IMAGE, ["--model-id", "meetkai/functionary-small-v3.2"], name="tgi-gateway-8080",
        labels={"tgi-gateway.managed": "true", "tgi-gateway.port": str(port)}, ports={"80/tcp": ("127.0.0.1", port)},
    )  # fmt: skip
    [found] = client.containers.list(
        all=True, filters={"label": ["tgi-gateway.managed=true", f"tgi-gateway.port={port}"]}
    )
    assert found.id == seeded.id and found.status == "running" and found.name == "tgi-gateway-8080"
    assert found.ports == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    assert httpx.get(f"http://127.0.0.1:{port}/info").json()["model_id"] == "meetkai/functionary-small-v3.2"
    assert "Connected" in found.logs().decode()  # follow=0: the history, then the end
    assert ("POST", "/containers/create") not in routes(engine)


def test_behavior_keyed_by_model_leaves_other_models_serving(
    engine: FakeDockerEngine, client: docker.DockerClient
) -> None:
    engine.set_behavior("crash_loading", model="some/other-model")
    container = start_tgi(engine, client)
    assert engine.container(container.id).behavior.scenario == "serve"


# ------------------------------------------------------------------------------ logs


def test_logs_follow_streams_frames_until_exit(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    container = start_tgi(engine, client)
    stream = client.api.logs(container.id, stream=True, follow=True)
    logs_at = max(i for i, r in enumerate(engine.requests) if r.route.endswith("/logs"))
    assert engine.requests[logs_at].query == "stderr=1&stdout=1&timestamps=0&follow=1&tail=all"
    assert routes(engine)[logs_at + 1] == (
        "GET",
        f"/containers/{container.id}/json",
    )  # while the logs are open
    assert engine.log_streams_open == 1
    seen: list[bytes] = []
    for chunk in stream:
        seen.append(chunk)
        if b"Connected" in chunk:
            break
    text = b"".join(seen).decode()
    assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in seen)  # one frame per line
    for needle in (f'Args {{ model_id: "{MODEL}"', "Starting check and download process for",
                   "Waiting for shard to be ready... rank=0", "Starting Webserver", "Connected"):  # fmt: skip
        assert needle in text

    rest: list[bytes] = []
    reader = threading.Thread(target=lambda: rest.extend(stream))
    reader.start()
    container.stop(timeout=5)
    reader.join(3)
    assert not reader.is_alive(), "the follow stream ends when the container exits"
    assert b"".join(rest).decode().endswith("shard terminated rank=0\n")
    engine.wait_until(lambda: engine.log_streams_open == 0)


def test_logs_multiplexed_framing(engine: FakeDockerEngine) -> None:
    seeded = engine.add_container(ports={"80/tcp": free_port()}, behavior="crash_loading")
    engine.wait_until(lambda: not seeded.running)
    with httpx.Client(base_url=engine.url) as http:
        r = http.get(f"/v1.45/containers/{seeded.name}/logs", params={"stdout": 1, "stderr": 1, "follow": 1})
    assert r.headers["content-type"] == "application/vnd.docker.multiplexed-stream"
    data, frames = r.content, []
    while data:
        kind, size = struct.unpack(">BxxxL", data[:8])
        frames.append((kind, data[8 : 8 + size]))
        data = data[8 + size :]
    assert {k for k, _ in frames} == {1, 2}
    assert frames[-1] == (2, b"Error: ShardCannotStart\n")


def test_log_stream_closed_by_client(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    container = start_tgi(engine, client)
    stream = client.api.logs(container.id, stream=True, follow=True)
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
    container = start_tgi(engine, client, port)
    fake = engine.container(container.id)
    engine.wait_until(lambda: not fake.running)
    container.reload()
    state = container.attrs["State"]
    assert (container.status, state["ExitCode"], state["OOMKilled"], state["Running"]) == (
        "exited",
        code,
        oom,
        False,
    )
    assert container.ports == {} and refused(port)
    assert fake.log_text(STDERR) == stderr
    out = container.logs().decode()
    for needle in needles:
        assert needle in out
    assert "Connected" not in out
    assert engine.history("die") == ["tgi-test"]


# ------------------------------------------------------------------------------ start failures


def test_no_gpu_runtime_start_fails_and_leaves_a_created_container(
    engine: FakeDockerEngine, client: docker.DockerClient
) -> None:
    engine.config.gpu = False
    port = free_port()
    with pytest.raises(docker.errors.APIError) as info:
        start_tgi(engine, client, port)
    assert info.value.status_code == 400
    assert info.value.explanation == 'could not select device driver "" with capabilities: [[gpu]]'
    [left] = client.containers.list(all=True)
    assert left.name == "tgi-test" and left.status == "created"
    assert engine.history("start") == [] and refused(port)
    engine.config.gpu = True
    left.start()
    left.reload()
    assert left.status == "running"


def test_port_in_use(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    port = free_port()
    holder = TGIBehavior(load_delay=30)
    engine.add_container(
        name="holder", ports={"80/tcp": ("127.0.0.1", port)}, behavior=holder, wait_ready=False
    )
    with pytest.raises(docker.errors.APIError) as info:  # still loading: the port is bound, not listening
        start_tgi(engine, client, port, name="second")
    assert info.value.status_code == 500
    assert re.fullmatch(
        rf"driver failed programming external connectivity on endpoint second \([0-9a-f]{{64}}\): "
        rf"Bind for 127.0.0.1:{port} failed: port is already allocated",
        info.value.explanation,
    )
    assert engine.container("second").status == "created"

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        other = squatter.getsockname()[1]
        with pytest.raises(docker.errors.APIError) as info:
            start_tgi(engine, client, other, name="third", host_ip="")
    assert info.value.explanation.endswith(
        f"failed to bind port 0.0.0.0:{other}/tcp: Error starting userland proxy: listen tcp4 0.0.0.0:{other}: "
        "bind: address already in use"
    )


# ------------------------------------------------------------------------------ stop and remove


def test_stop_then_remove(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    port = free_port()
    container = start_tgi(engine, client, port)
    fake = engine.container("tgi-test")
    engine.wait_until(lambda: fake.connected, timeout=3)
    container.stop(timeout=30)
    assert engine.requests[-1].query == "t=30"
    assert refused(port)
    container.reload()
    assert container.status == "exited" and container.attrs["State"]["ExitCode"] == 0
    assert "webserver terminated" in fake.log_text()
    container.stop()  # already stopped: 304, not an error
    container.remove(force=True)
    assert engine.requests[-1].query == "v=False&link=False&force=True"
    with pytest.raises(docker.errors.NotFound, match="No such container: tgi-test"):
        client.containers.get("tgi-test")
    assert engine.history("die") == engine.history("destroy") == ["tgi-test"]
    assert engine.containers == [] and engine.created[0].removed


def test_stop_kills_after_the_grace_period(engine: FakeDockerEngine, client: docker.DockerClient) -> None:
    container = start_tgi(engine, client)
    container.stop(timeout=0)  # no grace: SIGKILL
    container.reload()
    assert container.status == "exited" and container.attrs["State"]["ExitCode"] == 137
    assert container.attrs["State"]["OOMKilled"] is False


def test_force_remove_kills_a_running_container(
    engine: FakeDockerEngine, client: docker.DockerClient
) -> None:
    port = free_port()
    container = start_tgi(engine, client, port)
    stream = client.api.logs(container.id, stream=True, follow=True)
    container.remove(force=True)
    engine.wait_until(lambda: engine.log_streams_open == 0)  # the follow stream ended
    stream.close()
    stream._response.close()
    assert engine.created[0].exit_code == 137 and refused(port)
    assert engine.history("die") == engine.history("destroy") == ["tgi-test"]


def test_concurrent_clients(engine: FakeDockerEngine) -> None:
    """The manager follows the logs with a client of its own while another one polls."""
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
    assert errors == []
