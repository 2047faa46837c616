"""A test double of the Docker Engine API as the container manager drives it through docker-py 7.x; its
containers run a simulated TGI launcher.

Theory of operation
===================

:class:`FakeDockerEngine` is a real HTTP/1.1 server (Starlette on uvicorn's h11 protocol, chunked
streaming, concurrent keep-alive connections) on ``127.0.0.1``, an ephemeral port, run on its own event
loop in a daemon thread. :meth:`~FakeDockerEngine.apply_env` points the real SDK at it
(``DOCKER_HOST=tcp://127.0.0.1:PORT``, no TLS, no proxy), so ``docker.from_env()`` works as against a
daemon::

    with FakeDockerEngine() as engine:
        engine.apply_env(monkeypatch)
        ContainerManager(spec).ensure_tgi()       # pulls, creates, starts, follows the logs
        [body] = engine.create_bodies             # the create body as docker-py sent it
        [c] = engine.containers                   # the engine's view: status, logs, c.tgi (a FakeTGI)

Every state change (containers, logs, pulls) happens on the engine's loop; tests read the records from
their own thread and wait with :meth:`~FakeDockerEngine.wait_until`.

What it serves
--------------

Exactly the calls :mod:`tgi_gateway.container_manager` makes (the wire is in
``reference/tgi/DOCKER_API.md``); paths with any ``/vN.N`` prefix, or none:

=================================  ==========================================================================
docker-py call                     route and answer
=================================  ==========================================================================
``from_env()``, ``ping()``         ``GET /version`` (``ApiVersion`` 1.45), ``GET /_ping`` (``OK``)
``images.get(ref)``                ``GET /images/<ref>/json``: ``{Id, RepoTags}``, or 404 ``No such image:
                                   <ref>`` (``ImageNotFound``)
``api.pull(repo, tag, stream,      ``POST /images/create?fromImage&tag``: chunked ``application/json``, one
decode)``                          compact object + ``\\r\\n`` per chunk (``Pulling from``, per layer
                                   ``Pulling fs layer``/``Downloading`` with ``progressDetail``
                                   ``{current,total}``/``Download complete``/``Pull complete``, ``Digest:``,
                                   ``Status: Downloaded newer image for <ref>``). :meth:`fail_pull`: an HTTP
                                   error ``{"message"}`` before any output, or (``mid_stream``) status 200
                                   and, after three lines, ``{"errorDetail":{"message"},"error"}``
``containers.create(...)``         ``POST /containers/create?name``: 201 ``{Id, Warnings}``; 404 ``No such
                                   image``; 409 when the name is in use
``containers.list(all, filters)``  ``GET /containers/json``: ``label`` filters AND-ed (``key`` or
                                   ``key=value``); without ``all`` only running containers
``reload()``, ``.status``,         ``GET /containers/<id or name>/json``: ``Id``, ``Name``, ``Image``,
``.labels``, ``.name``             ``State`` {``Status``, ``Running``, ``ExitCode``, ``OOMKilled``},
                                   ``Config`` {``Tty`` false, ``Image``, ``Cmd``, ``Env``, ``Labels``},
                                   ``HostConfig`` as sent, ``NetworkSettings.Ports`` while running
``start()``                        204; 304 when running; 400 ``could not select device driver "" with
                                   capabilities: [[gpu]]`` when ``config.gpu`` is false and a device request
                                   asks for a GPU; 500 ``driver failed programming external connectivity
                                   on endpoint …``: ``Bind for <ip>:<port> failed: port is already
                                   allocated`` (another container publishes it) or ``… Error starting
                                   userland proxy: … bind: address already in use`` (anything else holds it)
``stop(timeout=t)``                SIGTERM: the launcher shuts down (exit 0); SIGKILL (137) if it has not
                                   within ``t × config.stop_grace_scale`` s; 204, or 304 when not running
``remove(force=True)``             ``DELETE /containers/<id>``: kills a running container, 204
``api.logs(id, stream=True,        ``GET /containers/<id>/logs``: headers at once, then one multiplexed frame
follow=True)``                     (8-byte header ``>BxxxL``, stream 1 stdout / 2 stderr) per log line, the
                                   whole history first; with ``follow``, ends when the container exits or
                                   is removed. The inspect docker-py makes meanwhile (``Config.Tty``) is
                                   served
=================================  ==========================================================================

Anything else: 404 ``{"message":"page not found"}``. Every error body is the Engine's ``{"message"}``.

Containers
----------

A started container is a simulated ``text-generation-launcher``. When its port ``80/tcp`` (the image's
``PORT``) is published on host port P, it binds a :class:`tests.fakes.tgi.FakeTGI` to ``127.0.0.1:P``
(``model_id``, ``max_input_tokens``, ``max_total_tokens``, ``max_top_n_tokens`` from ``--model-id``, ``--max-input-tokens``,
``--max-total-tokens``, ``--max-top-n-tokens``; ``lora_adapters`` from ``--lora-adapters`` or ``LORA_ADAPTERS``): the
port refuses connections while the model loads and serves after ``Connected`` is logged. The launcher writes TGI 3.3's tracing lines on stdout and its last words
(``Error: <Variant>``) on stderr; what it does is a :class:`TGIBehavior` chosen at start
(:meth:`FakeDockerEngine.set_behavior` by ``--model-id``, else the engine's ``behavior``):

``serve`` (default)
    ``Starting check and download process``, ``Waiting for shard to be ready... rank=0`` every
    ``shard_wait_interval`` s, ``Connected`` after ``load_delay`` s; serves until stopped.
``crash_loading``
    after ``fail_after`` s: a CUDA out-of-memory traceback, ``Shard 0 failed to start``; stderr
    ``Error: ShardCannotStart``; exit 1.
``oom_killed``
    after ``fail_after`` s the cgroup OOM killer: exit 137, ``OOMKilled`` true, no last words.
``gated_model``
    after ``fail_after`` s the weight download fails (``GatedRepoError: 401``, ``Cannot access gated
    repo``, ``Access to model <model> is restricted``); stderr ``Error: DownloadError``; exit 1.

Test controls and observations
------------------------------

Controls: :meth:`add_image`, :meth:`add_container` (a container an earlier run left: running, exited or
created), :meth:`set_behavior`, :meth:`fail_pull`, :attr:`config` (``gpu``, ``stop_grace_scale``; change
them at any time). Observations: :attr:`requests` (:class:`DockerRequest`), :attr:`pulls`
(:class:`PullRecord`), :attr:`created`, :attr:`create_bodies`, :attr:`containers`, :meth:`container`,
:meth:`history` (container names per ``create``/``start``/``die``/``destroy``), :attr:`log_streams_open`,
:attr:`errors` (exceptions of the double itself).

Not modelled
------------

Other endpoints and query parameters: ``/info``, image list/removal, ``kill``, ``restart``, ``wait``,
exec, attach, events, build; list filters other than ``label``; ``logs`` parameters other than
``follow`` (always stdout and stderr, from the first line, no timestamps); ``DELETE`` always forces; a
failed start leaves no ``State.Error``. No API version check (any ``/vN.N`` is accepted), no reference
normalisation (``ubuntu`` is ``ubuntu:latest``, not ``docker.io/library/ubuntu:latest``), no generated
names (an unnamed container is named after its id), no processes, volumes or networks (``Binds``,
``ShmSize``, ``DeviceRequests`` are only recorded), no registry or authentication (every pull succeeds
unless :meth:`fail_pull` says otherwise). TGI's log texts are abridged; timings and sizes are invented.
Only port ``80/tcp`` runs a server; other published ports are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.serve import QuickServer, loopback_socket
from tests.fakes.tgi import FakeTGI

__all__ = [
    "SCENARIOS",
    "STDERR",
    "STDOUT",
    "TGI_IMAGE",
    "DockerRequest",
    "EngineConfig",
    "FakeContainer",
    "FakeDockerEngine",
    "PullRecord",
    "TGIBehavior",
]

TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.5"
API_VERSION = "1.45"
SCENARIOS = ("serve", "crash_loading", "oom_killed", "gated_model")
TGI_PORT = "80/tcp"  # the TGI image's PORT: the only published port a FakeTGI serves on
STDOUT, STDERR = 1, 2
SHARD = "shard-manager: "
STOP_DURATION = 0.02  # a graceful shutdown of the launcher takes this long
_NEVER = 24 * 3600.0
_SHARD_OOM = """Shard complete standard error output:

