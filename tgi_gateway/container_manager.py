"""Launch and manage TGI with the Docker SDK when nothing answers at the gateway's endpoint.

Theory of operation
-------------------
:meth:`ContainerManager.ensure_tgi` runs once at start-up, before the server starts (so its blocking
Docker SDK calls never run on an event loop):

1. The endpoint answers ``/health`` → use it; no Docker call at all.
2. The endpoint is not on this host → nothing to launch: the gateway serves and answers 503 until TGI is up.
3. Otherwise ``docker.from_env()``, then look for a container this gateway manages for the same model and
   port (labels ``tgi-gateway.managed``, ``tgi-gateway.model``, ``tgi-gateway.port``): a running one is
   *adopted* (and left running on exit); a stopped one is removed. Else the image is pulled if missing (live
   progress: a bar on a terminal, a log line every few seconds otherwise) and a container is created the way
   an operator would run TGI: GPUs, 1 GiB shm, container port 80 published on the endpoint's port (bound to
   127.0.0.1 by default), the Hugging Face cache on ``/data`` (or the local model directory read-only on
   ``/model``), ``HF_TOKEN`` passed through (never logged), the launcher options, the LoRA adapters as
   ``LORA_ADAPTERS`` (a ``name=path`` whose path is a directory on this host mounted read-only on
   ``/adapters/<name>``; any other path is TGI's, inside the container, e.g. under ``/data``), our labels.
   A running container is adopted only when its labels name the same model and the same adapters: a
   request for an adapter TGI was not started with would silently get the base model.
4. Wait for ``/health`` until ``--startup-timeout``, following the container's logs (shown at INFO, the last
   lines kept) and checking that it still runs. If it exits, stop waiting at once and report the exit code,
   ``OOMKilled``, the last log lines and a hint.

Every failure raises :class:`LaunchError` (printed by the CLI, exit status 1) and leaves no container this
process created behind. :meth:`ContainerManager.release` (at shutdown) stops and removes the container this
process started, unless ``keep`` was asked; an adopted container is left running.

Signals during the start-up
---------------------------
The start-up is stopped by SIGTERM or SIGINT *cooperatively*. A signal handler runs in the main thread
between any two bytecodes of whatever runs there: inside ``threading.Thread.start()`` (a thread not yet
marked started cannot be joined), inside the docker SDK with a request on the wire (a container created but
not yet known), inside urllib3's pool while it holds its lock (the clean-up's Docker calls would then wait
forever). An exception raised there leaves a state no clean-up can rely on. So the CLI's handler only calls
:meth:`ContainerManager.interrupt`, which notes the signal; the start-up raises :class:`StartupInterrupted`
at its next checkpoint (before each step, at each pull progress event, at each health poll: within about
``poll_interval`` plus one Docker call), where nothing is half done, and the failure path removes the
container. Only a sleep between two health polls is cut short at once. A second signal raises at once
wherever the main thread is (``forced``): the user insists, and the container may be left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, TextIO
from urllib.error import HTTPError
from urllib.parse import urlsplit
from urllib.request import ProxyHandler, build_opener

__all__ = [
    "ContainerManager",
    "LaunchError",
    "LaunchSpec",
    "StartupInterrupted",
    "is_local_endpoint",
]

log = logging.getLogger("tgi_gateway.container")

LABEL_MANAGED, LABEL_MODEL, LABEL_PORT = "tgi-gateway.managed", "tgi-gateway.model", "tgi-gateway.port"
LABEL_ADAPTERS = "tgi-gateway.lora-adapters"  # only on a container started with LoRA adapters
ADAPTERS_DIR = "/adapters"  # where local LoRA adapter directories are mounted in the container
LOG_TAIL = 40  # log lines kept for a failure report


class LaunchError(Exception):
    """TGI could not be started; the message says why and what to do."""


class StartupInterrupted(BaseException):
    """A signal stopped the start-up: at a checkpoint, or at once by a second signal (`forced`).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on its way swallows it."""

    def __init__(self, signum: int, *, forced: bool = False) -> None:
        super().__init__(signum, forced)
        self.signum, self.forced = signum, forced


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """How to run TGI for one model. The fields without a default come from the gateway's settings
    (`tgi_gateway.cli.launch_spec`), which hold their defaults and meanings; None leaves an option to TGI."""

    model: str
    endpoint: str
    image: str
    gpus: str  # "all", a count ("2") or device ids ("0,1")
    publish_host: str
    hf_cache: Path | None  # mounted on /data; None: the user's Hugging Face home
    revision: str | None
    max_input_tokens: int | None
    max_total_tokens: int | None
    num_shard: int | None
    quantize: str | None
    dtype: str | None
    extra_args: tuple[str, ...]
    lora_adapters: tuple[str, ...]  # TGI's LORA_ADAPTERS entries: name[=path][@revision]
    max_top_n_tokens: int | None  # the most top_logprobs a request may ask for
    startup_timeout: float
    keep: bool
    hf_token: str | None = None
    shm_size: str = "1g"

    @property
    def port(self) -> int:
        parts = urlsplit(self.endpoint)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def local_model_dir(self) -> Path | None:
        path = Path(self.model).expanduser()
        return path.resolve() if path.is_dir() else None

    @property
    def name(self) -> str:
        return f"tgi-gateway-{self.port}"

    @property
    def labels(self) -> dict[str, str]:
        labels = {LABEL_MANAGED: "true", LABEL_MODEL: self.model, LABEL_PORT: str(self.port)}
        if self.lora_adapters:
            labels[LABEL_ADAPTERS] = ",".join(self.lora_adapters)
        return labels

    def adapter_mounts(self) -> dict[str, tuple[Path, str]]:
        """The ``name=path`` adapters whose path is a directory on this host: name → (the directory, its
        mount point in the container, ``/adapters/<name>``); a directory given twice is mounted once."""
        mounts: dict[str, tuple[Path, str]] = {}
        points: dict[Path, str] = {}
        for entry in self.lora_adapters:
            name, path, _ = _split_adapter(entry)
            if path is not None and (found := Path(path).expanduser()).is_dir():
                directory = found.resolve()
                mounts[name] = (directory, points.setdefault(directory, f"{ADAPTERS_DIR}/{name}"))
        return mounts

    def lora_adapters_env(self) -> str:
        """``LORA_ADAPTERS`` for the container: the entries, a local directory replaced by its mount point."""
        mounts = self.adapter_mounts()
        entries = []
        for entry in self.lora_adapters:
            name, _, revision = _split_adapter(entry)
            if name in mounts:
                entry = f"{name}={mounts[name][1]}" + (f"@{revision}" if revision else "")
            entries.append(entry)
        return ",".join(entries)

    def command(self) -> list[str]:
        """The launcher arguments (the image's entrypoint is text-generation-launcher)."""
        args = ["--model-id", "/model" if self.local_model_dir else self.model]
        for flag, value in (
            ("--revision", None if self.local_model_dir else self.revision),
            ("--max-input-tokens", self.max_input_tokens),
            ("--max-total-tokens", self.max_total_tokens),
            ("--num-shard", self.num_shard),
            ("--quantize", self.quantize),
            ("--dtype", self.dtype),
            ("--max-top-n-tokens", self.max_top_n_tokens),
        ):
            if value is not None:
                args += [flag, str(value)]
        return args + list(self.extra_args)

    def device_requests(self) -> list[Any]:
        import docker.types

        gpus = self.gpus.strip().lower()
        if gpus == "all":
            return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if gpus.isdigit():
            return [docker.types.DeviceRequest(count=int(gpus), capabilities=[["gpu"]])]
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        return [docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]

    def volumes(self) -> dict[str, dict[str, str]]:
        cache = self.hf_cache or _default_hf_home()
        volumes = {str(cache): {"bind": "/data", "mode": "rw"}}
        if self.local_model_dir:
            volumes[str(self.local_model_dir)] = {"bind": "/model", "mode": "ro"}
        for directory, point in self.adapter_mounts().values():
            volumes[str(directory)] = {"bind": point, "mode": "ro"}
        return volumes

    def environment(self) -> dict[str, str]:
        env = {"HF_TOKEN": self.hf_token} if self.hf_token else {}
        if self.lora_adapters:
            env["LORA_ADAPTERS"] = self.lora_adapters_env()  # the launcher's --lora-adapters
        return env


def _split_adapter(entry: str) -> tuple[str, str | None, str | None]:
    """A ``LORA_ADAPTERS`` entry (checked by the settings) as TGI reads it: name, path, revision."""
    head, _, revision = entry.partition("@")
    name, _, path = head.partition("=")
    return name, path or None, revision or None


def _default_hf_home() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME)


