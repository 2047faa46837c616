"""`python3 server_tgi.py --model <hub id or dir> [--endpoint URL] ...`: settings, the template, serve.

The flags are derived from the :class:`Settings` fields (:func:`build_parser`) and win over the
``TGI_GATEWAY_*`` environment variables (see :mod:`tgi_gateway.settings`). Start-up
problems (a bad flag, a model that is not a Functionary model, unreadable tokenizer files) are printed as
one clear line and exit with status 2; nothing is served.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from enum import Enum
from functools import partial
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from .container_manager import ContainerManager, LaunchError, LaunchSpec, StartupInterrupted
from .errors import ConfigurationError
from .server.telemetry import configure_logging, shared_metrics_dir
from .settings import ENV_PREFIX, TGI_MAX_TOP_N_TOKENS, Flag, Settings

if TYPE_CHECKING:
    from .prompting import Template

log = logging.getLogger("tgi_gateway")


def build_parser() -> argparse.ArgumentParser:
    """The command line, derived from the :class:`Settings` fields: one flag per field (none for an
    environment-only one), named by its :class:`Flag` or after the field, the description as help with the
    field's own default, choices from an enum or `Literal` type, ints and floats converted. Every flag
    defaults to None, so a flag the user did not type leaves the field to its environment variable, then to
    its default; the fields' checks stay with `Settings`."""
    p = argparse.ArgumentParser(
        prog="server_tgi.py",
        description="OpenAI-compatible gateway for MeetKai Functionary models served by Hugging Face TGI.",
        epilog=_environment_help(),
    )
    groups: dict[str | None, Any] = {None: p}  # the parser, then its argument groups in field order
    for name, field in Settings.model_fields.items():
        flag = flag_of(field)
        if flag.action is None:
            continue
        if flag.group not in groups:
            groups[flag.group] = p.add_argument_group(flag.group)
        shown = default_text(field)
        help_text = f"{field.description} ({'required' if shown is None else f'default: {shown}'})"
        option: dict[str, Any] = {"dest": name, "action": flag.action, "default": None}
        if flag.metavar:
            option["metavar"] = flag.metavar
        if flag.action in ("store", "append"):
            value_type = _value_type(field.annotation)
            if isinstance(value_type, type) and issubclass(value_type, Enum):
                option["choices"] = [member.value for member in value_type]
            elif get_origin(value_type) is Literal:
                option["choices"] = list(get_args(value_type))
            elif value_type in (int, float):
                option["type"] = value_type
        groups[flag.group].add_argument(flag_name(name, field), help=help_text.replace("%", "%%"), **option)
    return p


def flag_of(field: FieldInfo) -> Flag:
    """The field's :class:`Flag` (the default one if it has none)."""
    return next((item for item in field.metadata if isinstance(item, Flag)), _PLAIN)


_PLAIN = Flag()


def flag_name(name: str, field: FieldInfo) -> str:
    """The flag of the field `name`: its :class:`Flag`'s name, else ``--`` and the name with dashes."""
    return flag_of(field).name or "--" + name.replace("_", "-")


def default_text(field: FieldInfo) -> str | None:
    """The field's default as the help and the documentation show it: None for a required field, ``off``
    for a switch, the :class:`Flag`'s `unset` text for None or an empty list, else the value (``2`` for
    ``2.0``)."""
    if field.is_required():
        return None
    flag, value = flag_of(field), field.default
    if flag.action in ("store_true", "store_false"):
        return "off"
    if value is None or value == ():
        return flag.unset
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _value_type(annotation: Any) -> Any:
    """`X` for ``X``, ``X | None`` and ``tuple[X, ...]``."""
    if get_origin(annotation) in (Union, UnionType):
        (annotation,) = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) is tuple:
        annotation = get_args(annotation)[0]
    return annotation


