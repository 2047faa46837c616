"""`python3 server_tgi.py --model <hub id or dir> [--endpoint URL] ...`: build Settings, detect the template, serve.

Flags win over ``TGI_GATEWAY_*`` environment variables (see :mod:`tgi_gateway.settings`). Start-up
problems (a bad flag, a model that is not a Functionary model, unreadable tokenizer files) are printed as
one clear line and exit with status 2; nothing is served.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from .container_manager import DEFAULT_IMAGE, ContainerManager, LaunchError, LaunchSpec, StartupInterrupted
from .errors import ConfigurationError
from .prompting.types import Version
from .server.telemetry import configure_logging, shared_metrics_dir
from .settings import Settings

if TYPE_CHECKING:
    from .prompting import Template

log = logging.getLogger("tgi_gateway")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="server_tgi.py",
        description="OpenAI-compatible gateway for MeetKai Functionary models served by Hugging Face TGI.",
    )
    p.add_argument("--model", help="hub id or local directory of the Functionary model (its tokenizer files)")
    p.add_argument("--served-model-name", help="the model name clients send and /v1/models lists (default: --model)")
    p.add_argument("--endpoint", help="base URL of TGI (default http://127.0.0.1:8080)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p.add_argument(
        "--template-version",
        choices=[v.value for v in Version],
        help="use this Functionary template version instead of detecting it",
    )
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of the model's tokenizer files")
    p.add_argument("--connect-timeout", type=float, help="seconds to connect to TGI (default 2)")
    p.add_argument(
        "--first-token-timeout", type=float, help="seconds TGI may take to send the first token (default 120)"
    )
    p.add_argument("--read-timeout", type=float, help="seconds to wait between two TGI stream events (default 60)")
    p.add_argument(
        "--request-timeout", type=float,
        help="seconds a non-stream request may wait for TGI's whole answer, queueing included (default 600)",
    )  # fmt: skip
    p.add_argument("--connect-retries", type=int, help="connection attempts to TGI before answering 503 (default 3)")
    p.add_argument("--log-level", help="critical, error, warning, info (default) or debug")
    p.add_argument("--log-format", choices=["text", "json"], help="text (default) or json: one object a line")
    p.add_argument("--shutdown-grace", type=float, help="seconds in-flight requests get to finish at shutdown (30)")
    p.add_argument("--drain-seconds", type=float,
                   help="on SIGTERM, seconds /health answers 503 while requests are still served (default 0)")
    p.add_argument("--workers", type=int, help="server processes, one CPU core each (default 1)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body, 413 above (default 4 MiB)")

    a = p.add_argument_group("access control (see docs/operations.md)")
    a.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY",
                   help="a key clients must send as 'Authorization: Bearer KEY' (repeatable; shows in ps: "
                        "prefer --api-key-file or TGI_GATEWAY_API_KEYS); no key: the gateway is open")
    a.add_argument("--api-key-file", metavar="PATH", help="file of keys, one per line (# comments, blank lines)")
    a.add_argument("--max-concurrent-per-key", type=int, metavar="N",
                   help="requests in flight per key and worker process; over it: 429 (default unlimited)")
    a.add_argument("--protect-health", action="store_true", default=None,
                   help="require a key on /health and /metrics too (open by default)")

    d = p.add_argument_group("launching TGI with Docker (when nothing answers at a local --endpoint)")
    d.add_argument("--no-launch", dest="launch", action="store_false", default=None,
                   help="never start TGI; answer 503 until the endpoint is up")
    d.add_argument("--tgi-image", help=f"TGI image (default {DEFAULT_IMAGE})")
    d.add_argument("--gpus", help="all (default), a count, or device ids such as 0,1")
    d.add_argument("--tgi-publish-host", help="host address TGI's port is published on (default 127.0.0.1)")
    d.add_argument("--hf-cache", help="host directory mounted on /data for downloads (default: your HF home)")
    d.add_argument("--max-input-tokens", type=int, help="TGI --max-input-tokens")
    d.add_argument("--max-total-tokens", type=int, help="TGI --max-total-tokens")
    d.add_argument("--num-shard", type=int, help="TGI --num-shard (GPUs to shard the model over)")
    d.add_argument("--quantize", help="TGI --quantize (awq, gptq, bitsandbytes-nf4, fp8, ...)")
    d.add_argument("--dtype", help="TGI --dtype (float16, bfloat16)")
    d.add_argument("--tgi-arg", dest="tgi_args", action="append", metavar="ARG",
                   help="extra text-generation-launcher argument (repeatable), e.g. --tgi-arg=--max-batch-prefill-tokens=4096")
    d.add_argument("--startup-timeout", type=float, help="seconds TGI may take to load (default 1800)")
    d.add_argument("--keep-tgi", action="store_true", default=None,
                   help="leave the TGI container this gateway started running at exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        for line in settings_errors(exc, given, parser):
            print(line, file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        from .prompting import Template, detect_version, load_model_files

        if settings.template_version is not None:  # no need to read the model's files at all
            template = Template(settings.template_version)
        else:
            files = load_model_files(
                settings.model, revision=settings.revision, token=os.environ.get("HF_TOKEN") or None
            )
            template = Template(detect_version(files))
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("%s uses Functionary template %s", settings.model, template.version)

    manager = None
    try:
        if settings.launch:
            manager = ContainerManager(launch_spec(settings))
            status = _start_tgi(manager)
            if status is not None:
                return status
        return _serve(settings, template)
    except StartupInterrupted:  # a second signal while the first one's outcome was being reported
        return 130
    finally:
        if manager is not None:
            manager.release()


def _start_tgi(manager: ContainerManager) -> int | None:
    """Run the container manager's start-up; the exit status if the gateway must not serve.

    A SIGTERM or SIGINT meanwhile is handed to the manager, which stops at its next checkpoint and removes
    what it created (container_manager.py, "Signals during the start-up"); an exception raised at whatever
    line the signal lands on would leave a state no clean-up can rely on. When the start-up is over, the
    handlers become `_exit_cleanly` at once: a signal from then on exits through `main`'s `finally`, which
    releases the container (with the default SIGTERM handler the process would die there, leaving it behind).
    """

    def interrupt(signum: int, frame: object) -> None:
        manager.interrupt(signum)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        manager.ensure_tgi()
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StartupInterrupted as exc:
        if exc.forced:
            name = manager.spec.name
            print(f"stopped at once by a second signal: if a TGI container {name} is left, remove it with "
                  f"`docker rm -f {name}`", file=sys.stderr)  # fmt: skip
        else:
            removed = "; its container was removed" if manager.started_here else ""
            print(f"interrupted while starting TGI{removed}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, _exit_cleanly)
        signal.signal(signal.SIGINT, _exit_cleanly)
    if manager.interrupted is not None:  # noted after the start-up's last checkpoint: `main` releases
        print("interrupted while starting TGI", file=sys.stderr)
        return 130
    return None


def _serve(settings: Settings, template: Template) -> int:
    import uvicorn

    from .server.app import create_app
    from .server.process import tune_gc

    # uvicorn handles SIGINT/SIGTERM itself: it stops accepting, lets in-flight requests finish within the
    # grace period, runs the app's shutdown, then restores the handlers it found and raises the signal
    # again. These handlers turn that last signal into a clean exit through `main`'s `finally` (with the
    # default SIGTERM handler the process would die there, leaving the TGI container behind). With
    # --drain-seconds the app holds the signal back for that long first (tgi_gateway/server/draining.py).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    server = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,  # tgi_gateway.access logs every request (tgi_gateway/server/telemetry.py)
        "http": "httptools",
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
        "timeout_graceful_shutdown": settings.shutdown_grace,
    }
    if settings.log_format == "json":  # uvicorn's own lines go through the root handler: JSON too
        server["log_config"] = None
    if settings.workers > 1:
        # Each worker process imports the app factory and rebuilds the same settings from the
        # environment (the template version detected here included); they share the listening socket.
        env = settings.model_copy(update={"template_version": template.version}).as_environment()
        os.environ.update(env)
        with shared_metrics_dir():  # /metrics answers for all workers, whichever one is scraped
            factory = "tgi_gateway.server.process:app_from_environment"
            uvicorn.run(factory, factory=True, workers=settings.workers, **server)
    else:
        app = create_app(settings, template)
        tune_gc()
        uvicorn.run(app, **server)
    return 0


def settings_errors(
    exc: ValidationError, given: dict[str, object], parser: argparse.ArgumentParser
) -> list[str]:
    """One line per error of `Settings(**given)`, naming where the refused value came from: the flag as the
    user typed it (``--api-key`` for the field ``api_keys``) when a flag set the field, else its
    ``TGI_GATEWAY_*`` variable (flags win over the environment, so the value came from there)."""
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    lines = []
    for err in exc.errors():
        field, *rest = [str(part) for part in err["loc"]] or ["settings"]
        if err["type"] == "missing" or field in given:
            source = flags.get(field, "--" + field.replace("_", "-"))
        elif field in Settings.model_fields:
            source = f"TGI_GATEWAY_{field.upper()}"
        else:
            source = field
        source += "".join(f"[{part}]" for part in rest)
        # our validators' own message, without pydantic's "Value error, " prefix
        message = str(err["ctx"]["error"]) if err["type"] == "value_error" and "ctx" in err else err["msg"]
        hint = f" (pass {source} or set TGI_GATEWAY_{field.upper()})" if err["type"] == "missing" else ""
        lines.append(f"error: {source}: {message}{hint}")
    return lines


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def launch_spec(settings: Settings) -> LaunchSpec:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    return LaunchSpec(
        model=settings.model,
        endpoint=settings.endpoint,
        image=settings.tgi_image,
        gpus=settings.gpus,
        publish_host=settings.tgi_publish_host,
        hf_cache=Path(settings.hf_cache).expanduser() if settings.hf_cache else None,
        hf_token=token,
        revision=settings.revision,
        max_input_tokens=settings.max_input_tokens,
        max_total_tokens=settings.max_total_tokens,
        num_shard=settings.num_shard,
        quantize=settings.quantize,
        dtype=settings.dtype,
        extra_args=tuple(settings.tgi_args),
        startup_timeout=settings.startup_timeout,
        keep=settings.keep_tgi,
    )
