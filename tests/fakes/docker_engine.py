"""A test double of the Docker Engine API (as docker-py 7.x drives it), whose containers run TGI.

Theory of operation
===================

:class:`FakeDockerEngine` is a real HTTP/1.1 server (Starlette app on uvicorn's h11 protocol, chunked
streaming, any number of concurrent keep-alive connections) bound to ``127.0.0.1`` on an ephemeral port
and run on its own event loop in a daemon thread. Point the real SDK at it with
``DOCKER_HOST=tcp://127.0.0.1:PORT`` (:attr:`FakeDockerEngine.docker_host`; :meth:`apply_env` sets it
and unsets ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH`` through a pytest ``monkeypatch``), then
``docker.from_env()`` works as against a real daemon::

    with FakeDockerEngine(gpu=True) as engine:
        engine.apply_env(monkeypatch)
        client = docker.from_env()
        c = client.containers.run(TGI_IMAGE, command=["--model-id", "m"], ports={"80/tcp": 8080}, detach=True)
        fake = engine.container(c.id)                 # the engine's view: state, create body, logs
        engine.wait_until(lambda: fake.connected)     # "Connected" logged: fake.tgi (a FakeTGI) serves
        fake.tgi.script = ...                         # drive it like any FakeTGI

Every container is simulated: nothing is executed, only TGI's behaviour is played back.

What it serves (paths with any ``/v1.NN`` prefix, or none; the prefix is checked against
``min_api_version``..``api_version`` like the daemon does):

* ``GET /version`` (``ApiVersion`` = ``api_version``, "1.45"), ``GET|HEAD /_ping`` (``OK``), ``GET /info``
  (``Runtimes`` has ``nvidia`` iff ``gpu``);
* images: ``GET /images/json``, ``GET /images/<name>/json`` (names with slashes/colons, ``sha256:``
  ids and id prefixes; 404 ``No such image: <familiar name>``), ``DELETE /images/<name>``,
  ``POST /images/create`` (pull: chunked ``application/json``, one compact JSON object + ``\\r\\n`` per
  chunk: ``Pulling from``, per layer ``Pulling fs layer``/``Waiting``/``Downloading``/``Verifying
  Checksum``/``Download complete``/``Extracting``/``Pull complete`` with ``progressDetail``
  ``{current,total}``, ``Digest:``, ``Status: Downloaded newer image for …`` or ``Status: Image is up
  to date for …``). Failures from :meth:`fail_pull`: before any output an HTTP error ``{"message"}``;
  mid-stream one ``{"errorDetail":{"message"},"error"}`` line, status 200;
* containers: ``POST /containers/create`` (201 ``{Id, Warnings}``; 404 ``No such image: …`` so that
  ``containers.run`` pulls; 409 name conflict; 400 bad name / bad JSON / unknown runtime), ``GET
  /containers/json`` (``all``, ``limit``, ``filters``: ``label`` AND-ed ``key``/``key=value``, ``name``
  unanchored regex, ``status``, ``id`` prefix, ``ancestor``, ``exited``), ``GET /containers/<id>/json``
  (by id, id prefix or name), ``start`` (204, 304 when running; 400 ``could not select device driver
  "" with capabilities: [[gpu]]`` when ``gpu`` is false and a device request asks for a GPU; 500
  ``driver failed programming external connectivity on endpoint <name> (<endpoint id>): Bind for
  <ip>:<port> failed: port is already allocated`` when the host port is taken: the container stays as
  it was, with ``State.Error`` set and ``ExitCode`` 128 like moby), ``stop`` (``t``; SIGTERM, then
  SIGKILL after the grace period: ExitCode 137), ``kill`` (``signal``), ``restart``, ``wait``
  (``condition``: ``not-running``, ``next-exit``, ``removed``; headers first, ``{"StatusCode","Error":
  null}`` at exit), ``logs`` (``stdout``/``stderr``/``follow``/``tail``/``since``/``until``/
  ``timestamps``; headers at once, then 8-byte-header multiplexed frames, one per log line;
  ``follow`` ends when the container exits or is removed), ``DELETE /containers/<id>`` (``force``; 409
  when running without it);
* anything else: 404 ``{"message":"page not found"}``.

Containers
----------

Every container is a simulated TGI launcher (``text-generation-launcher`` behind the image's
``/tgi-entrypoint.sh``). Starting one whose TGI port (``--port``, else ``PORT`` from the env, else 80)
is published on host port P binds a :class:`tests.fakes.tgi.FakeTGI` (thread mode) to
``127.0.0.1:P``: the port refuses connections while the "model loads" (``load_delay``) and serves
the FakeTGI API after ``Connected``. ``--model-id``, ``--max-input-tokens`` (``--max-input-length``),
``--max-total-tokens``, ``--max-concurrent-requests``, ``--max-best-of``, ``--max-stop-sequences``,
``--max-top-n-tokens``, ``--max-client-batch-size``, ``--payload-limit``, ``--api-key``,
``--disable-grammar-support``, ``--enable-prefill-logprobs`` (and their env forms, ``MODEL_ID`` …)
configure the FakeTGI; :attr:`TGIBehavior.tgi` overrides any :class:`~tests.fakes.tgi.TGIConfig` field.

The launcher writes TGI-like tracing lines on stdout (``Args {`` … ``}`` as a multi-line Debug dump,
``Starting check and download process for <model>``, ``Successfully downloaded weights``, ``Starting
shard rank=0``, ``Waiting for shard to be ready... rank=0`` every ``shard_wait_interval``, ``Shard
ready in …s rank=0``, ``Starting Webserver``, ``Warming up model``, ``Setting max batch total tokens
to N``, ``Using backend V3``, ``Connected`` (logged once the FakeTGI listens)), and the final
``Error: <Variant>`` on stderr. What happens is a *scenario* (:class:`TGIBehavior`), chosen when the
container starts: :meth:`FakeDockerEngine.set_behavior` keyed by model id (``--model-id``), by image
reference, or the engine default:

``serve`` (default)
    loads for ``load_delay`` s, serves until stopped. SIGTERM: graceful shutdown logs, exit 0.
``crash_loading``
    after ``fail_after`` s: ``Shard complete standard error output:``, a CUDA OOM traceback excerpt,
    `` rank=0``, ``Shard 0 failed to start``, ``Shutting down shards``; stderr ``Error:
    ShardCannotStart``; exit 1, ``OOMKilled`` false.
``webserver_failed``
    loads, then the router's warm-up fails (CUDA OOM): ``Webserver Crashed``, ``Shutting down
    shards``; stderr ``Error: WebserverFailed``; exit 1.
``oom_killed``
    after ``fail_after`` s the cgroup OOM killer: exit 137, ``OOMKilled`` true, no last words.
``gated_model``
    the weight download fails with ``GatedRepoError: 401 Client Error`` / ``Cannot access gated repo
    for url https://huggingface.co/<model>…`` / ``Access to model <model> is restricted…``; stderr
    ``Error: DownloadError``; exit 1.
``exit_on_stop_137``
    ``serve``, but SIGTERM is ignored: ``stop`` SIGKILLs after the grace period, exit 137,
    ``OOMKilled`` false (also ``TGIBehavior(ignore_sigterm=True)`` with any scenario).

The ``stop`` grace period is ``t`` seconds (``StopTimeout`` of the container, else 10) times
``stop_grace_scale`` (1.0: real seconds; tests of ``exit_on_stop_137`` set e.g. 0.01).
:meth:`crash` kills a running container from the test (``Shard 0 crashed`` … ``Error: ShardFailed``
exit 1, or ``oom_killed=True``). A configured ``Healthcheck`` gives ``State.Health``: ``starting``
until the FakeTGI listens, then ``healthy`` (``unhealthy`` when ``tgi.config.healthy`` is false).

Test controls and observations
------------------------------

* :meth:`add_image` (seed an image), :meth:`add_container` (seed a container: ``state="running"``
  starts it already serving, ``"exited"``, ``"created"``), :meth:`set_behavior`, :meth:`fail_pull`,
  :meth:`inject_error` (next matching request answered with an error), :meth:`crash`; the
  :attr:`config` fields (``gpu``, ``stop_grace_scale``, ``pull_step_delay``, …) can change at any time.
* :attr:`requests` (:class:`DockerRequest`: method, path, route without version prefix, query
  string, params, headers, raw body, parsed JSON), :attr:`events` (``create``/``start``/``kill``/
  ``oom``/``die``/``stop``/``destroy``/``pull``…), :attr:`created`, :meth:`history` (container names
  per action), :attr:`create_bodies`, :attr:`pulls` (:class:`PullRecord`), :attr:`containers`,
  :meth:`container` (a :class:`FakeContainer`: state, ``body`` as sent, ``tgi``, ``host_port``,
  ``connected``, ``endpoint_id``, ``logs``/``log_text()``), :attr:`images`, :attr:`log_streams_open`,
  :meth:`wait_until`.
  Exceptions raised by the double itself collect in :attr:`errors`.

Simplified / not modelled
-------------------------

No real processes (any image runs the simulated TGI launcher, whatever its command), filesystems,
networks (``IPAddress`` is invented), volumes (``Binds``/``Mounts`` are only reported), restart
policies, pause, exec, attach, events endpoint, build, registries (any reference pulls unless
:meth:`fail_pull` says otherwise) or authentication (``X-Registry-Auth`` is only recorded). TGI's log
texts follow TGI 3.3 but source line numbers, timings and sizes are invented; the launcher exits 0 on
SIGTERM in every phase. TGI logs ``Connected`` just before it binds; the double logs it just *after* its
FakeTGI listens, so a test that saw ``Connected`` can call ``/health`` at once. A port held by a process
outside the engine gives the same "port is already allocated" text as a port held by another container
unless ``port_in_use_error="userland_proxy"`` (the text real Docker gives then). Only the TGI port runs
a server; other published ports are just checked and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import random
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.serve import QuickServer
from tests.fakes.tgi import FakeTGI, Script

__all__ = [
    "SCENARIOS",
    "TGI_IMAGE",
    "DockerRequest",
    "EngineConfig",
    "EngineEvent",
    "FakeContainer",
    "FakeDockerEngine",
    "FakeImage",
    "LogLine",
    "PullFailure",
    "PullRecord",
    "TGIBehavior",
    "familiar_name",
    "normalize_reference",
]

TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.5"
SCENARIOS = ("serve", "crash_loading", "webserver_failed", "oom_killed", "gated_model", "exit_on_stop_137")
ZERO_TIME = "0001-01-01T00:00:00Z"
STDOUT, STDERR = 1, 2
EXIT_UNKNOWN = 128  # moby daemon/start.go: the exit code a failed start leaves when none was set
_NEVER = 24 * 3600.0

# --------------------------------------------------------------------------------------------
# Configuration and records
# --------------------------------------------------------------------------------------------


@dataclass
class TGIBehavior:
    """What the TGI launcher in a container does once started (see the module docstring)."""

    scenario: str = "serve"
    load_delay: float = 0.3  # start -> "Connected" (the FakeTGI listens)
    fail_after: float = 0.2  # start -> exit, for crash_loading / oom_killed / gated_model / webserver_failed
    shard_wait_interval: float = 0.1  # "Waiting for shard to be ready... rank=0" (TGI: every 10 s)
    stop_duration: float = 0.02  # a graceful shutdown takes this long (a stop grace shorter than it: 137)
    ignore_sigterm: bool = False  # exit_on_stop_137 sets it
    script: Script | None = None  # FakeTGI script (None: its echo script)
    tgi: dict[str, Any] = field(default_factory=dict)  # TGIConfig overrides for the FakeTGI
    oom_message: str = (
        "CUDA out of memory. Tried to allocate 1002.00 MiB. GPU 0 has a total capacity of 23.68 GiB of "
        "which 512.44 MiB is free. Process 41 has 23.17 GiB memory in use. Of the allocated memory 22.71 "
        "GiB is allocated by PyTorch, and 14.35 MiB is reserved by PyTorch but unallocated. If reserved "
        "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to "
        "avoid fragmentation.  See documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    )

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; one of {SCENARIOS}")
        if self.scenario == "exit_on_stop_137":
            self.ignore_sigterm = True


@dataclass
class EngineConfig:
    """Daemon-wide knobs; mutable at run time."""

    gpu: bool = True  # nvidia runtime registered: GPU device requests can be satisfied
    api_version: str = "1.45"
    min_api_version: str = "1.24"
    server_version: str = "26.1.0"
    stop_grace_scale: float = 1.0  # stop's grace period is t * this many seconds
    pull_step_delay: float = 0.0  # pause between pull progress lines
    port_in_use_error: str = "allocated"  # or "userland_proxy" for ports held outside the engine
    ncpu: int = 16
    mem_total: int = 67_324_411_904


@dataclass
class PullFailure:
    status: int = 404  # HTTP status when not mid_stream
    message: str | None = None  # None: a realistic default for the status
    mid_stream: bool = False  # True: status 200, progress lines, then an errorDetail line
    after_lines: int = 4  # mid-stream: progress lines before the error
    times: int | None = None  # None: every pull; else that many pulls


@dataclass
class PullRecord:
    reference: str  # canonical "domain/path:tag"
    from_image: str
    tag: str
    outcome: str = "running"  # running | ok | up_to_date | http_error | stream_error | disconnected
    status: int = 200
    message: str | None = None
    lines: list[dict] = field(default_factory=list)
    at: float = 0.0


@dataclass
class DockerRequest:
    method: str
    path: str  # as sent, with the version prefix
    route: str  # without the version prefix
    version: str | None  # "1.45", or None for an unversioned path
    query: str  # raw query string
    params: dict[str, str]  # last value per key
    headers: dict[str, str]  # lower-case names
    body: bytes
    json: Any
    at: float  # time.monotonic()


@dataclass
class EngineEvent:
    action: str
    type: str  # "container" | "image"
    id: str
    name: str
    attributes: dict[str, Any]
    at: float


@dataclass
class LogLine:
    at_ns: int  # wall clock, time.time_ns()
    stream: int  # 1 stdout, 2 stderr
    text: str  # without the trailing newline


@dataclass
class FakeImage:
    id: str  # "sha256:<64 hex>"
    tags: list[str]  # canonical references
    env: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    size: int = 12_345_678_901
    created_ns: int = 0
    digest: str = ""

    @property
    def repo_tags(self) -> list[str]:
        return [familiar_name(t) for t in self.tags]


@dataclass
class FakeContainer:
    """A container as the engine keeps it. Read it from tests freely (fields change under the
    engine's lock; take :meth:`FakeDockerEngine.wait_until` to wait for a state)."""

    id: str
    name: str
    image: str  # as given in the create body
    image_id: str
    body: dict  # the create body as parsed
    raw_body: bytes
    created_ns: int
    endpoint_id: str = field(default_factory=lambda: secrets.token_hex(32))
    status: str = "created"  # created | running | exited | removing
    exit_code: int = 0
    oom_killed: bool = False
    error: str = ""
    pid: int = 0
    started_ns: int = 0
    finished_ns: int = 0
    removed: bool = False
    start_count: int = 0
    exit_count: int = 0
    behavior: TGIBehavior | None = None  # chosen at the last start
    tgi: FakeTGI | None = None  # the server of the last start
    host_ports: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # while running
    logs: list[LogLine] = field(default_factory=list)
    env: list[str] = field(default_factory=list)  # image env + create env
    cmd: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None
    ever_healthy: bool = False
    # runtime plumbing (engine loop only)
    _task: asyncio.Task | None = field(default=None, repr=False)
    _sigterm: asyncio.Event | None = field(default=None, repr=False)
    _kill: tuple[int, bool] = (137, False)
    _tgi_stop: asyncio.Future | None = field(default=None, repr=False)
    _connected: bool = False

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def connected(self) -> bool:
        """True while running after ``Connected`` was logged (the FakeTGI listens, /health answers)."""
        return self._connected and self.running

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.body.get("Labels") or {})

    @property
    def host_config(self) -> dict:
        return self.body.get("HostConfig") or {}

    @property
    def model_id(self) -> str:
        return tgi_args(self.cmd, self.env)["model_id"]

    @property
    def host_port(self) -> int | None:
        """The host port of TGI's port while running (the FakeTGI's port), else None."""
        return self.tgi.port if self.tgi is not None and self.running else None

    @property
    def url(self) -> str | None:
        port = self.host_port
        return None if port is None else f"http://127.0.0.1:{port}"

    def log_text(self, stream: int | None = None) -> str:
        return "".join(
            line.text + "\n" for line in list(self.logs) if stream is None or line.stream == stream
        )


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _bool(value: str | None, default: bool = False) -> bool:
    """moby httputils.BoolValue: "", 0, no, false, none are false (case-insensitive)."""
    if value is None:
        return default
    return value.strip().lower() not in ("", "0", "no", "false", "none")