Traceback (most recent call last):
  File "/usr/src/server/text_generation_server/utils/weights.py", line 226, in get_tensor
    tensor = tensor.to(device=self.device)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1002.00 MiB. GPU 0 has a total capacity of \
23.68 GiB of which 512.44 MiB is free. Process 41 has 23.17 GiB memory in use.
 rank=0"""
_GATED = """requests.exceptions.HTTPError: 401 Client Error: Unauthorized for url: \
https://huggingface.co/api/models/{model}
huggingface_hub.errors.GatedRepoError: 401 Client Error.
Cannot access gated repo for url https://huggingface.co/api/models/{model}.
Access to model {model} is restricted. You must have access to it and be authenticated to access it. \
Please log in."""


@dataclass
class TGIBehavior:
    """What the TGI launcher in a container does once started (see the module docstring)."""

    scenario: str = "serve"
    load_delay: float = 0.3  # start -> "Connected" (the FakeTGI listens)
    fail_after: float = 0.2  # start -> exit, for every scenario but serve
    shard_wait_interval: float = 0.1  # "Waiting for shard to be ready... rank=0" (TGI: every 10 s)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; one of {SCENARIOS}")


@dataclass
class EngineConfig:
    """Daemon-wide knobs; change them at any time."""

    gpu: bool = True  # an NVIDIA runtime: GPU device requests can be satisfied
    stop_grace_scale: float = 1.0  # stop's grace period is t * this many seconds


@dataclass
class DockerRequest:
    method: str
    path: str  # as sent, with the version prefix
    route: str  # without it
    query: str  # raw query string
    body: bytes


@dataclass
class PullRecord:
    reference: str  # "repo:tag"
    outcome: str = "running"  # until the stream has ended: ok | http_error | stream_error


@dataclass(eq=False)
class FakeContainer:
    """A container as the engine keeps it; changed on the engine's loop, read from tests freely."""

    id: str
    name: str
    image_id: str
    body: dict  # the create body as sent
    status: str = "created"  # created | running | exited
    exit_code: int = 0
    oom_killed: bool = False
    removed: bool = False
    behavior: TGIBehavior | None = None  # chosen at the last start
    tgi: FakeTGI | None = None  # the server of the last start
    logs: list[tuple[int, str]] = field(default_factory=list)  # (STDOUT or STDERR, line)
    _process: asyncio.Task | None = field(default=None, repr=False)  # start .. exit
    _launcher: asyncio.Task | None = field(default=None, repr=False)  # cancelled by SIGKILL
    _sigterm: asyncio.Event | None = field(default=None, repr=False)
    _tgi_stopped: asyncio.Future | None = field(default=None, repr=False)
    _connected: bool = False

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def connected(self) -> bool:
        """Running, and ``Connected`` was logged: the FakeTGI listens, ``/health`` answers."""
        return self._connected and self.running

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.body.get("Labels") or {})

    @property
    def cmd(self) -> list[str]:
        return list(self.body.get("Cmd") or [])

    @property
    def model_id(self) -> str:
        return _launcher_args(self.cmd).get("model_id", "")

    @property
    def host_port(self) -> int | None:
        """The host port TGI's port is published on, while running."""
        return self.tgi.port if self.tgi is not None and self.running else None

    def log_text(self, stream: int | None = None) -> str:
        return "".join(text + "\n" for s, text in list(self.logs) if stream in (None, s))