def is_local_endpoint(endpoint: str) -> bool:
    host = (urlsplit(endpoint).hostname or "").lower()
    return host in ("localhost", "127.0.0.1", "::1", "0.0.0.0") or host.startswith("127.")


_NO_PROXY = build_opener(ProxyHandler({}))  # proxies from the environment are not used


def tgi_healthy(endpoint: str, timeout: float = 2.0) -> bool:
    """``GET <endpoint>/health`` answers 200 within ``timeout`` seconds."""
    try:
        with _NO_PROXY.open(endpoint.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except HTTPError as error:  # a 4xx/5xx answer
        error.close()
        return False
    except (OSError, ValueError, HTTPException):  # unreachable, timed out, not an http URL, not HTTP
        return False


@dataclass
class ContainerManager:
    """Start (or adopt) the TGI container for `spec`; :meth:`release` at shutdown."""

    spec: LaunchSpec
    docker_client: Callable[[], Any] | None = None  # default docker.from_env; the test seam
    out: TextIO = field(default_factory=lambda: sys.stderr)
    poll_interval: float = 1.0
    container: Any = None
    started_here: bool = False
    _client: Any = None
    _tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL))
    _follower: threading.Thread | None = None
    _log_stream: Any = None
    _log_client: Any = None  # the log stream's own client (see _follow_logs)
    interrupted: int | None = None  # the signal that asked the start-up to stop (module docstring)
    _sleeping: bool = False  # between two health polls: the only place a first signal raises at once

    # -- the whole start-up ------------------------------------------------------------------

    def ensure_tgi(self) -> str:
        """Make TGI answer at the endpoint; returns how: "existing", "remote", "adopted" or "started"."""
        spec = self.spec
        self.checkpoint()
        if tgi_healthy(spec.endpoint):
            log.info("TGI answers at %s: using it", spec.endpoint)
            return "existing"
        if not is_local_endpoint(spec.endpoint):
            log.warning("TGI does not answer at %s (not on this host: nothing to launch); requests get 503 until it does",
                        spec.endpoint)  # fmt: skip
            return "remote"
        self._client = self._connect()
        try:
            self.checkpoint()
            outcome = self._adopt() or self._start()
            self._wait_healthy()
            self.checkpoint()
            return outcome
        except BaseException:
            self._cleanup_after_failure()
            raise

    def interrupt(self, signum: int) -> None:
        """Ask the start-up to stop; for the CLI's SIGTERM/SIGINT handler. The signal is noted, and the
        start-up raises :class:`StartupInterrupted` at its next checkpoint, or here if it sleeps between two
        health polls. A second signal raises here at once (``forced``), wherever the main thread is."""
        if self.interrupted is not None:
            raise StartupInterrupted(signum, forced=True)
        self.interrupted = signum
        if self._sleeping:
            raise StartupInterrupted(signum)

    def checkpoint(self) -> None:
        """Raise :class:`StartupInterrupted` if a signal asked the start-up to stop."""
        if self.interrupted is not None:
            raise StartupInterrupted(self.interrupted)

    def release(self) -> None:
        """At shutdown: stop and remove the container this process started (unless `keep`)."""
        self._stop_following()
        if self.container is None or not self.started_here:
            return
        if self.spec.keep:
            log.info("leaving TGI container %s running (--keep-tgi)", self.spec.name)
            return
        log.info("stopping TGI container %s", self.spec.name)
        self._remove(self.container, stop=True)
        self.container = None

    # -- steps -------------------------------------------------------------------------------

    def _connect(self) -> Any:
        import docker
        import docker.errors

        factory = self.docker_client or docker.from_env
        try:
            client = factory()
            client.ping()
            return client
        except docker.errors.DockerException as exc:
            host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
            raise LaunchError(
                f"TGI does not answer at {self.spec.endpoint}, and no Docker engine answers at {host} to start it "
                f"({_short(exc)}). Start Docker (e.g. `sudo systemctl start docker`), or pass --endpoint with "
                "the URL of a running TGI."
            ) from None

    def _adopt(self) -> str | None:
        spec = self.spec
        found = self._client.containers.list(
            all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_PORT}={spec.port}"]}
        )
        adapters = spec.labels.get(LABEL_ADAPTERS, "")
        for container in found:
            model = container.labels.get(LABEL_MODEL)
            if container.status == "running" and model == spec.model:
                if container.labels.get(LABEL_ADAPTERS, "") != adapters:
                    raise LaunchError(
                        f"Port {spec.port} belongs to TGI container {container.name}, which serves {model!r} with "
                        f"the LoRA adapters {container.labels.get(LABEL_ADAPTERS) or 'none'!r}, not "
                        f"{adapters or 'none'!r}. Stop it (`docker rm -f {container.name}`) or use another "
                        "--endpoint port."
                    )
                log.info("adopting running TGI container %s (%s)", container.name, model)
                self.container = container
                self._follow_logs()
                return "adopted"
            if container.status == "running":
                raise LaunchError(
                    f"Port {spec.port} belongs to TGI container {container.name}, which serves {model!r}, not "
                    f"{spec.model!r}. Stop it (`docker rm -f {container.name}`) or use another --endpoint port."
                )
            log.info("removing stopped TGI container %s left by an earlier run", container.name)
            self._remove(container, stop=False)
        return None

    def _start(self) -> str:
        import docker.errors

        spec = self.spec
        self._ensure_image()
        self.checkpoint()
        log.info("starting TGI %s for %s on 127.0.0.1:%d (GPUs: %s)", spec.image, spec.model, spec.port, spec.gpus)
        if spec.lora_adapters:
            log.info("LoRA adapters: %s", spec.lora_adapters_env())
        try:
            self.container = self._client.containers.create(
                spec.image,
                command=spec.command(),
                name=spec.name,
                detach=True,
                environment=spec.environment(),
                labels=spec.labels,
                device_requests=spec.device_requests(),
                shm_size=spec.shm_size,
                ports={"80/tcp": (spec.publish_host, spec.port)},
                volumes=spec.volumes(),
            )
            self.started_here = True
            self.container.start()
        except docker.errors.APIError as exc:
            raise LaunchError(_start_error(exc, spec)) from None
        self._follow_logs()
        return "started"

    def _ensure_image(self) -> None:
        import docker.errors

        try:
            self._client.images.get(self.spec.image)
            return
        except docker.errors.ImageNotFound:
            pass
        repo, tag = _split_image(self.spec.image)
        log.info("pulling %s", self.spec.image)
        progress = PullProgress(self.out)
        try:
            for event in self._client.api.pull(repo, tag=tag, stream=True, decode=True):
                self.checkpoint()
                if "error" in event or "errorDetail" in event:
                    message = (event.get("errorDetail") or {}).get("message") or event.get("error")
                    raise LaunchError(f"Pulling {self.spec.image} failed: {message}")
                progress.update(event)
        except docker.errors.APIError as exc:
            raise LaunchError(f"Pulling {self.spec.image} failed: {_short(exc)}") from None
        finally:
            progress.close()
        log.info("pulled %s", self.spec.image)

    def _wait_healthy(self) -> None:
        spec = self.spec
        deadline = time.monotonic() + spec.startup_timeout
        log.info("waiting for TGI to load %s (up to %g s; progress below)", spec.model, spec.startup_timeout)
        while True:
            self.checkpoint()
            self.container.reload()
            state = self.container.attrs.get("State", {})
            if state.get("Status") not in ("created", "running", "restarting"):
                raise LaunchError(self._exit_report(state))
            if tgi_healthy(spec.endpoint, timeout=min(2.0, self.poll_interval * 2)):
                log.info("TGI is ready at %s", spec.endpoint)
                return
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"TGI did not become healthy within {spec.startup_timeout:g} s (--startup-timeout). "
                    f"Last log lines:\n{self._tail_text()}"
                )
            self._sleep(self.poll_interval)

    def _sleep(self, seconds: float) -> None:
        """A sleep a signal cuts short: :meth:`interrupt` raises at once while `_sleeping` is set."""
        self._sleeping = True
        try:
            self.checkpoint()  # a signal noted just before `_sleeping` was set
            time.sleep(seconds)
        finally:
            self._sleeping = False

    # -- logs --------------------------------------------------------------------------------

    def _follow_logs(self) -> None:
        # The stream has a client of its own. It is closed from this thread while the follower thread reads
        # it, and urllib3 may then put its connection back into the client's pool with its socket already
        # closed (fd -1): the next call from that pool fails ("file descriptor cannot be a negative integer").
        # The calls that stop and remove the container must not share that pool; this one ends with it.
        import docker

        try:
            self._log_client = (self.docker_client or docker.from_env)()
            self._log_stream = stream = self._log_client.api.logs(self.container.id, stream=True, follow=True)
        except Exception as exc:  # noqa: BLE001 - logs are a help, not a requirement
            log.warning("cannot follow the TGI container's logs: %s", _short(exc))
            return
        self._follower = threading.Thread(
            target=self._pump_logs, args=(stream,), name="tgi-logs", daemon=True
        )
        self._follower.start()

    def _pump_logs(self, stream: Any) -> None:
        buffer = b""
        # The stream ends, with whatever exception, when the container exits or the stream is closed.
        with contextlib.suppress(Exception):
            for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    self._log_line(raw)
        if buffer:
            self._log_line(buffer)

    def _log_line(self, raw: bytes) -> None:
        line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
        if line:
            self._tail.append(line)
            log.info("tgi | %s", line)

    def _stop_following(self) -> None:
        stream, self._log_stream = self._log_stream, None
        if stream is not None:
            # docker-py's CancellableStream.close() leaves the response's socket open: close both, come what may
            for close in (stream.close, getattr(getattr(stream, "_response", None), "close", None)):
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()
        follower, self._follower = self._follower, None
        _join(follower)
        client, self._log_client = self._log_client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _tail_text(self) -> str:
        time.sleep(0.2)  # let the log follower catch the last lines
        return "\n".join(f"    {line}" for line in self._tail) or "    (no output)"

    # -- failure -----------------------------------------------------------------------------

    def _exit_report(self, state: dict[str, Any]) -> str:
        self._stop_following_after_exit()
        code, oom = state.get("ExitCode"), state.get("OOMKilled")
        tail = self._tail_text()
        return (
            f"TGI exited while loading {self.spec.model} (exit code {code}, OOMKilled {str(bool(oom)).lower()}). "
            f"Last log lines:\n{tail}\nHint: {_hint(tail, code, bool(oom), self.spec)}"
        )

    def _stop_following_after_exit(self) -> None:
        _join(self._follower)  # the stream ends by itself when the container has exited

    def _cleanup_after_failure(self) -> None:
        try:
            self._stop_following()
        finally:  # the container goes whatever happened to the log follower
            if self.container is not None and self.started_here:
                self._remove(self.container, stop=True)
            self.container = None

    def _remove(self, container: Any, *, stop: bool) -> None:
        try:
            if stop:
                container.stop(timeout=30)
            container.remove(force=True)
        except Exception as exc:  # noqa: BLE001 - report, never mask the original failure
            log.warning("could not remove TGI container %s: %s", getattr(container, "name", "?"), _short(exc))