def _rfc3339_nano(ns: int) -> str:
    if ns <= 0:
        return ZERO_TIME
    secs, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    digits = f"{frac:09d}".rstrip("0")
    return f"{base}.{digits}Z" if digits else f"{base}Z"


def _trace_ts(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac // 1000:06d}Z"


def _human_duration(seconds: float) -> str:
    """docker/go-units HumanDuration."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def _go_caps(caps: list[list[str]]) -> str:
    """Go's %v of a [][]string: [[gpu]], [[gpu utility] [compute]]."""
    return "[" + " ".join("[" + " ".join(group or []) + "]" for group in caps or []) + "]"


def _hex_id(seed: str | None = None) -> str:
    if seed is None:
        return secrets.token_hex(32)
    return hashlib.sha256(seed.encode()).hexdigest()


def _layer_ids(ref: str, n: int = 4) -> list[str]:
    return [hashlib.sha256(f"{ref}#{i}".encode()).hexdigest()[:12] for i in range(n)]


_NAME_RE = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
_ADJECTIVES = (
    "admiring",
    "brave",
    "clever",
    "eager",
    "focused",
    "happy",
    "keen",
    "quirky",
    "sharp",
    "vibrant",
)
_NOUNS = ("turing", "hopper", "lovelace", "curie", "noether", "shannon", "babbage", "knuth", "ritchie")


def normalize_reference(ref: str, tag: str | None = None) -> str:
    """Canonical ``domain/path:tag`` (or ``domain/path@sha256:…``), as the distribution reference
    library resolves it: no domain means docker.io, a single path component ``library/``."""
    ref = ref.strip()
    digest = ""
    if "@" in ref:
        ref, digest = ref.split("@", 1)
    name, own_tag = ref, ""
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        name, own_tag = ref.rsplit(":", 1)
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = "docker.io", name
    if domain == "docker.io" and "/" not in path:
        path = "library/" + path
    if tag and tag.startswith("sha256:"):
        digest = tag
    elif tag:
        own_tag = tag
    if digest:
        return f"{domain}/{path}@{digest}"
    return f"{domain}/{path}:{own_tag or 'latest'}"


def familiar_name(ref: str) -> str:
    """``docker.io/library/ubuntu:latest`` -> ``ubuntu:latest`` (reference.FamiliarString)."""
    canonical = normalize_reference(ref)
    if canonical.startswith("docker.io/"):
        canonical = canonical[len("docker.io/") :]
        if canonical.startswith("library/") and "/" not in canonical[len("library/") :].split(":")[0]:
            canonical = canonical[len("library/") :]
    return canonical


def _repo_of(canonical: str) -> str:
    return canonical.split("@", 1)[0].rsplit(":", 1)[0] if "@" in canonical else canonical.rsplit(":", 1)[0]


# ------------------------------------------------------------------ TGI launcher arguments

_TGI_VALUE_FLAGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "--max-input-tokens": ("max_input_tokens", int),
    "--max-input-length": ("max_input_tokens", int),
    "--max-total-tokens": ("max_total_tokens", int),
    "--max-concurrent-requests": ("max_concurrent_requests", int),
    "--max-best-of": ("max_best_of", int),
    "--max-stop-sequences": ("max_stop_sequences", int),
    "--max-top-n-tokens": ("max_top_n_tokens", int),
    "--max-client-batch-size": ("max_client_batch_size", int),
    "--payload-limit": ("payload_limit", int),
    "--api-key": ("api_key", str),
}
_TGI_BOOL_FLAGS = {
    "--disable-grammar-support": "disable_grammar_support",
    "--enable-prefill-logprobs": "enable_prefill_logprobs",
    "--trust-remote-code": None,
    "--json-output": None,
    "--disable-custom-kernels": None,
    "--env": None,
    "--ngrok": None,
}


def tgi_args(cmd: list[str], env: list[str]) -> dict[str, Any]:
    """What text-generation-launcher would make of its arguments and environment (the subset the
    double uses): ``model_id``, ``port``, ``flags`` (every ``--flag`` seen, value or True) and
    ``config`` (TGIConfig fields)."""
    env_map = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    flags: dict[str, Any] = {}
    for name in list(_TGI_VALUE_FLAGS) + list(_TGI_BOOL_FLAGS) + ["--model-id", "--port", "--revision"]:
        key = name[2:].upper().replace("-", "_")
        if key in env_map and env_map[key] != "":
            flags[name] = env_map[key] if name not in _TGI_BOOL_FLAGS else _bool(env_map[key])
    i = 0
    while i < len(cmd):
        arg = cmd[i]
        if arg.startswith("--"):
            if "=" in arg:
                name, value = arg.split("=", 1)
                flags[name] = value
            elif arg in _TGI_BOOL_FLAGS:
                flags[arg] = True
            elif i + 1 < len(cmd) and not cmd[i + 1].startswith("--"):
                flags[arg] = cmd[i + 1]
                i += 1
            else:
                flags[arg] = True
        i += 1
    config: dict[str, Any] = {}
    for name, (key, conv) in _TGI_VALUE_FLAGS.items():
        if name in flags and flags[name] is not True:
            with contextlib.suppress(ValueError):
                config[key] = conv(flags[name])
    for name, key in _TGI_BOOL_FLAGS.items():
        if key and name in flags:
            config[key] = flags[name] is True or _bool(str(flags[name]))
    if "max_total_tokens" in config and "max_input_tokens" not in config:
        config["max_input_tokens"] = config["max_total_tokens"] - 1
    if "max_input_tokens" in config and "max_total_tokens" not in config:
        config["max_total_tokens"] = config["max_input_tokens"] + 1
    model_id = flags.get("--model-id")
    model_id = model_id if isinstance(model_id, str) else "bigscience/bloom-560m"
    config["model_id"] = model_id
    try:
        port = int(flags.get("--port") or 3000)
    except ValueError:
        port = 3000
    return {"model_id": model_id, "port": port, "flags": flags, "config": config}


# --------------------------------------------------------------------------------------------
# uvicorn plumbing
# --------------------------------------------------------------------------------------------


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Terminated(Exception):
    """SIGTERM reached the simulated launcher."""


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