class _ApiError(Exception):
    """Answered as the Engine's ``{"message"}`` with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Terminated(Exception):
    """SIGTERM reached the simulated launcher."""


class FakeDockerEngine:
    """The Docker Engine double. See the module docstring.

    ``behavior``: the default :class:`TGIBehavior` (or a scenario name); ``config``: :class:`EngineConfig`
    fields."""

    def __init__(self, *, behavior: TGIBehavior | str | None = None, **config: Any) -> None:
        self.config = EngineConfig(**config)
        self.behavior = _behavior(behavior)
        self.behaviors: dict[str, TGIBehavior] = {}  # by model id
        self.errors: list[BaseException] = []
        self.port = 0
        self._images: dict[str, str] = {}  # reference -> id
        self._created: list[FakeContainer] = []
        self._requests: list[DockerRequest] = []
        self._pulls: list[PullRecord] = []
        # reference -> (status, message, mid_stream), from fail_pull
        self._pull_failures: dict[str, tuple[int, str | None, bool]] = {}
        self._history: list[tuple[str, str]] = []  # (action, container name)
        self._log_streams_open = 0
        self._changed: asyncio.Event | None = None  # set, and replaced, at every state change
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: QuickServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        container = r"/containers/(?P<c>[^/]+)"
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = [
            (method, re.compile(pattern), handler)
            for method, pattern, handler in (
                ("GET", r"/version", self._version),
                ("GET", r"/_ping", self._ping),
                ("GET", r"/images/(?P<ref>.+)/json", self._image),
                ("POST", r"/images/create", self._pull),
                ("POST", r"/containers/create", self._create_route),
                ("GET", r"/containers/json", self._list),
                ("GET", container + r"/json", self._inspect_route),
                ("POST", container + r"/start", self._start_route),
                ("POST", container + r"/stop", self._stop_route),
                ("GET", container + r"/logs", self._logs),
                ("DELETE", container, self._remove_route),
            )
        ]
        self._app = Starlette(
            routes=[Route("/{rest:path}", self._dispatch, methods=["GET", "POST", "DELETE"])]
        )

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def docker_host(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def apply_env(self, monkeypatch: Any) -> None:
        """Point ``docker.from_env()`` here (plain HTTP, no proxy for loopback)."""
        monkeypatch.setenv("DOCKER_HOST", self.docker_host)
        monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
        monkeypatch.delenv("DOCKER_CERT_PATH", raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    def start(self, timeout: float = 5.0) -> Self:
        if self._thread is not None:
            raise RuntimeError("already started")
        sock = loopback_socket()
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._thread_main, args=(sock,), name="fake-docker", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"fake Docker engine did not start within {timeout} s")
        if self._startup_error is not None:
            raise RuntimeError("fake Docker engine failed to start") from self._startup_error
        return self

    def _thread_main(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(sock))
        except BaseException as e:  # noqa: BLE001 - reported through start()
            if not self._ready.is_set():
                self._startup_error = e
            self._ready.set()

    async def _serve(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            http="h11",
            ws="none",
            log_config=None,
            log_level=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=3600,
            backlog=4096,
        )
        self._server = QuickServer(config, on_started=self._ready.set, drain_timeout=0.5)
        try:
            await self._server.serve(sockets=[sock])
        finally:
            await self._kill_all()
            self._ready.set()
            sock.close()

    async def _kill_all(self) -> None:
        for c in self.containers:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._kill(c), 5.0)

    def stop(self, timeout: float = 5.0) -> None:
        """Kill every container (their FakeTGIs stop), then stop the server. Idempotent."""
        thread, loop, server = self._thread, self._loop, self._server
        if thread is None:
            return
        if loop is not None and server is not None:
            with contextlib.suppress(Exception):  # the loop may be gone already
                asyncio.run_coroutine_threadsafe(self._kill_all(), loop).result(timeout)
                loop.call_soon_threadsafe(server.request_exit)
        thread.join(timeout)
        if thread.is_alive() and server is not None:
            server.force_exit = True
            thread.join(1.0)
        self._thread = None
        for c in self.created:  # a stuck loop: stop the FakeTGIs directly
            if c.tgi is not None:
                with contextlib.suppress(Exception):
                    c.tgi.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_loop(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the engine's loop from the test's thread."""
        if self._loop is None:
            raise RuntimeError("start the engine first")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ---------------------------------------------------------------- change notification (on the loop)

    def _notify(self) -> None:
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate()``, re-checked at every state change; False at the timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not predicate():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            assert self._changed is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
        return True

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.005) -> None:
        """From the test: poll ``predicate`` until true, else AssertionError."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            time.sleep(interval)

    # ---------------------------------------------------------------- test controls

    def add_image(self, reference: str) -> str:
        """Seed an image (``repo[:tag]``); returns its id."""
        ref = _reference(reference)
        return self._images.setdefault(ref, "sha256:" + hashlib.sha256(ref.encode()).hexdigest())

    def set_behavior(
        self, behavior: TGIBehavior | str | None = None, *, model: str, **fields: Any
    ) -> TGIBehavior:
        """What containers of the model id ``model`` (``--model-id``) do when started (the others: the
        engine's ``behavior``). ``behavior``: a :class:`TGIBehavior` or a scenario name; ``fields``: its fields."""
        self.behaviors[model] = b = _behavior(behavior, **fields)
        return b

    def fail_pull(
        self, image: str, status: int = 404, message: str | None = None, *, mid_stream: bool = False
    ) -> None:
        """Make every pull of ``image`` (``repo[:tag]``) fail: with an HTTP ``status`` before any output, or
        (``mid_stream``) with an error line after three progress lines."""
        self._pull_failures[_reference(image)] = (status, message, mid_stream)

    def add_container(
        self,
        image: str = TGI_IMAGE,
        command: list[str] | None = None,
        *,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        ports: dict[str, int | tuple[str, int]] | None = None,
        state: str = "running",
        exit_code: int = 0,
        behavior: TGIBehavior | str | None = None,
        wait_ready: bool = True,
    ) -> FakeContainer:
        """Seed a container as an earlier process left it (its image too). ``ports`` as docker-py takes
        them (``{"80/tcp": port}`` or ``{"80/tcp": (ip, port)}``). ``state``: ``running`` (``behavior``, by
        default the engine's for its model with no load time; with ``wait_ready`` this returns once its
        FakeTGI serves), ``exited`` (with ``exit_code``) or ``created``."""
        if state not in ("running", "exited", "created"):
            raise ValueError(f"state must be running, exited or created, not {state!r}")
        self.add_image(image)
        bindings = {
            port: [
                {"HostIp": host[0], "HostPort": str(host[1])}
                if isinstance(host, tuple)
                else {"HostIp": "", "HostPort": str(host)}
            ]
            for port, host in (ports or {}).items()
        }
        body = {
            "Image": image,
            "Cmd": list(command or []),
            "Labels": dict(labels or {}),
            "HostConfig": {"PortBindings": bindings},
        }

        async def seed() -> FakeContainer:
            c = self._create(body, name)
            if state == "running":
                b = _behavior(behavior) if behavior is not None else self._behavior_for(c)
                await self._start(c, b if behavior is not None else dataclasses.replace(b, load_delay=0.0))
            elif state == "exited":
                c.status, c.exit_code = "exited", exit_code
                self._notify()
            return c

        c = self._on_loop(seed())
        if wait_ready and c.tgi is not None and c.behavior.scenario == "serve":
            self.wait_until(lambda: c.connected, timeout=5.0 + c.behavior.load_delay)
        return c

    # ---------------------------------------------------------------- observations

    @property
    def requests(self) -> list[DockerRequest]:
        return list(self._requests)

    @property
    def pulls(self) -> list[PullRecord]:
        return list(self._pulls)

    @property
    def created(self) -> list[FakeContainer]:
        """Every container ever created (removed ones too), in order."""
        return list(self._created)

    @property
    def create_bodies(self) -> list[dict]:
        """The create bodies, as sent (seeded containers' too)."""
        return [c.body for c in self.created]

    @property
    def containers(self) -> list[FakeContainer]:
        """The containers that exist now (not removed)."""
        return [c for c in self.created if not c.removed]

    def container(self, ident: str) -> FakeContainer:
        """By id or name, removed ones too (the newest of that name); KeyError if unknown."""
        for c in reversed(self.created):
            if ident in (c.id, c.name):
                return c
        raise KeyError(ident)

    def history(self, action: str) -> list[str]:
        """Names of the containers that saw ``action`` (create, start, die, destroy), in order."""
        return [name for act, name in list(self._history) if act == action]

    @property
    def log_streams_open(self) -> int:
        return self._log_streams_open

    # ---------------------------------------------------------------- HTTP

    async def _dispatch(self, request: Request) -> Response:
        path = request.url.path
        route = re.sub(r"^/v\d+\.\d+(?=/)", "", path)
        body = await request.body()
        self._requests.append(DockerRequest(request.method, path, route, request.url.query, body))
        query = dict(request.query_params)
        try:
            for method, pattern, handler in self._routes:
                m = pattern.fullmatch(route)
                if m and method == request.method:
                    args = [self._get(v) if k == "c" else v for k, v in m.groupdict().items()]
                    return await handler(query, body, *args)
            raise _ApiError(404, "page not found")
        except _ApiError as e:
            return _json({"message": e.message}, e.status)
        except Exception as e:  # noqa: BLE001 - a bug in the double: answer like the daemon, keep it
            self.errors.append(e)
            return _json({"message": f"fake docker engine error: {e!r}"}, 500)

    def _get(self, ident: str) -> FakeContainer:
        for c in self.containers:
            if ident in (c.id, c.name):
                return c
        raise _ApiError(404, f"No such container: {ident}")

    def _event(self, action: str, c: FakeContainer) -> None:
        self._history.append((action, c.name))
        self._notify()

    async def _version(self, query: dict, body: bytes) -> Response:
        return _json(
            {
                "Version": "26.1.0",
                "ApiVersion": API_VERSION,
                "MinAPIVersion": "1.24",
                "Os": "linux",
                "Arch": "amd64",
            }
        )

    async def _ping(self, query: dict, body: bytes) -> Response:
        return Response("OK", media_type="text/plain")

    # ---------------------------------------------------------------- images

    async def _image(self, query: dict, body: bytes, ref: str) -> Response:
        image_id = self._images.get(_reference(ref))
        if image_id is None:
            raise _ApiError(404, f"No such image: {ref}")
        return _json({"Id": image_id, "RepoTags": [_reference(ref)]})

    async def _pull(self, query: dict, body: bytes) -> Response:
        ref = _reference(query.get("fromImage", ""), query.get("tag"))
        record = PullRecord(ref)
        self._pulls.append(record)
        status, message, mid_stream = self._pull_failures.get(ref, (0, None, False))
        if status and not mid_stream:
            record.outcome = "http_error"
            repo = ref.rsplit(":", 1)[0]
            raise _ApiError(
                status,
                message
                or f"pull access denied for {repo}, repository does not exist or may "
                "require 'docker login': denied: requested access to the resource is denied",
            )
        lines = _pull_lines(ref)
        if mid_stream:
            message = message or "failed to register layer: no space left on device"
            lines[3:] = [{"errorDetail": {"message": message}, "error": message}]

        async def stream() -> Any:
            for i, line in enumerate(lines):
                if i == len(lines) - 1 and not mid_stream:
                    self.add_image(ref)  # before the last line, which a reader may act on
                yield json.dumps(line, separators=(",", ":")).encode() + b"\r\n"
            record.outcome = "stream_error" if mid_stream else "ok"

        return StreamingResponse(stream(), media_type="application/json")

    # ---------------------------------------------------------------- containers: create, list, inspect

    async def _create_route(self, query: dict, body: bytes) -> Response:
        c = self._create(json.loads(body), query.get("name"))
        return _json({"Id": c.id, "Warnings": []}, 201)

    def _create(self, body: dict, name: str | None) -> FakeContainer:
        image_id = self._images.get(_reference(body.get("Image", "")))
        if image_id is None:
            raise _ApiError(404, f"No such image: {body.get('Image')}")
        cid = secrets.token_hex(32)
        name = name or cid[:12]
        for other in self.containers:
            if other.name == name:
                raise _ApiError(
                    409,
                    f'Conflict. The container name "/{name}" is already in use by container "{other.id}". '
                    "You have to remove (or rename) that container to be able to reuse that name.",
                )
        c = FakeContainer(id=cid, name=name, image_id=image_id, body=body)
        self._created.append(c)
        self._event("create", c)
        return c

    async def _list(self, query: dict, body: bytes) -> Response:
        wanted = json.loads(query.get("filters") or "{}").get("label", [])
        show_all = _true(query.get("all"))

        def matches(labels: dict[str, str]) -> bool:
            return all(
                k in labels and (not sep or labels[k] == v)
                for k, sep, v in (w.partition("=") for w in wanted)
            )

        return _json(
            [
                {
                    "Id": c.id,
                    "Names": ["/" + c.name],
                    "Image": c.body.get("Image"),
                    "Labels": c.labels,
                    "State": c.status,
                }
                for c in reversed(self.containers)
                if (show_all or c.running) and matches(c.labels)
            ]
        )

    async def _inspect_route(self, query: dict, body: bytes, c: FakeContainer) -> Response:
        ports = {}
        if c.host_port is not None:
            host_ip = c.body["HostConfig"]["PortBindings"][TGI_PORT][0].get("HostIp") or "0.0.0.0"
            ports = {TGI_PORT: [{"HostIp": host_ip, "HostPort": str(c.host_port)}]}
        return _json(
            {
                "Id": c.id,
                "Name": "/" + c.name,
                "Image": c.image_id,
                "State": {
                    "Status": c.status,
                    "Running": c.running,
                    "ExitCode": c.exit_code,
                    "OOMKilled": c.oom_killed,
                },
                "Config": {
                    "Tty": False,
                    "Image": c.body.get("Image"),
                    "Cmd": c.cmd,
                    "Env": c.body.get("Env") or [],
                    "Labels": c.labels,
                },
                "HostConfig": c.body.get("HostConfig") or {},
                "NetworkSettings": {"Ports": ports},
            }
        )

    # ---------------------------------------------------------------- containers: start, stop, remove

    async def _start_route(self, query: dict, body: bytes, c: FakeContainer) -> Response:
        if c.running:
            return Response(status_code=304)
        await self._start(c, self._behavior_for(c))
        return Response(status_code=204)

    def _behavior_for(self, c: FakeContainer) -> TGIBehavior:
        return self.behaviors.get(c.model_id, self.behavior)

    async def _start(self, c: FakeContainer, b: TGIBehavior) -> None:
        host = c.body.get("HostConfig") or {}
        for request in host.get("DeviceRequests") or []:
            caps = request.get("Capabilities") or []
            if not self.config.gpu and any("gpu" in group for group in caps):
                shown = "[" + " ".join("[" + " ".join(group) + "]" for group in caps) + "]"  # Go's %v
                raise _ApiError(
                    400,
                    f'could not select device driver "{request.get("Driver", "")}" with '
                    f"capabilities: {shown}",
                )
        tgi = None
        [binding, *_] = host.get("PortBindings", {}).get(TGI_PORT) or [None]
        if binding is not None:
            ip, port = binding.get("HostIp") or "0.0.0.0", int(binding["HostPort"])
            endpoint = f"{c.name} ({secrets.token_hex(32)})"
            prefix = f"driver failed programming external connectivity on endpoint {endpoint}"
            if any(other.host_port == port for other in self.containers):
                raise _ApiError(500, f"{prefix}: Bind for {ip}:{port} failed: port is already allocated")
            try:
                loopback_socket(port).close()
            except OSError:
                raise _ApiError(
                    500,
                    f"{prefix}: failed to bind port {ip}:{port}/tcp: Error starting userland "
                    f"proxy: listen tcp4 {ip}:{port}: bind: address already in use",
                ) from None
            load_delay = max(b.load_delay, 0.001) if b.scenario == "serve" else _NEVER  # > 0: start() returns
            tgi = FakeTGI(port=port, load_delay=load_delay, **_launcher_args(c.cmd, c.body.get("Env") or []))
            await asyncio.to_thread(tgi.start)
        c.status, c.exit_code, c.oom_killed, c.behavior, c.tgi = "running", 0, False, b, tgi
        c._connected, c._sigterm, c._tgi_stopped = False, asyncio.Event(), None
        c._launcher = asyncio.create_task(self._launch(c, b))  # here: a SIGKILL right after start finds it
        c._process = asyncio.create_task(self._run_container(c))
        self._event("start", c)

    async def _stop_route(self, query: dict, body: bytes, c: FakeContainer) -> Response:
        if not c.running:
            return Response(status_code=304)
        assert c._sigterm is not None
        c._sigterm.set()
        grace = int(query.get("t") or 10) * self.config.stop_grace_scale
        if not await self._until(lambda: not c.running, grace):
            await self._kill(c)
        return Response(status_code=204)

    async def _remove_route(self, query: dict, body: bytes, c: FakeContainer) -> Response:
        await self._kill(c)
        c.removed = True
        self._event("destroy", c)
        return Response(status_code=204)

    async def _kill(self, c: FakeContainer) -> None:
        """SIGKILL: the launcher stops where it is, exit 137."""
        if c.running and c._process is not None:
            if c._launcher is not None:
                c._launcher.cancel()
            await asyncio.shield(c._process)

    # ---------------------------------------------------------------- logs

    async def _logs(self, query: dict, body: bytes, c: FakeContainer) -> Response:
        follow = _true(query.get("follow"))

        async def frames() -> Any:
            self._log_streams_open += 1
            self._notify()
            try:
                sent = 0
                while True:
                    new = c.logs[sent:]
                    sent += len(new)
                    if new:
                        yield b"".join(
                            struct.pack(">BxxxL", s, len(t.encode()) + 1) + t.encode() + b"\n" for s, t in new
                        )
                    if not follow or not c.running or c.removed:  # every line was logged before the exit
                        return
                    await self._until(lambda n=sent: len(c.logs) > n or not c.running or c.removed)
            finally:
                self._log_streams_open -= 1
                self._notify()

        return StreamingResponse(frames(), media_type="application/vnd.docker.multiplexed-stream")

    # ---------------------------------------------------------------- the simulated launcher

    def _log(
        self,
        c: FakeContainer,
        msg: str,
        *,
        level: str = "INFO",
        span: str = "",
        target: str = "text_generation_launcher",
    ) -> None:
        now = time.time_ns()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9)) + f".{now % 10**9 // 1000:06d}Z"
        self._raw(c, f"{stamp} {level:>5} {span}{target}: {msg}")

    def _raw(self, c: FakeContainer, text: str, stream: int = STDOUT) -> None:
        c.logs.extend((stream, line) for line in text.split("\n"))
        self._notify()

    async def _sleep(self, c: FakeContainer, seconds: float) -> None:
        """Sleep; raise _Terminated when SIGTERM arrives."""
        assert c._sigterm is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: it may swallow a SIGKILL (cancel) on 3.11
                await c._sigterm.wait()
        if c._sigterm.is_set():
            raise _Terminated

    async def _run_container(self, c: FakeContainer) -> None:
        """The container's life from start to exit."""
        assert c._launcher is not None
        try:
            code, oom = await c._launcher
        except asyncio.CancelledError:  # SIGKILL
            code, oom = 137, False
        except Exception as e:  # noqa: BLE001 - a bug in the double
            self.errors.append(e)
            code, oom = 1, False
        try:
            await self._stop_tgi(c)
        except Exception as e:  # noqa: BLE001
            self.errors.append(e)
        c.status, c.exit_code, c.oom_killed, c._connected = "exited", code, oom, False
        self._event("die", c)

    async def _stop_tgi(self, c: FakeContainer) -> None:
        if c.tgi is not None:
            if c._tgi_stopped is None:
                c._tgi_stopped = asyncio.ensure_future(asyncio.to_thread(c.tgi.stop))
            await asyncio.shield(c._tgi_stopped)

    async def _launch(self, c: FakeContainer, b: TGIBehavior) -> tuple[int, bool]:
        """Returns (exit code, OOMKilled)."""
        try:
            return await self._launcher_lines(c, b)
        except _Terminated:
            if c._connected:
                self._log(c, "Terminating webserver")
                await self._stop_tgi(c)
                self._log(c, "webserver terminated")
            self._log(c, "Shutting down shards")
            await asyncio.sleep(STOP_DURATION)
            self._log(c, "shard terminated rank=0", span=SHARD)
            return 0, False

    async def _launcher_lines(self, c: FakeContainer, b: TGIBehavior) -> tuple[int, bool]:
        args = _launcher_args(c.cmd)
        model = args.get("model_id", "")
        loop = asyncio.get_running_loop()
        end = loop.time() + (b.load_delay if b.scenario == "serve" else b.fail_after)
        limits = ", ".join(f"{k}: Some({v})" for k, v in args.items() if k != "model_id")
        self._log(c, f'Args {{ model_id: "{model}", {limits}{", " if limits else ""}port: 80, .. }}')
        self._log(c, f"Starting check and download process for {model}", span="download: ")
        if b.scenario == "gated_model":
            await self._sleep(c, b.fail_after)
            self._log(c, "Download encountered an error: ", level="ERROR", span="download: ")
            self._raw(c, _GATED.format(model=model))
            self._raw(c, "Error: DownloadError", STDERR)
            return 1, False
        await self._sleep(c, (end - loop.time()) * 0.2)
        self._log(c, f"Successfully downloaded weights for {model}", span="download: ")
        self._log(c, "Starting shard rank=0", span=SHARD)
        while (left := end - loop.time()) > 0:
            self._log(c, "Waiting for shard to be ready... rank=0", span=SHARD)
            await self._sleep(c, min(b.shard_wait_interval, left))
        if b.scenario == "oom_killed":
            return 137, True
        if b.scenario == "crash_loading":
            self._log(c, _SHARD_OOM, level="ERROR", span=SHARD)
            self._log(c, "Shard 0 failed to start", level="ERROR")
            self._log(c, "Shutting down shards")
            self._raw(c, "Error: ShardCannotStart", STDERR)
            return 1, False
        self._log(c, "Shard ready in 1.02s rank=0", span=SHARD)
        self._log(c, "Starting Webserver")
        self._log(c, "Warming up model", target="text_generation_router_v3: backends/v3/src/lib.rs:125")
        self._log(c, "Using backend V3", target="text_generation_router_v3: backends/v3/src/lib.rs:166")
        while c.tgi is not None and not c.tgi.ready:
            await self._sleep(c, 0.002)
        c._connected = True
        self._log(c, "Connected", target="text_generation_router::server: router/src/server.rs:2431")
        await self._sleep(c, _NEVER)
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _behavior(behavior: TGIBehavior | str | None, **fields: Any) -> TGIBehavior:
    if isinstance(behavior, TGIBehavior):
        return dataclasses.replace(behavior, **fields)
    return TGIBehavior(**({"scenario": behavior} if behavior else {}), **fields)


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(data, separators=(",", ":")) + "\n", status_code=status, media_type="application/json"
    )