def _environment_help() -> str:
    """The help's closing paragraph: how the environment variables are named, from the settings."""
    fields = Settings.model_fields.items()
    renamed = [f"{ENV_PREFIX}{name.upper()} for {flag_of(f).name}" for name, f in fields if flag_of(f).name]
    only = [f"{ENV_PREFIX}{name.upper()}, {f.description}" for name, f in fields if flag_of(f).action is None]
    return (
        f"Every setting can also come from its environment variable: {ENV_PREFIX} and the flag's name in "
        f"upper case, with _ for - ({ENV_PREFIX}ENDPOINT for --endpoint), but {', '.join(renamed)}. Flags "
        f"win. Only in the environment: {'; '.join(only)}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        for line in settings_errors(exc, given):
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
    try:  # before TGI is launched: a store that cannot be used stops the gateway at once
        asyncio.run(_check_store(settings))
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    manager = None
    try:
        if settings.launch and len(settings.endpoint) == 1:  # several replicas are the operator's
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


async def _check_store(settings: Settings) -> None:
    """Open the response store once: its schema is created or migrated here, before any worker starts, and a
    store that cannot be opened (unreachable, unwritable, a newer schema) is reported as one line."""
    from .store import open_store

    store = await open_store(settings.store_url, ttl_seconds=settings.store_ttl)
    await store.close()


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
    from .server.descriptors import default_max_connections, raise_descriptor_limit
    from .server.http_protocol import ConnectionLimits, GatewayHTTPProtocol
    from .server.process import tune_gc, tune_malloc

    # uvicorn handles SIGINT/SIGTERM itself: it stops accepting, lets in-flight requests finish within the
    # grace period, runs the app's shutdown, then restores the handlers it found and raises the signal
    # again. These handlers turn that last signal into a clean exit through `main`'s `finally` (with the
    # default SIGTERM handler the process would die there, leaving the TGI container behind). With
    # --drain-seconds the app holds the signal back for that long first (tgi_gateway/server/draining.py).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    if made := tune_malloc():  # before the admission thread and the resolver's threads exist
        log.debug("glibc malloc: %s", ", ".join(made))
    # Each worker inherits the raised limit; the connection cap follows from it unless configured.
    descriptors = raise_descriptor_limit()
    limits = ConnectionLimits(
        max_head_bytes=settings.max_head_bytes,
        max_headers=settings.max_headers,
        head_timeout=settings.head_timeout,
        body_timeout=settings.body_timeout,
        max_connections=settings.max_connections or default_max_connections(descriptors),
    )
    log.info("connections: at most %d per worker process", limits.max_connections)
    server = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,  # tgi_gateway.access logs every request (tgi_gateway/server/telemetry.py)
        "http": partial(GatewayHTTPProtocol, limits=limits),  # httptools, with the limits kept
        "timeout_keep_alive": settings.keep_alive_timeout,
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


def settings_errors(exc: ValidationError, given: dict[str, object]) -> list[str]:
    """One line per error of `Settings(**given)`, naming where the refused value came from: the field's flag
    (``--api-key`` for ``api_keys``) when a flag set it, else its ``TGI_GATEWAY_*`` variable (flags win
    over the environment, so the value came from there)."""
    lines = []
    for err in exc.errors():
        field, *rest = [str(part) for part in err["loc"]] or ["settings"]
        variable = ENV_PREFIX + field.upper()
        if field not in Settings.model_fields:
            source = field
        elif err["type"] == "missing" or field in given:
            source = flag_name(field, Settings.model_fields[field])
        else:
            source = variable
        source += "".join(f"[{part}]" for part in rest)
        # our validators' own message, without pydantic's "Value error, " prefix
        message = str(err["ctx"]["error"]) if err["type"] == "value_error" and "ctx" in err else err["msg"]
        hint = f" (pass {source} or set {variable})" if err["type"] == "missing" else ""
        lines.append(f"error: {source}: {message}{hint}")
    return lines


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def launch_spec(settings: Settings) -> LaunchSpec:
    """How the container manager runs TGI: every launch setting, and the Hugging Face token from the
    environment (``HF_TOKEN``, else ``HUGGING_FACE_HUB_TOKEN``)."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    return LaunchSpec(
        model=settings.model,
        endpoint=settings.endpoint[0],
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
        lora_adapters=tuple(settings.lora_adapters),
        # the gateway refuses a top_logprobs above its own --max-top-n-tokens; TGI's default (5) needs no flag
        max_top_n_tokens=None if settings.max_top_n_tokens == TGI_MAX_TOP_N_TOKENS else settings.max_top_n_tokens,
        startup_timeout=settings.startup_timeout,
        keep=settings.keep_tgi,
    )