class FakeDockerEngine:
    """The Docker Engine double. See the module docstring.

    ``FakeDockerEngine(*, gpu=True, behavior=None, images=(), host="127.0.0.1", port=0,
    start_timeout=5, stop_timeout=5, **config)`` -- ``config`` keywords are :class:`EngineConfig`
    fields; ``behavior`` is the default :class:`TGIBehavior` (or a scenario name); ``images`` are
    references to seed.
    """

    def __init__(
        self,
        *,
        gpu: bool = True,
        behavior: TGIBehavior | str | None = None,
        images: tuple[str, ...] | list[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout: float = 5.0,
        stop_timeout: float = 5.0,
        **config: Any,
    ) -> None:
        self.config = EngineConfig(gpu=gpu, **config)
        self.behavior = self._as_behavior(behavior)
        self.behaviors: dict[str, TGIBehavior] = {}  # by model id or canonical image reference
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.errors: list[BaseException] = []
        self._lock = threading.RLock()
        self._images: dict[str, FakeImage] = {}  # by id
        self._containers: dict[str, FakeContainer] = {}  # by id, not removed
        self._created: list[FakeContainer] = []
        self._requests: list[DockerRequest] = []
        self._events: list[EngineEvent] = []
        self._pulls: list[PullRecord] = []
        self._pull_failures: dict[str, PullFailure] = {}
        self._injected: list[tuple[str | None, re.Pattern, int, str, list[int]]] = []
        self._log_streams_open = 0
        self._gen = 0
        self._waiters: set[asyncio.Event] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._server: QuickServer | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._app = Starlette(
            routes=[Route("/{rest:path}", self._dispatch, methods=["GET", "HEAD", "POST", "PUT", "DELETE"])]
        )
        for ref in images:
            self.add_image(ref)

    @staticmethod
    def _as_behavior(behavior: TGIBehavior | str | None, **fields: Any) -> TGIBehavior:
        if behavior is None:
            return TGIBehavior(**fields)
        if isinstance(behavior, str):
            return TGIBehavior(scenario=behavior, **fields)
        return dataclasses.replace(behavior, **fields) if fields else behavior

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def docker_host(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def apply_env(self, monkeypatch: Any) -> None:
        """Point ``docker.from_env()`` here (plain HTTP, no proxy for loopback)."""
        monkeypatch.setenv("DOCKER_HOST", self.docker_host)
        monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
        monkeypatch.delenv("DOCKER_CERT_PATH", raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    def start(self) -> FakeDockerEngine:
        if self._thread is not None:
            raise RuntimeError("already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(
            target=self._thread_main, name=f"fake-docker-{self.port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            self.stop()
            raise TimeoutError(f"fake Docker engine did not start within {self.start_timeout} s")
        if self._startup_error is not None:
            raise RuntimeError("fake Docker engine failed to start") from self._startup_error
        return self

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported through start()
            if not self._ready.is_set():
                self._startup_error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            http="h11",
            ws="none",
            log_config=None,
            log_level=None,
            access_log=False,
            server_header=False,
            date_header=True,
            timeout_keep_alive=3600,
            backlog=4096,
        )
        self._server = QuickServer(config, on_started=self._ready.set, drain_timeout=0.5)
        assert self._sock is not None
        try:
            await self._server.serve(sockets=[self._sock])
        finally:
            await self._shutdown_containers()
            self._ready.set()
            self._sock.close()

    async def _shutdown_containers(self) -> None:
        with self._lock:
            containers = [c for c in self._created if c._task is not None and not c._task.done()]
        for c in containers:
            c._kill = (137, False)
            assert c._task is not None
            c._task.cancel()
        for c in containers:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(c._task), self.stop_timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Stop every container (their FakeTGIs), then the server. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        loop, server = self._loop, self._server
        if loop is not None and server is not None:
            with contextlib.suppress(RuntimeError):
                fut = asyncio.run_coroutine_threadsafe(self._shutdown_containers(), loop)
                with contextlib.suppress(Exception):
                    fut.result(self.stop_timeout)
                loop.call_soon_threadsafe(server.request_exit)
        thread.join(self.stop_timeout)
        if thread.is_alive() and server is not None:
            server.force_exit = True
            thread.join(1.0)
        self._thread = None
        # FakeTGIs of containers whose task never ran (or a stuck loop): stop them directly.
        for c in self.created:
            if c.tgi is not None:
                with contextlib.suppress(Exception):
                    c.tgi.stop()

    def __enter__(self) -> FakeDockerEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the engine loop from the test thread."""
        if self._loop is None:
            raise RuntimeError("the engine is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ---------------------------------------------------------------- change notification

    def _notify(self) -> None:
        with self._lock:
            self._gen += 1
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._fire()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        for ev in list(self._waiters):
            ev.set()

    async def _until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """On the loop: wait until predicate() (re-checked at every state change)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            gen = self._gen
            if predicate():
                return True
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            ev = asyncio.Event()
            self._waiters.add(ev)
            try:
                if self._gen == gen:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(ev.wait(), remaining)
            finally:
                self._waiters.discard(ev)

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005
    ) -> None:
        """From the test: poll ``predicate`` until true, else AssertionError."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            time.sleep(interval)

    # ---------------------------------------------------------------- test controls

    def add_image(
        self,
        reference: str,
        *,
        env: list[str] | None = None,
        entrypoint: list[str] | None = None,
        cmd: list[str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> FakeImage:
        """Seed an image (an existing one gets the extra tag). TGI-like defaults: ``ENTRYPOINT
        ["/tgi-entrypoint.sh"]``, env ``HF_HOME=/data HF_HUB_ENABLE_HF_TRANSFER=1 PORT=80``."""
        canonical = normalize_reference(reference)
        with self._lock:
            existing = self._find_image(reference)
            if existing is not None:
                return existing
            image = FakeImage(
                id="sha256:" + _hex_id("image:" + canonical),
                tags=[canonical],
                env=list(env)
                if env is not None
                else [
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HF_HOME=/data",
                    "HF_HUB_ENABLE_HF_TRANSFER=1",
                    "PORT=80",
                ],
                entrypoint=list(entrypoint) if entrypoint is not None else ["/tgi-entrypoint.sh"],
                cmd=list(cmd) if cmd is not None else None,
                labels=dict(labels or {}),
                working_dir="/usr/src",
                created_ns=time.time_ns() - 86400 * 10**9 * 7,
                digest="sha256:" + _hex_id("digest:" + canonical),
            )
            self._images[image.id] = image
        return image

    def remove_image(self, reference: str) -> None:
        with self._lock:
            image = self._find_image(reference)
            if image is not None:
                del self._images[image.id]

    def set_behavior(
        self,
        behavior: TGIBehavior | str | None = None,
        *,
        model: str | None = None,
        image: str | None = None,
        **fields: Any,
    ) -> TGIBehavior:
        """Choose what containers do when started: for a model id (``--model-id``), an image
        reference, or (neither given) every container. ``behavior`` is a :class:`TGIBehavior` or a
        scenario name; ``fields`` are TGIBehavior fields."""
        b = self._as_behavior(behavior, **fields)
        with self._lock:
            if model is not None:
                self.behaviors[model] = b
            if image is not None:
                self.behaviors[normalize_reference(image)] = b
            if model is None and image is None:
                self.behavior = b
        return b

    def behavior_for(self, c: FakeContainer) -> TGIBehavior:
        with self._lock:
            b = self.behaviors.get(c.model_id)
            if b is None:
                with contextlib.suppress(Exception):
                    canonical = normalize_reference(c.image)
                    b = self.behaviors.get(canonical) or self.behaviors.get(_repo_of(canonical))
            return b or self.behavior

    def fail_pull(
        self,
        image: str,
        status: int = 404,
        message: str | None = None,
        *,
        mid_stream: bool = False,
        after_lines: int = 4,
        times: int | None = None,
    ) -> PullFailure:
        """Make pulls of ``image`` fail (a full reference, or a repository without tag: every tag)."""
        failure = PullFailure(status, message, mid_stream, after_lines, times)
        key = (
            normalize_reference(image)
            if (":" in image.rsplit("/", 1)[-1] or "@" in image)
            else _repo_of(normalize_reference(image))
        )
        with self._lock:
            self._pull_failures[key] = failure
        return failure

    def inject_error(
        self,
        route: str,
        status: int = 500,
        message: str = "injected failure",
        *,
        method: str | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` requests whose route (no version prefix) matches the regex
        ``route`` (``re.search``) with ``status`` ``{"message": message}``."""
        with self._lock:
            self._injected.append(
                (method.upper() if method else None, re.compile(route), status, message, [times])
            )

    def add_container(
        self,
        image: str = TGI_IMAGE,
        command: list[str] | None = None,
        *,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        environment: dict[str, str] | list[str] | None = None,
        ports: dict[Any, Any] | None = None,
        volumes: dict[str, dict[str, str]] | list[str] | None = None,
        device_requests: list[dict] | None = None,
        shm_size: int | None = None,
        state: str = "running",
        exit_code: int = 0,
        oom_killed: bool = False,
        behavior: TGIBehavior | str | None = None,
        uptime: float = 300.0,
        logs: list[tuple[int, str]] | None = None,
        body: dict | None = None,
        wait_ready: bool = True,
    ) -> FakeContainer:
        """Seed a container as if an earlier process had made it (``create`` body built like
        docker-py's; or give ``body``). ``state``: ``created``, ``running`` (the launcher starts at
        once and, with ``wait_ready``, this returns once its FakeTGI serves; ``behavior`` default: the
        engine's for it, loaded instantly), ``exited`` (``exit_code``/``oom_killed``; ``logs`` as
        ``(stream, text)`` lines). ``StartedAt`` is ``uptime`` s ago. The image is seeded too."""
        if self._loop is None:
            raise RuntimeError("start the engine first")
        self.add_image(image)
        if body is None:
            body = _container_body(
                image, command, labels, environment, ports, volumes, device_requests, shm_size
            )
        raw = json.dumps(body).encode()
        c = self._create(body, raw, name)
        now = time.time_ns()
        if state == "running":
            b = (
                self._as_behavior(behavior)
                if behavior is not None
                else dataclasses.replace(self.behavior_for(c), load_delay=0.0, shard_wait_interval=_NEVER)
            )
            status, message = self._run(self._start(c, b), self.start_timeout)
            if status >= 400:
                raise RuntimeError(f"could not start the seeded container: {message}")
            with self._lock:
                c.started_ns = now - int(uptime * 1e9)
            if wait_ready and c.tgi is not None and b.scenario in ("serve", "exit_on_stop_137"):
                self.wait_until(lambda: c._connected, timeout=self.start_timeout + b.load_delay)
        elif state == "exited":
            with self._lock:
                c.status = "exited"
                c.exit_code = exit_code
                c.oom_killed = oom_killed
                c.started_ns = now - int(uptime * 1e9)
                c.finished_ns = now - int(uptime * 1e9 / 2)
                c.start_count = c.exit_count = 1
                for stream, text in logs or []:
                    c.logs.append(LogLine(c.started_ns, stream, text))
            self._notify()
        elif state != "created":
            raise ValueError(f"state must be created, running or exited, not {state!r}")
        return c

    def crash(
        self, container: str | FakeContainer, *, oom_killed: bool = False, exit_code: int | None = None
    ) -> None:
        """Kill a running container's launcher from the outside: by default TGI's post-start shard
        crash (``Shard 0 crashed`` ... stderr ``Error: ShardFailed``, exit 1); ``oom_killed``: the
        cgroup OOM killer (137, ``OOMKilled``)."""
        c = container if isinstance(container, FakeContainer) else self.container(container)

        async def go() -> None:
            if not c.running:
                return
            if not oom_killed:
                self._log(c, "Shard 0 crashed", level="ERROR")
                self._log(c, "Terminating webserver")
                self._log(c, "Waiting for webserver to gracefully shutdown")
                self._log(c, "webserver terminated")
                self._log(c, "Shutting down shards")
                self._stderr(c, "Error: ShardFailed")
            code = exit_code if exit_code is not None else (137 if oom_killed else 1)
            await self._kill(c, code, oom_killed)

        self._run(go(), self.stop_timeout)

    # ---------------------------------------------------------------- observations

    @property
    def requests(self) -> list[DockerRequest]:
        with self._lock:
            return list(self._requests)

    def routes(self) -> list[tuple[str, str]]:
        """``(method, route)`` of every request, in order (route: path without version prefix)."""
        return [(r.method, r.route) for r in self.requests]

    @property
    def events(self) -> list[EngineEvent]:
        with self._lock:
            return list(self._events)

    def history(self, action: str) -> list[str]:
        """Names of the containers that saw ``action`` (create, start, kill, oom, die, stop, destroy)."""
        return [e.name for e in self.events if e.type == "container" and e.action == action]

    @property
    def created(self) -> list[FakeContainer]:
        """Every container ever created (removed ones too), in order."""
        with self._lock:
            return list(self._created)

    @property
    def create_bodies(self) -> list[dict]:
        """The parsed bodies of successful ``POST /containers/create`` (seeded containers too)."""
        return [c.body for c in self.created]

    @property
    def containers(self) -> list[FakeContainer]:
        """Containers that exist now (not removed)."""
        with self._lock:
            return list(self._containers.values())

    def container(self, ident: str) -> FakeContainer:
        """By id, id prefix or name (also removed ones, by exact id or name); KeyError if unknown."""
        with self._lock:
            c = self._resolve(ident)
            if c is None:
                for c2 in reversed(self._created):
                    if ident in (c2.id, c2.name, "/" + c2.name):
                        return c2
                raise KeyError(ident)
            return c

    @property
    def images(self) -> dict[str, FakeImage]:
        """By familiar reference."""
        with self._lock:
            return {familiar_name(t): img for img in self._images.values() for t in img.tags}

    @property
    def pulls(self) -> list[PullRecord]:
        with self._lock:
            return list(self._pulls)

    @property
    def log_streams_open(self) -> int:
        with self._lock:
            return self._log_streams_open

    # ---------------------------------------------------------------- lookups (under the lock)

    def _find_image(self, ref: str) -> FakeImage | None:
        with self._lock:
            ref = ref.strip()
            bare = ref.removeprefix("sha256:")
            if ref.startswith("sha256:") and re.fullmatch(r"[0-9a-f]{1,64}", bare):
                hits = [i for i in self._images.values() if i.id[7:].startswith(bare)]
                return hits[0] if len(hits) == 1 else None
            try:
                canonical = normalize_reference(ref)
            except Exception:  # noqa: BLE001
                canonical = None
            for img in self._images.values():
                if canonical in img.tags:
                    return img
                if (
                    canonical
                    and "@" in canonical
                    and canonical.split("@", 1)[1] == img.digest
                    and _repo_of(canonical) in {_repo_of(t) for t in img.tags}
                ):
                    return img
            if re.fullmatch(r"[0-9a-f]{4,64}", bare):
                hits = [i for i in self._images.values() if i.id[7:].startswith(bare)]
                if len(hits) == 1:
                    return hits[0]
            return None

    def _resolve(self, ident: str) -> FakeContainer | None:
        """moby GetContainer: full id, then name, then unique id prefix."""
        with self._lock:
            if ident in self._containers:
                return self._containers[ident]
            name = ident.lstrip("/")
            for c in self._containers.values():
                if c.name == name:
                    return c
            if re.fullmatch(r"[0-9a-f]+", ident):
                hits = [c for c in self._containers.values() if c.id.startswith(ident)]
                if len(hits) > 1:
                    raise _ApiError(400, f"multiple IDs found with provided prefix: {ident}")
                if hits:
                    return hits[0]
            return None

    def _get(self, ident: str) -> FakeContainer:
        c = self._resolve(ident)
        if c is None:
            raise _ApiError(404, f"No such container: {ident}")
        return c

    # ---------------------------------------------------------------- HTTP plumbing

    def _headers(self) -> dict[str, str]:
        return {
            "Api-Version": self.config.api_version,
            "Docker-Experimental": "false",
            "Ostype": "linux",
            "Server": f"Docker/{self.config.server_version} (linux)",
        }

    def _json(self, data: Any, status: int = 200) -> Response:
        return Response(
            json.dumps(data, separators=(",", ":")) + "\n",
            status_code=status,
            media_type="application/json",
            headers=self._headers(),
        )

    def _error(self, status: int, message: str) -> Response:
        return self._json({"message": message}, status)

    def _empty(self, status: int) -> Response:
        return Response(status_code=status, headers=self._headers())

    async def _dispatch(self, request: Request) -> Response:
        path = request.url.path
        version = None
        m = re.match(r"^/v(\d+\.\d+)(/.*)$", path)
        route = path
        if m:
            version, route = m.group(1), m.group(2)
        body = await request.body()
        parsed = None
        if body:
            with contextlib.suppress(ValueError):
                parsed = json.loads(body)
        params = {k: v for k, v in request.query_params.multi_items()}
        record = DockerRequest(
            method=request.method,
            path=path,
            route=route,
            version=version,
            query=request.url.query,
            params=params,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            json=parsed,
            at=time.monotonic(),
        )
        with self._lock:
            self._requests.append(record)
        try:
            if version is not None:
                self._check_version(version)
            injected = self._take_injected(request.method, route)
            if injected is not None:
                return self._error(*injected)
            return await self._route(request, route, params, body)
        except _ApiError as e:
            return self._error(e.status, e.message)
        except Exception as e:  # noqa: BLE001 - a bug in the double: answer like the daemon, keep it
            self.errors.append(e)
            return self._error(500, f"fake docker engine error: {e!r}")

    def _check_version(self, version: str) -> None:
        def key(v: str) -> tuple[int, ...]:
            return tuple(int(x) for x in v.split("."))

        if key(version) > key(self.config.api_version):
            raise _ApiError(
                400,
                f"client version {version} is too new. Maximum supported API version is {self.config.api_version}",
            )
        if key(version) < key(self.config.min_api_version):
            raise _ApiError(
                400,
                f"client version {version} is too old. Minimum supported API version is "
                f"{self.config.min_api_version}, please upgrade your client to a newer version",
            )

    def _take_injected(self, method: str, route: str) -> tuple[int, str] | None:
        with self._lock:
            for entry in self._injected:
                m, pattern, status, message, left = entry
                if left[0] > 0 and (m is None or m == method) and pattern.search(route):
                    left[0] -= 1
                    if left[0] == 0:
                        self._injected.remove(entry)
                    return status, message
        return None

    async def _route(self, request: Request, route: str, q: dict[str, str], body: bytes) -> Response:
        method = request.method
        cid = r"/containers/([^/]+)"
        if route == "/_ping" and method in ("GET", "HEAD"):
            headers = {
                **self._headers(),
                "Cache-Control": "no-cache, no-store, must-revalidate",
                "Pragma": "no-cache",
            }
            return Response("OK" if method == "GET" else b"", media_type="text/plain", headers=headers)
        if route == "/version" and method == "GET":
            return self._json(self._version_doc())
        if route == "/info" and method == "GET":
            return self._json(self._info_doc())
        if route == "/images/json" and method == "GET":
            return self._json(self._image_list())
        if route == "/images/create" and method == "POST":
            return await self._pull(request, q)
        if route == "/containers/create" and method == "POST":
            return self._create_route(request, q, body)
        if route == "/containers/json" and method == "GET":
            return self._json(self._list(q))
        m = re.fullmatch(r"/images/(.+)/json", route)
        if m and method == "GET":
            image = self._find_image(m.group(1))
            if image is None:
                raise _ApiError(404, f"No such image: {self._familiar_or_raw(m.group(1))}")
            return self._json(self._image_doc(image))
        m = re.fullmatch(r"/images/(.+)", route)
        if m and method == "DELETE":
            return self._json(self._remove_image_route(m.group(1), q))
        m = re.fullmatch(cid + r"/json", route)
        if m and method == "GET":
            with self._lock:
                return self._json(self._inspect(self._get(m.group(1))))
        m = re.fullmatch(cid + r"/(start|stop|restart|kill|wait)", route)
        if m and method == "POST":
            c = self._get(m.group(1))
            action = m.group(2)
            if action == "start":
                status, message = await self._start(c)
                return self._error(status, message) if status >= 400 else self._empty(status)
            if action == "stop":
                return self._empty(await self._stop(c, q))
            if action == "restart":
                await self._stop(c, q)
                status, message = await self._start(c)
                return self._error(status, message) if status >= 400 else self._empty(204)
            if action == "kill":
                return self._empty(await self._kill_route(c, q))
            return self._wait_route(request, c, q)
        m = re.fullmatch(cid + r"/logs", route)
        if m and method == "GET":
            return self._logs_route(request, self._get(m.group(1)), q)
        m = re.fullmatch(cid, route)
        if m and method == "DELETE":
            await self._remove_route(self._get(m.group(1)), q)
            return self._empty(204)
        return self._error(404, "page not found")

    def _familiar_or_raw(self, ref: str) -> str:
        try:
            return familiar_name(ref)
        except Exception:  # noqa: BLE001
            return ref

    # ---------------------------------------------------------------- system

    def _version_doc(self) -> dict:
        v = self.config.server_version
        return {
            "Platform": {"Name": "Docker Engine - Community"},
            "Components": [
                {
                    "Name": "Engine",
                    "Version": v,
                    "Details": {
                        "ApiVersion": self.config.api_version,
                        "Arch": "amd64",
                        "BuildTime": "2024-04-22T20:57:02.000000000+00:00",
                        "Experimental": "false",
                        "GitCommit": "c8af8eb",
                        "GoVersion": "go1.21.9",
                        "KernelVersion": "6.5.0-35-generic",
                        "MinAPIVersion": "1.24",
                        "Os": "linux",
                    },
                },
                {
                    "Name": "containerd",
                    "Version": "1.6.31",
                    "Details": {"GitCommit": "e377cd56a71523140ca6ae87e30244719194a521"},
                },
                {"Name": "runc", "Version": "1.1.12", "Details": {"GitCommit": "v1.1.12-0-g51d5e94"}},
            ],
            "Version": v,
            "ApiVersion": self.config.api_version,
            "MinAPIVersion": self.config.min_api_version,
            "GitCommit": "c8af8eb",
            "GoVersion": "go1.21.9",
            "Os": "linux",
            "Arch": "amd64",
            "KernelVersion": "6.5.0-35-generic",
            "BuildTime": "2024-04-22T20:57:02.000000000+00:00",
        }

    def _info_doc(self) -> dict:
        with self._lock:
            containers = list(self._containers.values())
            n_images = len(self._images)
        runtimes = {
            "io.containerd.runc.v2": {"path": "runc", "status": {}},
            "runc": {"path": "runc", "status": {}},
        }
        if self.config.gpu:
            runtimes["nvidia"] = {"path": "nvidia-container-runtime"}
        return {
            "ID": "fake:" + _hex_id(f"engine{self.port}")[:32],
            "Containers": len(containers),
            "ContainersRunning": sum(c.status == "running" for c in containers),
            "ContainersPaused": 0,
            "ContainersStopped": sum(c.status != "running" for c in containers),
            "Images": n_images,
            "Driver": "overlay2",
            "DriverStatus": [["Backing Filesystem", "extfs"]],
            "Plugins": {
                "Volume": ["local"],
                "Network": ["bridge", "host", "none"],
                "Log": ["json-file", "local"],
            },
            "MemoryLimit": True,
            "SwapLimit": False,
            "CpuCfsPeriod": True,
            "CpuCfsQuota": True,
            "OomKillDisable": False,
            "IPv4Forwarding": True,
            "Debug": False,
            "NFd": 42,
            "NGoroutines": 64,
            "SystemTime": _rfc3339_nano(time.time_ns()),
            "LoggingDriver": "json-file",
            "CgroupDriver": "systemd",
            "CgroupVersion": "2",
            "KernelVersion": "6.5.0-35-generic",
            "OperatingSystem": "Ubuntu 22.04.4 LTS",
            "OSVersion": "22.04",
            "OSType": "linux",
            "Architecture": "x86_64",
            "NCPU": self.config.ncpu,
            "MemTotal": self.config.mem_total,
            "IndexServerAddress": "https://index.docker.io/v1/",
            "DockerRootDir": "/var/lib/docker",
            "Name": "fake-docker-host",
            "Labels": [],
            "ExperimentalBuild": False,
            "ServerVersion": self.config.server_version,
            "Runtimes": runtimes,
            "DefaultRuntime": "runc",
            "Swarm": {"LocalNodeState": "inactive"},
            "LiveRestoreEnabled": False,
            "Isolation": "",
            "InitBinary": "docker-init",
            "SecurityOptions": ["name=apparmor", "name=seccomp,profile=builtin", "name=cgroupns"],
            "Warnings": None,
        }

    # ---------------------------------------------------------------- images

    def _image_doc(self, image: FakeImage) -> dict:
        repos = sorted({_repo_of(t) for t in image.tags})
        return {
            "Id": image.id,
            "RepoTags": image.repo_tags,
            "RepoDigests": [f"{familiar_name(r + ':x').rsplit(':', 1)[0]}@{image.digest}" for r in repos],
            "Parent": "",
            "Comment": "buildkit.dockerfile.v0",
            "Created": _rfc3339_nano(image.created_ns),
            "DockerVersion": "",
            "Author": "",
            "Config": {
                "Hostname": "",
                "Domainname": "",
                "User": "",
                "AttachStdin": False,
                "AttachStdout": False,
                "AttachStderr": False,
                "Tty": False,
                "OpenStdin": False,
                "StdinOnce": False,
                "Env": list(image.env),
                "Cmd": image.cmd,
                "Image": "",
                "Volumes": None,
                "WorkingDir": image.working_dir,
                "Entrypoint": image.entrypoint,
                "OnBuild": None,
                "Labels": dict(image.labels) or None,
            },
            "Architecture": "amd64",
            "Os": "linux",
            "Size": image.size,
            "GraphDriver": {"Data": None, "Name": "overlay2"},
            "RootFS": {"Type": "layers", "Layers": ["sha256:" + _hex_id(f"{image.id}{i}") for i in range(3)]},
            "Metadata": {"LastTagTime": ZERO_TIME},
        }

    def _image_list(self) -> list[dict]:
        with self._lock:
            images = list(self._images.values())
            containers = list(self._containers.values())
        return [
            {
                "Id": i.id,
                "ParentId": "",
                "RepoTags": i.repo_tags,
                "RepoDigests": [f"{familiar_name(t).rsplit(':', 1)[0]}@{i.digest}" for t in i.tags[:1]],
                "Created": i.created_ns // 10**9,
                "Size": i.size,
                "SharedSize": -1,
                "VirtualSize": i.size,
                "Labels": dict(i.labels) or None,
                "Containers": sum(c.image_id == i.id for c in containers),
            }
            for i in images
        ]

    def _remove_image_route(self, ref: str, q: dict[str, str]) -> list[dict]:
        with self._lock:
            image = self._find_image(ref)
            if image is None:
                raise _ApiError(404, f"No such image: {self._familiar_or_raw(ref)}")
            users = [c for c in self._containers.values() if c.image_id == image.id]
            if users and not _bool(q.get("force")):
                raise _ApiError(
                    409,
                    f'conflict: unable to remove repository reference "{ref}" (must force) - container '
                    f"{users[0].id[:12]} is using its referenced image {image.id[7:19]}",
                )
            del self._images[image.id]
            self._event("delete", "image", image.id, familiar_name(image.tags[0]), {})
        return [{"Untagged": t} for t in image.repo_tags] + [{"Deleted": image.id}]

    def _pull_failure(self, canonical: str) -> PullFailure | None:
        with self._lock:
            for key in (canonical, _repo_of(canonical)):
                failure = self._pull_failures.get(key)
                if failure is None:
                    continue
                if failure.times is not None:
                    if failure.times <= 0:
                        continue
                    failure.times -= 1
                return failure
        return None

    @staticmethod
    def _default_pull_message(canonical: str, status: int) -> str:
        repo = _repo_of(canonical)
        domain, _, path = repo.partition("/")
        tag = canonical.rsplit(":", 1)[1] if "@" not in canonical else canonical.split("@", 1)[1]
        if status == 404:
            return (
                f"pull access denied for {familiar_name(repo + ':x').rsplit(':', 1)[0]}, repository does not exist "
                "or may require 'docker login': denied: requested access to the resource is denied"
            )
        if status in (401, 403):
            return f'Head "https://{domain}/v2/{path}/manifests/{tag}": unauthorized'
        return f'Get "https://{domain}/v2/": dial tcp: lookup {domain} on 127.0.0.53:53: server misbehaving'

    async def _pull(self, request: Request, q: dict[str, str]) -> Response:
        from_image = q.get("fromImage")
        if not from_image:
            raise _ApiError(
                400, "fromImage is required (importing with fromSrc is not supported by the double)"
            )
        tag = q.get("tag") or ""
        try:
            canonical = normalize_reference(from_image, tag or None)
        except Exception:  # noqa: BLE001
            raise _ApiError(400, "invalid reference format") from None
        record = PullRecord(reference=canonical, from_image=from_image, tag=tag, at=time.monotonic())
        with self._lock:
            self._pulls.append(record)
        failure = self._pull_failure(canonical)
        if failure is not None and not failure.mid_stream:
            msg = failure.message or self._default_pull_message(canonical, failure.status)
            record.outcome, record.status, record.message = "http_error", failure.status, msg
            raise _ApiError(failure.status, msg)
        lines = self._pull_lines(canonical, present=self._find_image(canonical) is not None)
        delay = self.config.pull_step_delay

        async def body() -> Any:
            try:
                for i, line in enumerate(lines):
                    if failure is not None and i >= failure.after_lines:
                        msg = failure.message or (
                            "failed to register layer: write /opt/conda/lib/python3.11/site-packages/torch/lib/"
                            "libtorch_cuda.so: no space left on device"
                        )
                        err = {"errorDetail": {"message": msg}, "error": msg}
                        record.lines.append(err)
                        record.outcome, record.message = "stream_error", msg
                        yield json.dumps(err, separators=(",", ":")).encode() + b"\r\n"
                        return
                    if i == len(lines) - 1:
                        self.add_image(canonical)
                        with self._lock:
                            img = self._find_image(canonical)
                            self._event(
                                "pull",
                                "image",
                                canonical,
                                familiar_name(canonical),
                                {"id": img.id if img else ""},
                            )
                    record.lines.append(line)
                    yield json.dumps(line, separators=(",", ":")).encode() + b"\r\n"
                    if delay:
                        await asyncio.sleep(delay)
                record.outcome = "up_to_date" if "up to date" in lines[-1]["status"] else "ok"
            finally:
                if record.outcome == "running":
                    record.outcome = "disconnected"

        return StreamingResponse(body(), media_type="application/json", headers=self._headers())

    def _pull_lines(self, canonical: str, present: bool) -> list[dict]:
        repo = _repo_of(canonical)
        path = repo.partition("/")[2]
        tag = canonical.rsplit(":", 1)[1] if "@" not in canonical else canonical.split("@", 1)[1]
        digest = "sha256:" + _hex_id("digest:" + canonical)
        shown = familiar_name(canonical)
        lines: list[dict] = [{"status": f"Pulling from {path}", "id": tag}]
        if present:
            lines.append({"status": f"Digest: {digest}"})
            lines.append({"status": f"Status: Image is up to date for {shown}"})
            return lines
        layers = _layer_ids(canonical)
        sizes = [32_000_000 + 7_340_032 * i * i for i in range(len(layers))]
        for lid in layers:
            lines.append({"status": "Pulling fs layer", "progressDetail": {}, "id": lid})
        for lid in layers[1:]:
            lines.append({"status": "Waiting", "progressDetail": {}, "id": lid})
        for lid, size in zip(layers, sizes):
            for frac in (0.01, 0.37, 0.82):
                lines.append(
                    {
                        "status": "Downloading",
                        "progressDetail": {"current": int(size * frac), "total": size},
                        "id": lid,
                    }
                )
            lines.append({"status": "Verifying Checksum", "progressDetail": {}, "id": lid})
            lines.append({"status": "Download complete", "progressDetail": {}, "id": lid})
        for lid, size in zip(layers, sizes):
            for frac in (0.001, 0.5, 1.0):
                lines.append(
                    {
                        "status": "Extracting",
                        "progressDetail": {"current": int(size * frac), "total": size},
                        "id": lid,
                    }
                )
            lines.append({"status": "Pull complete", "progressDetail": {}, "id": lid})
        lines.append({"status": f"Digest: {digest}"})
        lines.append({"status": f"Status: Downloaded newer image for {shown}"})
        return lines

    # ---------------------------------------------------------------- events

    def _event(self, action: str, type_: str, id_: str, name: str, attributes: dict) -> None:
        with self._lock:
            self._events.append(EngineEvent(action, type_, id_, name, attributes, time.monotonic()))

    def _container_event(self, action: str, c: FakeContainer, **extra: Any) -> None:
        self._event(
            action, "container", c.id, c.name, {"image": c.image, "name": c.name, **c.labels, **extra}
        )

    # ---------------------------------------------------------------- create

    def _create_route(self, request: Request, q: dict[str, str], body: bytes) -> Response:
        ctype = request.headers.get("content-type", "")
        if body and ctype and "json" not in ctype:
            raise _ApiError(400, f"unsupported Content-Type header ({ctype}): must be 'application/json'")
        try:
            parsed = json.loads(body) if body else None
        except ValueError as e:
            raise _ApiError(400, f"invalid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise _ApiError(400, "config cannot be empty in order to create a container")
        c = self._create(parsed, body, q.get("name") or None)
        return self._json({"Id": c.id, "Warnings": []}, 201)

    def _create(self, body: dict, raw: bytes, name: str | None) -> FakeContainer:
        image_ref = body.get("Image")
        if not image_ref or not isinstance(image_ref, str):
            raise _ApiError(400, "No image specified")  # simplified
        with self._lock:
            image = self._find_image(image_ref)
            if image is None:
                raise _ApiError(404, f"No such image: {self._familiar_or_raw(image_ref)}")
            runtime = (body.get("HostConfig") or {}).get("Runtime")
            if runtime and runtime not in self._info_doc()["Runtimes"]:
                raise _ApiError(400, f"unknown or invalid runtime name: {runtime}")
            if name is not None:
                if not _NAME_RE.match(name):
                    raise _ApiError(
                        400, f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
                    )
                name = name.lstrip("/")
                for other in self._containers.values():
                    if other.name == name:
                        raise _ApiError(
                            409,
                            f'Conflict. The container name "/{name}" is already in use by container "{other.id}". '
                            "You have to remove (or rename) that container to be able to reuse that name.",
                        )
            else:
                taken = {c.name for c in self._containers.values()}
                while True:
                    name = f"{random.choice(_ADJECTIVES)}_{random.choice(_NOUNS)}"
                    if name not in taken:
                        break
            env = list(image.env)
            keys = {e.split("=", 1)[0]: i for i, e in enumerate(env)}
            for e in body.get("Env") or []:
                k = e.split("=", 1)[0]
                if k in keys:
                    env[keys[k]] = e
                else:
                    keys[k] = len(env)
                    env.append(e)
            entrypoint = body.get("Entrypoint")
            if isinstance(entrypoint, str):
                entrypoint = [entrypoint]
            cmd = body.get("Cmd")
            if isinstance(cmd, str):
                cmd = [cmd]
            if entrypoint is None:
                entrypoint = image.entrypoint
                if cmd is None:
                    cmd = image.cmd
            c = FakeContainer(
                id=_hex_id(),
                name=name,
                image=image_ref,
                image_id=image.id,
                body=body,
                raw_body=raw,
                created_ns=time.time_ns(),
                env=env,
                cmd=list(cmd or []),
                entrypoint=list(entrypoint) if entrypoint else None,
            )
            self._containers[c.id] = c
            self._created.append(c)
            self._container_event("create", c)
        self._notify()
        return c

    # ---------------------------------------------------------------- inspect / list

    def _tgi_container_port(self, c: FakeContainer) -> str:
        args = tgi_args(c.cmd, c.env)
        env_port = dict(e.split("=", 1) for e in c.env if "=" in e).get("PORT")
        port = args["flags"].get("--port") or env_port or 80
        return f"{port}/tcp"

    def _health(self, c: FakeContainer) -> dict | None:
        hc = (c.body.get("Healthcheck") or {}) if isinstance(c.body.get("Healthcheck"), dict) else {}
        test = hc.get("Test")
        if not hc or test == ["NONE"]:
            return None
        if c.running:
            if c._connected and c.tgi is not None and c.tgi.ready:
                status = "healthy" if c.tgi.config.healthy else "unhealthy"
            else:
                status = "unhealthy" if c.ever_healthy else "starting"
            if status == "healthy":
                c.ever_healthy = True
        elif c.start_count:
            status = "unhealthy"
        else:
            status = "starting"
        return {"Status": status, "FailingStreak": 0 if status == "healthy" else 1, "Log": []}

    def _state(self, c: FakeContainer) -> dict:
        state = {
            "Status": c.status,
            "Running": c.running,
            "Paused": False,
            "Restarting": False,
            "OOMKilled": c.oom_killed,
            "Dead": False,
            "Pid": c.pid,
            "ExitCode": c.exit_code,
            "Error": c.error,
            "StartedAt": _rfc3339_nano(c.started_ns),
            "FinishedAt": _rfc3339_nano(c.finished_ns),
        }
        health = self._health(c)
        if health is not None:
            state["Health"] = health
        return state

    def _mounts(self, c: FakeContainer) -> list[dict]:
        mounts = []
        for bind in c.host_config.get("Binds") or []:
            parts = bind.split(":")
            src, dst = parts[0], parts[1] if len(parts) > 1 else parts[0]
            mode = parts[2] if len(parts) > 2 else ""
            if src.startswith("/"):
                mounts.append(
                    {
                        "Type": "bind",
                        "Source": src,
                        "Destination": dst,
                        "Mode": mode,
                        "RW": "ro" not in mode.split(","),
                        "Propagation": "rprivate",
                    }
                )
            else:
                mounts.append(
                    {
                        "Type": "volume",
                        "Name": src,
                        "Source": f"/var/lib/docker/volumes/{src}/_data",
                        "Destination": dst,
                        "Driver": "local",
                        "Mode": mode or "z",
                        "RW": "ro" not in mode.split(","),
                        "Propagation": "",
                    }
                )
        for m in c.host_config.get("Mounts") or []:
            mounts.append(
                {
                    "Type": m.get("Type", "volume"),
                    "Source": m.get("Source", ""),
                    "Destination": m.get("Target", ""),
                    "Mode": "",
                    "RW": not m.get("ReadOnly", False),
                    "Propagation": (m.get("BindOptions") or {}).get(
                        "Propagation", "rprivate" if m.get("Type") == "bind" else ""
                    ),
                }
            )
        return mounts

    def _inspect(self, c: FakeContainer) -> dict:
        hc = {
            "Binds": None,
            "ContainerIDFile": "",
            "LogConfig": {"Type": "json-file", "Config": {}},
            "NetworkMode": "default",
            "PortBindings": {},
            "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
            "AutoRemove": False,
            "VolumeDriver": "",
            "VolumesFrom": None,
            "CapAdd": None,
            "CapDrop": None,
            "CgroupnsMode": "private",
            "Dns": [],
            "DnsOptions": [],
            "DnsSearch": [],
            "ExtraHosts": None,
            "GroupAdd": None,
            "IpcMode": "private",
            "Privileged": False,
            "PublishAllPorts": False,
            "ReadonlyRootfs": False,
            "SecurityOpt": None,
            "ShmSize": 67108864,
            "Runtime": "runc",
            "Memory": 0,
            "DeviceRequests": None,
            "Mounts": None,
        }
        hc.update(c.host_config)
        body = c.body
        image_cfg = self._images.get(c.image_id)
        labels = {**(image_cfg.labels if image_cfg else {}), **(body.get("Labels") or {})}
        config = {
            "Hostname": body.get("Hostname") or c.id[:12],
            "Domainname": body.get("Domainname", ""),
            "User": body.get("User", ""),
            "AttachStdin": bool(body.get("AttachStdin", False)),
            "AttachStdout": bool(body.get("AttachStdout", False)),
            "AttachStderr": bool(body.get("AttachStderr", False)),
            "ExposedPorts": body.get("ExposedPorts"),
            "Tty": bool(body.get("Tty", False)),
            "OpenStdin": bool(body.get("OpenStdin", False)),
            "StdinOnce": bool(body.get("StdinOnce", False)),
            "Env": list(c.env),
            "Cmd": list(c.cmd) or None,
            "Image": c.image,
            "Volumes": body.get("Volumes"),
            "WorkingDir": body.get("WorkingDir") or (image_cfg.working_dir if image_cfg else ""),
            "Entrypoint": c.entrypoint,
            "OnBuild": None,
            "Labels": labels,
        }
        if "Healthcheck" in body:
            config["Healthcheck"] = body["Healthcheck"]
        if "StopTimeout" in body:
            config["StopTimeout"] = body["StopTimeout"]
        ip = f"172.17.0.{2 + (int(c.id[:4], 16) % 250)}" if c.running else ""
        networks = {
            "bridge": {
                "IPAMConfig": None,
                "Links": None,
                "Aliases": None,
                "MacAddress": "02:42:ac:11:00:02" if c.running else "",
                "NetworkID": _hex_id("bridge"),
                "EndpointID": c.endpoint_id if c.running else "",
                "Gateway": "172.17.0.1" if c.running else "",
                "IPAddress": ip,
                "IPPrefixLen": 16 if c.running else 0,
                "IPv6Gateway": "",
                "GlobalIPv6Address": "",
                "GlobalIPv6PrefixLen": 0,
                "DriverOpts": None,
                "DNSNames": None,
            }
        }
        return {
            "Id": c.id,
            "Created": _rfc3339_nano(c.created_ns),
            "Path": (c.entrypoint or c.cmd or [""])[0],
            "Args": (c.entrypoint[1:] + c.cmd) if c.entrypoint else c.cmd[1:],
            "State": self._state(c),
            "Image": c.image_id,
            "ResolvConfPath": f"/var/lib/docker/containers/{c.id}/resolv.conf",
            "HostnamePath": f"/var/lib/docker/containers/{c.id}/hostname",
            "HostsPath": f"/var/lib/docker/containers/{c.id}/hosts",
            "LogPath": f"/var/lib/docker/containers/{c.id}/{c.id}-json.log",
            "Name": "/" + c.name,
            "RestartCount": 0,
            "Driver": "overlay2",
            "Platform": "linux",
            "MountLabel": "",
            "ProcessLabel": "",
            "AppArmorProfile": "docker-default",
            "ExecIDs": None,
            "HostConfig": hc,
            "GraphDriver": {"Data": None, "Name": "overlay2"},
            "Mounts": self._mounts(c),
            "Config": config,
            "NetworkSettings": {
                "Bridge": "",
                "SandboxID": _hex_id("sandbox" + c.id) if c.running else "",
                "SandboxKey": f"/var/run/docker/netns/{c.id[:12]}" if c.running else "",
                "Ports": {k: [dict(b) for b in v] for k, v in c.host_ports.items()} if c.running else {},
                "HairpinMode": False,
                "LinkLocalIPv6Address": "",
                "LinkLocalIPv6PrefixLen": 0,
                "SecondaryIPAddresses": None,
                "SecondaryIPv6Addresses": None,
                "EndpointID": c.endpoint_id if c.running else "",
                "Gateway": "172.17.0.1" if c.running else "",
                "GlobalIPv6Address": "",
                "GlobalIPv6PrefixLen": 0,
                "IPAddress": ip,
                "IPPrefixLen": 16 if c.running else 0,
                "IPv6Gateway": "",
                "MacAddress": "02:42:ac:11:00:02" if c.running else "",
                "Networks": networks,
            },
        }

    def _summary(self, c: FakeContainer) -> dict:
        now = time.time_ns()
        if c.status == "running":
            status = "Up " + _human_duration((now - c.started_ns) / 1e9)
            health = self._health(c)
            if health is not None:
                status += {
                    "starting": " (health: starting)",
                    "healthy": " (healthy)",
                    "unhealthy": " (unhealthy)",
                }[health["Status"]]
        elif c.status == "exited":
            status = f"Exited ({c.exit_code}) {_human_duration((now - c.finished_ns) / 1e9)} ago"
        else:
            status = c.status.capitalize()
        ports = []
        for cport, bindings in c.host_ports.items() if c.running else []:
            private, proto = cport.split("/")
            for b in bindings:
                ports.append(
                    {
                        "IP": b["HostIp"],
                        "PrivatePort": int(private),
                        "PublicPort": int(b["HostPort"]),
                        "Type": proto,
                    }
                )
        image = self._images.get(c.image_id)
        return {
            "Id": c.id,
            "Names": ["/" + c.name],
            "Image": c.image if image is not None else c.image_id,
            "ImageID": c.image_id,
            "Command": " ".join((c.entrypoint or []) + c.cmd),
            "Created": c.created_ns // 10**9,
            "Ports": ports,
            "Labels": self._inspect(c)["Config"]["Labels"],
            "State": c.status,
            "Status": status,
            "HostConfig": {"NetworkMode": c.host_config.get("NetworkMode", "default")},
            "NetworkSettings": {"Networks": self._inspect(c)["NetworkSettings"]["Networks"]},
            "Mounts": self._mounts(c),
        }

    def _list(self, q: dict[str, str]) -> list[dict]:
        show_all = _bool(q.get("all"))
        try:
            limit = int(q.get("limit") or -1)
        except ValueError:
            raise _ApiError(400, f"strconv.Atoi: parsing {q.get('limit')!r}: invalid syntax") from None
        filters: dict[str, Any] = {}
        if q.get("filters"):
            try:
                filters = json.loads(q["filters"])
            except ValueError:
                raise _ApiError(400, "invalid filter") from None
        norm: dict[str, list[str]] = {}
        for key, values in filters.items():
            if isinstance(values, dict):  # legacy {"key": {"value": true}}
                values = [k for k, v in values.items() if v]
            elif isinstance(values, str):
                values = [values]
            allowed = {
                "label",
                "name",
                "status",
                "id",
                "ancestor",
                "exited",
                "health",
                "before",
                "since",
                "network",
                "volume",
                "publish",
                "expose",
                "isolation",
                "is-task",
            }
            if key not in allowed:
                raise _ApiError(400, f"invalid filter '{key}'")
            norm[key] = [str(v) for v in values]
        statuses = {"created", "restarting", "running", "removing", "paused", "exited", "dead"}
        for s in norm.get("status", []):
            if s not in statuses:
                raise _ApiError(400, f"Unrecognised filter value for status: {s}")
        with self._lock:
            containers = sorted(self._containers.values(), key=lambda c: c.created_ns, reverse=True)
            out = []
            for c in containers:
                # moby includeContainerInList; a status filter implies all (foldFilter)
                if not show_all and c.status != "running" and "status" not in norm and limit <= 0:
                    continue
                if not self._matches(c, norm):
                    continue
                out.append(self._summary(c))
        if limit > 0:
            out = out[:limit]
        return out

    def _matches(self, c: FakeContainer, f: dict[str, list[str]]) -> bool:
        labels = self._inspect(c)["Config"]["Labels"]
        for want in f.get("label", []):
            key, sep, value = want.partition("=")
            if key not in labels or (sep and labels[key] != value):
                return False
        if f.get("name"):
            names = ("/" + c.name, c.name)
            ok = False
            for pattern in f["name"]:
                try:
                    rx = re.compile(pattern)
                except re.error:
                    raise _ApiError(400, f"error parsing regexp: {pattern}") from None
                if any(rx.search(n) for n in names):
                    ok = True
            if not ok:
                return False
        if f.get("status") and c.status not in f["status"]:
            return False
        if f.get("id") and not any(c.id.startswith(v) for v in f["id"]):
            return False
        if f.get("exited") and (c.status != "exited" or str(c.exit_code) not in f["exited"]):
            return False
        if f.get("ancestor"):
            ok = False
            for v in f["ancestor"]:
                img = self._find_image(v)
                if img is not None and img.id == c.image_id:
                    ok = True
            if not ok:
                return False
        if f.get("health"):
            h = self._health(c)
            if (h["Status"] if h else "none") not in f["health"]:
                return False
        return True

    # ---------------------------------------------------------------- start

    def _gpu_error(self, c: FakeContainer) -> str | None:
        if self.config.gpu:
            return None
        for req in c.host_config.get("DeviceRequests") or []:
            caps = req.get("Capabilities") or []
            driver = req.get("Driver") or ""
            if driver == "nvidia" or any("gpu" in (group or []) for group in caps):
                return f'could not select device driver "{driver}" with capabilities: {_go_caps(caps)}'
        return None

    @staticmethod
    def _port_free(port: int) -> bool:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
        finally:
            s.close()

    @staticmethod
    def _free_port() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def _port_error(self, c: FakeContainer, ip: str, port: int, foreign: bool) -> str:
        shown = ip or "0.0.0.0"
        if foreign and self.config.port_in_use_error == "userland_proxy":
            detail = (
                f"failed to bind port {shown}:{port}/tcp: Error starting userland proxy: listen tcp4 "
                f"{shown}:{port}: bind: address already in use"
            )
        else:
            detail = f"Bind for {shown}:{port} failed: port is already allocated"
        return f"driver failed programming external connectivity on endpoint {c.name} ({c.endpoint_id}): {detail}"

    def _start_failed(self, c: FakeContainer, message: str) -> None:
        with self._lock:
            c.error = message
            if c.exit_code == 0:
                c.exit_code = EXIT_UNKNOWN
        self._notify()

    async def _start(self, c: FakeContainer, behavior: TGIBehavior | None = None) -> tuple[int, str]:
        """Returns (HTTP status, error message)."""
        with self._lock:
            if c.removed:
                return 404, f"No such container: {c.id}"
            if c.running:
                return 304, ""
        err = self._gpu_error(c)
        if err:
            self._start_failed(c, err)
            return 400, err
        tgi_cport = self._tgi_container_port(c)
        bindings: dict[str, list[dict[str, str]]] = {}
        tgi_binding: tuple[str, int] | None = None
        with self._lock:
            taken = {
                int(b["HostPort"])
                for other in self._containers.values()
                if other.running and other is not c
                for lst in other.host_ports.values()
                for b in lst
            }
        for cport, lst in (c.host_config.get("PortBindings") or {}).items():
            cport = cport if "/" in str(cport) else f"{cport}/tcp"
            for binding in lst or [{}]:
                ip = (binding or {}).get("HostIp") or ""
                hp_raw = str((binding or {}).get("HostPort") or "")
                hp = int(hp_raw.split("-")[0]) if hp_raw else self._free_port()
                if hp in taken:
                    err = self._port_error(c, ip, hp, foreign=False)
                elif not self._port_free(hp):
                    err = self._port_error(c, ip, hp, foreign=True)
                else:
                    err = None
                if err:
                    self._start_failed(c, err)
                    return 500, err
                taken.add(hp)
                entries = [{"HostIp": ip or "0.0.0.0", "HostPort": str(hp)}]
                if not ip:
                    entries.append({"HostIp": "::", "HostPort": str(hp)})
                bindings.setdefault(cport, []).extend(entries)
                if cport == tgi_cport and tgi_binding is None:
                    tgi_binding = (ip, hp)
        b = behavior or self.behavior_for(c)
        tgi = None
        if tgi_binding is not None:
            args = tgi_args(c.cmd, c.env)
            cfg = {**args["config"], **b.tgi}
            serving = b.scenario in ("serve", "exit_on_stop_137")
            cfg["load_delay"] = max(b.load_delay, 0.001) if serving else _NEVER
            tgi = FakeTGI(b.script, port=tgi_binding[1], **cfg)
            try:
                await asyncio.to_thread(tgi.start)
            except OSError:
                err = self._port_error(c, tgi_binding[0], tgi_binding[1], foreign=True)
                self._start_failed(c, err)
                return 500, err
        loop = asyncio.get_running_loop()
        with self._lock:
            c.status = "running"
            c.error = ""
            c.exit_code = 0
            c.oom_killed = False
            c.pid = random.randint(1000, 60000)
            c.started_ns = time.time_ns()
            c.start_count += 1
            c.behavior = b
            c.tgi = tgi
            c.host_ports = bindings
            c._connected = False
            c._sigterm = asyncio.Event()
            c._kill = (137, False)
            c._tgi_stop = None
            c.ever_healthy = False
            self._container_event("start", c)
            c._task = loop.create_task(self._process(c, b))
        self._notify()
        return 204, ""

    # ---------------------------------------------------------------- the simulated launcher

    def _log(
        self,
        c: FakeContainer,
        msg: str,
        *,
        level: str = "INFO",
        target: str = "text_generation_launcher",
        span: str = "",
    ) -> None:
        ns = time.time_ns()
        lines = f"{_trace_ts(ns)} {level:>5} {span}{target}: {msg}".split("\n")
        with self._lock:
            for line in lines:
                c.logs.append(LogLine(ns, STDOUT, line))
        self._notify()

    def _raw(self, c: FakeContainer, text: str, stream: int = STDOUT) -> None:
        ns = time.time_ns()
        with self._lock:
            for line in text.split("\n"):
                c.logs.append(LogLine(ns, stream, line))
        self._notify()

    def _stderr(self, c: FakeContainer, text: str) -> None:
        self._raw(c, text, STDERR)

    async def _sleep(self, c: FakeContainer, seconds: float) -> None:
        """Sleep; raise _Terminated if SIGTERM arrives (unless the launcher ignores it)."""
        b = c.behavior
        assert c._sigterm is not None and b is not None
        if b.ignore_sigterm:
            await asyncio.sleep(seconds)
            return
        if c._sigterm.is_set():
            raise _Terminated
        try:
            await asyncio.wait_for(c._sigterm.wait(), seconds)
        except asyncio.TimeoutError:
            return
        raise _Terminated

    async def _process(self, c: FakeContainer, b: TGIBehavior) -> None:
        code, oom = 0, False
        try:
            try:
                code, oom = await self._launcher(c, b)
            except _Terminated:
                code, oom = await self._graceful(c)
        except asyncio.CancelledError:
            code, oom = c._kill
        except Exception as e:  # noqa: BLE001 - a bug in the double
            self.errors.append(e)
            code, oom = 1, False
        try:
            await self._stop_tgi(c)
        except Exception as e:  # noqa: BLE001
            self.errors.append(e)
        self._exited(c, code, oom)

    async def _stop_tgi(self, c: FakeContainer) -> None:
        if c.tgi is None:
            return
        if c._tgi_stop is None:
            c._tgi_stop = asyncio.get_running_loop().run_in_executor(None, c.tgi.stop)
        await asyncio.shield(c._tgi_stop)

    def _exited(self, c: FakeContainer, code: int, oom: bool) -> None:
        with self._lock:
            c.status = "exited"
            c.exit_code = code
            c.oom_killed = oom
            c.pid = 0
            c.finished_ns = time.time_ns()
            c.exit_count += 1
            c._connected = False
            if oom:
                self._container_event("oom", c)
            self._container_event("die", c, exitCode=str(code))
            auto_remove = bool(c.host_config.get("AutoRemove"))
        self._notify()
        if auto_remove:
            self._remove(c)

    async def _graceful(self, c: FakeContainer) -> tuple[int, bool]:
        b = c.behavior
        assert b is not None
        if c._connected:
            self._log(c, "Terminating webserver")
            self._log(c, "Waiting for webserver to gracefully shutdown")
            await self._stop_tgi(c)
            self._log(c, "webserver terminated")
        self._log(c, "Shutting down shards")
        self._log(c, "Terminating shard rank=0", span="shard-manager: ")
        self._log(c, "Waiting for shard to gracefully shutdown rank=0", span="shard-manager: ")
        await asyncio.sleep(b.stop_duration)
        self._log(c, "shard terminated rank=0", span="shard-manager: ")
        return 0, False

    def _args_dump(self, c: FakeContainer, args: dict) -> str:
        flags, cfg = args["flags"], args["config"]

        def opt(name: str, quote: bool = False) -> str:
            v = flags.get(name)
            if v is None:
                return "None"
            if v is True:
                return "Some(true)"
            return f'Some("{v}")' if quote else f"Some({v})"

        def val(name: str, default: Any) -> Any:
            v = flags.get(name)
            return default if v is None else ("true" if v is True else v)

        fields = [
            ("model_id", f'"{args["model_id"]}"'),
            ("revision", opt("--revision", True)),
            ("validation_workers", val("--validation-workers", 2)),
            ("sharded", opt("--sharded")),
            ("num_shard", opt("--num-shard")),
            ("quantize", opt("--quantize")),
            ("speculate", opt("--speculate")),
            ("dtype", opt("--dtype")),
            ("kv_cache_dtype", opt("--kv-cache-dtype")),
            ("trust_remote_code", "true" if flags.get("--trust-remote-code") else "false"),
            ("max_concurrent_requests", cfg.get("max_concurrent_requests", 128)),
            ("max_best_of", cfg.get("max_best_of", 2)),
            ("max_stop_sequences", cfg.get("max_stop_sequences", 4)),
            ("max_top_n_tokens", cfg.get("max_top_n_tokens", 5)),
            ("max_input_tokens", opt("--max-input-tokens")),
            ("max_input_length", opt("--max-input-length")),
            ("max_total_tokens", opt("--max-total-tokens")),
            ("waiting_served_ratio", val("--waiting-served-ratio", 0.3)),
            ("max_batch_prefill_tokens", opt("--max-batch-prefill-tokens")),
            ("max_batch_total_tokens", opt("--max-batch-total-tokens")),
            ("max_waiting_tokens", val("--max-waiting-tokens", 20)),
            ("max_batch_size", opt("--max-batch-size")),
            ("cuda_graphs", opt("--cuda-graphs")),
            ("hostname", f'"{val("--hostname", c.id[:12])}"'),
            (
                "port",
                args["port"]
                if "--port" in flags
                else int(dict(e.split("=", 1) for e in c.env if "=" in e).get("PORT", 3000)),
            ),
            ("prometheus_port", val("--prometheus-port", 9000)),
            ("shard_uds_path", '"/tmp/text-generation-server"'),
            ("master_addr", '"localhost"'),
            ("master_port", 29500),
            ("huggingface_hub_cache", opt("--huggingface-hub-cache", True)),
            ("weights_cache_override", opt("--weights-cache-override", True)),
            ("disable_custom_kernels", "true" if flags.get("--disable-custom-kernels") else "false"),
            ("cuda_memory_fraction", val("--cuda-memory-fraction", "1.0")),
            ("rope_scaling", opt("--rope-scaling")),
            ("rope_factor", opt("--rope-factor")),
            ("json_output", "true" if flags.get("--json-output") else "false"),
            ("otlp_endpoint", opt("--otlp-endpoint", True)),
            ("otlp_service_name", '"text-generation-inference.router"'),
            ("cors_allow_origin", "[]"),
            ("api_key", opt("--api-key", True)),
            ("watermark_gamma", opt("--watermark-gamma")),
            ("watermark_delta", opt("--watermark-delta")),
            ("ngrok", "false"),
            ("ngrok_authtoken", "None"),
            ("ngrok_edge", "None"),
            ("tokenizer_config_path", opt("--tokenizer-config-path", True)),
            ("disable_grammar_support", "true" if cfg.get("disable_grammar_support") else "false"),
            ("env", "false"),
            ("max_client_batch_size", cfg.get("max_client_batch_size", 4)),
            ("lora_adapters", opt("--lora-adapters", True)),
            ("usage_stats", str(val("--usage-stats", "on")).replace("-", "_").title().replace("_", "")),
            ("payload_limit", cfg.get("payload_limit", 2000000)),
            ("enable_prefill_logprobs", "true" if cfg.get("enable_prefill_logprobs") else "false"),
            ("graceful_termination_timeout", val("--graceful-termination-timeout", 90)),
        ]
        return "Args {\n" + "".join(f"    {k}: {v},\n" for k, v in fields) + "}"

    async def _launcher(self, c: FakeContainer, b: TGIBehavior) -> tuple[int, bool]:
        t0 = time.monotonic()
        args = tgi_args(c.cmd, c.env)
        cfg = {**args["config"], **b.tgi}
        model = args["model_id"]
        env = dict(e.split("=", 1) for e in c.env if "=" in e)
        shard = "shard-manager: "
        self._log(c, self._args_dump(c, args))
        if not (env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")):
            self._log(c, 'Token file not found "/data/token"', target="hf_hub")
        max_input = cfg.get("max_input_tokens", 4095)
        self._log(c, "Using attention flashinfer - Prefix caching true")
        self._log(c, f"Default `max_batch_prefill_tokens` to {max_input + 50}")
        self._log(c, "Using default cuda graphs [1, 2, 4, 8, 16, 32]")
        self._log(c, f"Starting check and download process for {model}", span="download: ")

        fail_at = t0 + b.fail_after
        ready_at = t0 + b.load_delay

        def left(until: float) -> float:
            return max(0.0, until - time.monotonic())

        if b.scenario == "gated_model":
            await self._sleep(c, left(fail_at))
            self._log(c, "Download encountered an error: ", level="ERROR", span="download: ")
            self._raw(c, _gated_traceback(model))
            self._stderr(c, "Error: DownloadError")
            return 1, False

        failing = b.scenario in ("crash_loading", "oom_killed")
        phase_end = t0 + (b.fail_after if failing else b.load_delay) * 0.2
        await self._sleep(c, left(phase_end))
        self._log(c, "Download file: model-00001-of-00002.safetensors")
        self._log(c, f"Successfully downloaded weights for {model}", span="download: ")
        self._log(c, "Starting shard rank=0", span=shard)
        self._log(c, "Using prefix caching = True")
        shard_start = time.monotonic()
        loaded_at = fail_at if failing else t0 + b.load_delay * 0.8
        while True:
            self._log(c, "Waiting for shard to be ready... rank=0", span=shard)
            wait = min(b.shard_wait_interval, left(loaded_at))
            await self._sleep(c, wait)
            if time.monotonic() >= loaded_at:
                break
        if b.scenario == "crash_loading":
            self._log(
                c,
                "Shard complete standard error output:\n\n" + _oom_traceback(b.oom_message) + "\n rank=0",
                level="ERROR",
                span=shard,
            )
            self._log(c, "Shard 0 failed to start", level="ERROR")
            self._log(c, "Shutting down shards")
            self._stderr(c, "Error: ShardCannotStart")
            return 1, False
        if b.scenario == "oom_killed":
            return 137, True
        self._log(c, "Server started at unix:///tmp/text-generation-server-0")
        self._log(
            c, f"Shard ready in {time.monotonic() - shard_start + 0.2 * b.load_delay:.2f}s rank=0", span=shard
        )
        self._log(c, "Starting Webserver")
        self._log(c, "Warming up model", target="text_generation_router_v3: backends/v3/src/lib.rs:125")
        if b.scenario == "webserver_failed":
            await self._sleep(c, left(max(fail_at, time.monotonic())))
            self._log(
                c,
                f"Server error: {b.oom_message}",
                level="ERROR",
                span=f"warmup{{max_input_length=Some({max_input}) max_prefill_tokens={max_input + 50} "
                f"max_total_tokens=Some({cfg.get('max_total_tokens', max_input + 1)}) max_batch_size=None}}:warmup: ",
                target="text_generation_router_v3::client: backends/v3/src/client/mod.rs:45",
            )
            self._raw(c, f'Error: Backend(Warmup(Generation("{b.oom_message}")))')
            self._log(c, "Webserver Crashed", level="ERROR")
            self._log(c, "Shutting down shards")
            self._log(c, "Terminating shard rank=0", span=shard)
            self._log(c, "Waiting for shard to gracefully shutdown rank=0", span=shard)
            self._log(c, "shard terminated rank=0", span=shard)
            self._stderr(c, "Error: WebserverFailed")
            return 1, False
        self._log(c, "Cuda Graphs are enabled for sizes [32, 16, 8, 4, 2, 1]")
        total = cfg.get("max_total_tokens", max_input + 1)
        self._log(
            c,
            f"Setting max batch total tokens to {max(total, 16 * total)}",
            target="text_generation_router_v3: backends/v3/src/lib.rs:137",
        )
        self._log(c, "Using backend V3", target="text_generation_router_v3: backends/v3/src/lib.rs:166")
        await self._sleep(c, left(ready_at))
        tgi = c.tgi
        while tgi is not None and not tgi.ready:
            await self._sleep(c, 0.002)
        c._connected = True
        self._log(c, "Connected", target="text_generation_router::server: router/src/server.rs:2431")
        self._notify()
        while True:
            await self._sleep(c, 3600)

    # ---------------------------------------------------------------- stop / kill / wait / remove

    async def _kill(self, c: FakeContainer, code: int = 137, oom: bool = False) -> None:
        task = c._task
        if task is None or task.done():
            return
        c._kill = (code, oom)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    async def _stop(self, c: FakeContainer, q: dict[str, str]) -> int:
        if not c.running:
            return 304
        t_raw = q.get("t")
        try:
            t = int(t_raw) if t_raw not in (None, "") else int(c.body.get("StopTimeout") or 10)
        except ValueError:
            raise _ApiError(400, f"strconv.Atoi: parsing {t_raw!r}: invalid syntax") from None
        self._container_event("kill", c, signal="15")
        assert c._sigterm is not None
        c._sigterm.set()
        grace = None if t < 0 else t * self.config.stop_grace_scale
        exited = await self._until(lambda: not c.running, grace)
        if not exited:
            self._container_event("kill", c, signal="9")
            await self._kill(c, 137, False)
        self._container_event("stop", c)
        return 204

    async def _kill_route(self, c: FakeContainer, q: dict[str, str]) -> int:
        if not c.running:
            raise _ApiError(409, f"Container {c.id} is not running")
        sig = (q.get("signal") or "SIGKILL").upper()
        sig = sig if sig.startswith("SIG") or sig.isdigit() else "SIG" + sig
        if sig in ("SIGKILL", "9"):
            self._container_event("kill", c, signal="9")
            await self._kill(c, 137, False)
        elif sig in ("SIGTERM", "15", "SIGINT", "2"):
            self._container_event("kill", c, signal="15" if sig in ("SIGTERM", "15") else "2")
            assert c._sigterm is not None
            c._sigterm.set()
        else:
            self._container_event("kill", c, signal=sig)
        return 204

    def _wait_route(self, request: Request, c: FakeContainer, q: dict[str, str]) -> Response:
        condition = q.get("condition") or "not-running"
        if condition not in ("not-running", "next-exit", "removed"):
            raise _ApiError(400, f"invalid condition: {condition!r}")
        exits = c.exit_count

        def done() -> bool:
            if condition == "removed":
                return c.removed
            if condition == "next-exit":
                return c.exit_count > exits
            return not c.running

        async def body() -> Any:
            await self._until(done)
            yield (
                json.dumps({"StatusCode": c.exit_code, "Error": None}, separators=(",", ":")).encode() + b"\n"
            )

        return StreamingResponse(body(), media_type="application/json", headers=self._headers())

    async def _remove_route(self, c: FakeContainer, q: dict[str, str]) -> None:
        if c.running:
            if not _bool(q.get("force")):
                raise _ApiError(
                    409,
                    f'cannot remove container "/{c.name}": container is running: stop the container before '
                    "removing or force remove",
                )
            self._container_event("kill", c, signal="9")
            await self._kill(c, 137, False)
        self._remove(c)

    def _remove(self, c: FakeContainer) -> None:
        with self._lock:
            if c.removed:
                return
            c.removed = True
            self._containers.pop(c.id, None)
            self._container_event("destroy", c)
        self._notify()

    # ---------------------------------------------------------------- logs

    def _logs_route(self, request: Request, c: FakeContainer, q: dict[str, str]) -> Response:
        want_out, want_err = _bool(q.get("stdout")), _bool(q.get("stderr"))
        if not (want_out or want_err):
            raise _ApiError(400, "Bad parameters: you must choose at least one stream")
        follow = _bool(q.get("follow"))
        timestamps = _bool(q.get("timestamps"))
        tail = q.get("tail") or "all"
        since = float(q["since"]) if q.get("since") not in (None, "", "0") else None
        until = float(q["until"]) if q.get("until") not in (None, "", "0") else None
        if tail != "all":
            try:
                int(tail)
            except ValueError:
                tail = "all"

        def frames(lines: list[LogLine]) -> bytes:
            out = bytearray()
            for line in lines:
                if line.stream == STDOUT and not want_out or line.stream == STDERR and not want_err:
                    continue
                if since is not None and line.at_ns / 1e9 < since:
                    continue
                if until is not None and line.at_ns / 1e9 > until:
                    continue
                payload = ((_rfc3339_nano(line.at_ns) + " ") if timestamps else "") + line.text + "\n"
                data = payload.encode()
                out += struct.pack(">BxxxL", line.stream, len(data)) + data
            return bytes(out)

        async def body() -> Any:
            with self._lock:
                self._log_streams_open += 1
            self._notify()
            try:
                with self._lock:
                    start = 0
                    if tail != "all":
                        start = max(0, len(c.logs) - int(tail))
                idx = start
                while True:
                    with self._lock:
                        alive = c.running and not c.removed
                        new = c.logs[idx:]
                        idx += len(new)
                    chunk = frames(new)
                    if chunk:
                        yield chunk
                    if not follow or not alive:
                        return
                    await self._until(lambda n=idx: len(c.logs) > n or not c.running or c.removed)
            finally:
                with self._lock:
                    self._log_streams_open -= 1
                self._notify()

        headers = self._headers()
        return StreamingResponse(
            body(), media_type="application/vnd.docker.multiplexed-stream", headers=headers
        )


# --------------------------------------------------------------------------------------------
# Canned texts and the docker-py-like create body
# --------------------------------------------------------------------------------------------


def _oom_traceback(message: str) -> str:
    return "\n".join(
        [
            "Traceback (most recent call last):",
            '  File "/usr/src/.venv/bin/text-generation-server", line 10, in <module>',
            "    sys.exit(app())",
            '  File "/usr/src/server/text_generation_server/cli.py", line 119, in serve',
            "    server.serve(",
            '  File "/usr/src/server/text_generation_server/server.py", line 315, in serve',
            "    asyncio.run(",
            '  File "/usr/src/server/text_generation_server/server.py", line 268, in serve_inner',
            "    model = get_model_with_lora_adapters(",
            '  File "/usr/src/server/text_generation_server/models/__init__.py", line 1652, in get_model_with_lora_adapters',
            "    model = get_model(",
            '  File "/usr/src/server/text_generation_server/models/flash_causal_lm.py", line 1286, in __init__',
            "    model = model_class(prefix, config, weights)",
            '  File "/usr/src/server/text_generation_server/utils/weights.py", line 226, in get_tensor',
            "    tensor = tensor.to(device=self.device)",
            f"torch.OutOfMemoryError: {message}",
        ]
    )


def _gated_traceback(model: str) -> str:
    return "\n".join(
        [
            "Traceback (most recent call last):",
            '  File "/usr/src/.venv/lib/python3.11/site-packages/huggingface_hub/utils/_http.py", line 409, in hf_raise_for_status',
            "    response.raise_for_status()",
            '  File "/usr/src/.venv/lib/python3.11/site-packages/requests/models.py", line 1024, in raise_for_status',
            "    raise HTTPError(http_error_msg, response=self)",
            f"requests.exceptions.HTTPError: 401 Client Error: Unauthorized for url: https://huggingface.co/api/models/{model}",
            "",
            "The above exception was the direct cause of the following exception:",
            "",
            "Traceback (most recent call last):",
            '  File "/usr/src/.venv/bin/text-generation-server", line 10, in <module>',
            "    sys.exit(app())",
            '  File "/usr/src/server/text_generation_server/cli.py", line 212, in download_weights',
            "    utils.weight_files(model_id, revision, extension)",
            '  File "/usr/src/.venv/lib/python3.11/site-packages/huggingface_hub/utils/_http.py", line 426, in hf_raise_for_status',
            "    raise _format(GatedRepoError, message, response) from e",
            (
                "huggingface_hub.errors.GatedRepoError: 401 Client Error. (Request ID: "
                "Root=1-6765a1b2-0123456789abcdef01234567;0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0)"
            ),
            "",
            f"Cannot access gated repo for url https://huggingface.co/api/models/{model}.",
            (
                f"Access to model {model} is restricted. You must have access to it and be authenticated to "
                "access it. Please log in."
            ),
        ]
    )


def _container_body(
    image: str,
    command: list[str] | None,
    labels: dict[str, str] | None,
    environment: dict[str, str] | list[str] | None,
    ports: dict[Any, Any] | None,
    volumes: dict[str, dict[str, str]] | list[str] | None,
    device_requests: list[dict] | None,
    shm_size: int | None,
) -> dict:
    """A create body shaped like docker-py's ``_create_container_args`` output."""
    body: dict[str, Any] = {}
    host: dict[str, Any] = {"NetworkMode": "default"}
    if ports:
        exposed, bindings = {}, {}
        for cport, hostspec in ports.items():
            key = str(cport) if "/" in str(cport) else f"{cport}/tcp"
            exposed[key] = {}
            ip, hp = ("", hostspec) if not isinstance(hostspec, tuple) else hostspec
            bindings[key] = [{"HostIp": ip, "HostPort": "" if hp is None else str(hp)}]
        body["ExposedPorts"] = exposed
        host["PortBindings"] = bindings
    body.update(
        {
            "Tty": False,
            "OpenStdin": False,
            "StdinOnce": False,
            "AttachStdin": False,
            "AttachStdout": False,
            "AttachStderr": False,
        }
    )
    if environment:
        body["Env"] = (
            [f"{k}={v}" for k, v in environment.items()]
            if isinstance(environment, dict)
            else list(environment)
        )
    if command is not None:
        body["Cmd"] = list(command)
    body["Image"] = image
    if volumes:
        if isinstance(volumes, dict):
            host["Binds"] = [f"{h}:{v['bind']}:{v.get('mode', 'rw')}" for h, v in volumes.items()]
            body["Volumes"] = {v["bind"]: {} for v in volumes.values()}
        else:
            host["Binds"] = list(volumes)
            body["Volumes"] = {v.split(":")[1]: {} for v in volumes}
    body["NetworkDisabled"] = False
    if shm_size is not None:
        host["ShmSize"] = shm_size
    if device_requests is not None:
        host["DeviceRequests"] = device_requests
    body["HostConfig"] = host
    if labels:
        body["Labels"] = dict(labels)
    return body