def _true(value: str | None) -> bool:
    """A boolean query parameter as moby's ``BoolValue`` reads it."""
    return (value or "").strip().lower() not in ("", "0", "no", "false", "none")


def _reference(name: str, tag: str | None = None) -> str:
    """``repo:tag`` (``latest`` when there is none; a registry's port is not a tag)."""
    if tag:
        return f"{name}:{tag}"
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _launcher_args(cmd: list[str], env: Sequence[str] = ()) -> dict[str, Any]:
    """The FakeTGI settings text-generation-launcher would take from its arguments and environment (the
    others are ignored); like the launcher, one of the two token limits gives the other, and a flag wins
    over its variable."""
    flags = dict(itertools.pairwise(cmd))
    variables = dict(item.partition("=")[::2] for item in env)
    args: dict[str, Any] = {}
    if "--model-id" in flags:
        args["model_id"] = flags["--model-id"]
    if adapters := flags.get("--lora-adapters", variables.get("LORA_ADAPTERS")):
        args["lora_adapters"] = tuple(entry.strip() for entry in adapters.split(",") if entry.strip())
    for flag in ("--max-input-tokens", "--max-total-tokens", "--max-top-n-tokens"):
        if flag in flags:
            args[flag[2:].replace("-", "_")] = int(flags[flag])
    if "max_total_tokens" in args:
        args.setdefault("max_input_tokens", args["max_total_tokens"] - 1)
    if "max_input_tokens" in args:
        args.setdefault("max_total_tokens", args["max_input_tokens"] + 1)
    return args


def _pull_lines(ref: str) -> list[dict]:
    """A pull's progress lines (moby's JSON messages), three layers."""
    repo, tag = ref.rsplit(":", 1)
    domain, _, path = repo.partition("/")
    shown = path if path and ("." in domain or ":" in domain or domain == "localhost") else repo
    layers = [hashlib.sha256(f"{ref}#{i}".encode()).hexdigest()[:12] for i in range(3)]
    lines: list[dict] = [{"status": f"Pulling from {shown}", "id": tag}]
    lines += [{"status": "Pulling fs layer", "progressDetail": {}, "id": layer} for layer in layers]
    for i, layer in enumerate(layers):
        size = 32_000_000 * (i + 1) ** 2
        lines += [
            {
                "status": "Downloading",
                "progressDetail": {"current": size * k // 3, "total": size},
                "id": layer,
            }
            for k in (1, 2)
        ]
        lines += [
            {"status": status, "progressDetail": {}, "id": layer}
            for status in ("Download complete", "Pull complete")
        ]
    digest = "sha256:" + hashlib.sha256(f"digest:{ref}".encode()).hexdigest()
    return lines + [{"status": f"Digest: {digest}"}, {"status": f"Status: Downloaded newer image for {ref}"}]
