"""`python3 server_tgi.py --model <hub id or dir> [--endpoint URL] ...`: build Settings, detect the template, serve.

Flags win over ``TGI_GATEWAY_*`` environment variables (see :mod:`tgi_gateway.settings`). Start-up
problems (a bad flag, a model that is not a Functionary model, unreadable tokenizer files) are printed as
one clear line and exit with status 2; nothing is served.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from .errors import ConfigurationError
from .prompting.types import Version

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
    p.add_argument("--read-timeout", type=float, help="seconds to wait between two TGI stream events (default 60)")
    p.add_argument("--connect-retries", type=int, help="connection attempts to TGI before answering 503 (default 3)")
    p.add_argument("--log-level", help="critical, error, warning, info (default) or debug")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .settings import Settings

        settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(map(str, err["loc"])) or "settings"
            flag = "--" + field.replace("_", "-")
            hint = " (pass --model or set TGI_GATEWAY_MODEL)" if err["type"] == "missing" else ""
            print(f"error: {flag}: {err['msg']}{hint}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
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

    import uvicorn

    from .app import create_app

    uvicorn.run(
        create_app(settings, template),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        http="httptools",
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        timeout_graceful_shutdown=30,
    )
    return 0