def _join(follower: threading.Thread | None) -> None:
    """Wait (2 s at most) for the log follower to end, its stream closed or finished. A follower whose
    ``start()`` a second signal cut short before it was marked started cannot be joined (RuntimeError) and
    needs no join: a daemon thread, it ends with its stream."""
    if follower is not None and follower.is_alive():
        follower.join(2)


class PullProgress:
    """Pull progress across layers: a bar on a terminal, a log line every `every` seconds otherwise."""

    def __init__(self, out: TextIO, every: float = 5.0) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.every = every
        self.layers: dict[str, tuple[int, int]] = {}  # id -> (done, total) of its download
        self.last = 0.0
        self.drawn = False

    def update(self, event: dict[str, Any]) -> None:
        layer, status, detail = event.get("id"), event.get("status", ""), event.get("progressDetail") or {}
        if not layer:
            return
        if status == "Downloading" and detail.get("total"):
            self.layers[layer] = (int(detail.get("current", 0)), int(detail["total"]))
        elif status in ("Download complete", "Pull complete", "Already exists") and layer in self.layers:
            total = self.layers[layer][1]
            self.layers[layer] = (total, total)
        self._show()

    @property
    def totals(self) -> tuple[int, int]:
        return sum(d for d, _ in self.layers.values()), sum(t for _, t in self.layers.values())

    def _show(self) -> None:
        done, total = self.totals
        if not total:
            return
        now = time.monotonic()
        if self.tty:
            width = 30
            filled = int(width * done / total)
            self.out.write(f"\rpulling TGI image [{'#' * filled}{'.' * (width - filled)}] {_mb(done)}/{_mb(total)}")
            self.out.flush()
            self.drawn = True
        elif now - self.last >= self.every:
            self.last = now
            log.info("pulling TGI image: %s of %s (%d layers)", _mb(done), _mb(total), len(self.layers))

    def close(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _split_image(image: str) -> tuple[str, str]:
    """`repo[:tag]` (a registry port is not a tag)."""
    repo, _, tag = image.rpartition(":")
    if not repo or "/" in tag:
        return image, "latest"
    return repo, tag


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _short(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    text = str(explanation or exc)
    return text if len(text) < 400 else text[:400] + "…"


def _start_error(exc: Any, spec: LaunchSpec) -> str:
    text = _short(exc)
    if "could not select device driver" in text:
        return (
            f"Docker cannot give the TGI container a GPU ({text}). Install the NVIDIA Container Toolkit and "
            "restart Docker (https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/), check "
            "`docker run --rm --gpus all ubuntu nvidia-smi`, or pass --endpoint of a TGI running elsewhere."
        )
    if "port is already allocated" in text or "address already in use" in text:
        return (
            f"Port {spec.port} on this host is already in use ({text}). Stop what uses it, or pass an --endpoint "
            "with a free port (the TGI container publishes its port 80 there)."
        )
    return f"Docker could not start the TGI container: {text}"


def _hint(tail: str, code: Any, oom: bool, spec: LaunchSpec) -> str:
    low = tail.lower()
    if oom or code == 137:
        return "the container ran out of host memory (OOM-killed): free memory, or give Docker more."
    if "out of memory" in low or "cuda error: out of memory" in low or "not enough memory" in low:
        return (
            "the GPU ran out of memory: lower --max-total-tokens / --max-input-tokens, use --quantize "
            "(e.g. awq, gptq, bitsandbytes-nf4), or more GPUs with --num-shard."
        )
    if "gated" in low or "401" in low or "403" in low or "access to model" in low or "restricted" in low:
        return (
            f"{spec.model} is gated or private: accept its licence on the Hugging Face page and set HF_TOKEN "
            "in the gateway's environment (it is passed to the container)."
        )
    if "repository not found" in low or "404" in low:
        return f"check the model id {spec.model!r} (and --revision)."
    return "see the log lines above; `docker logs` is gone with the container, so they are all there is."

