"""The gateway's one configuration object, built at the edge (CLI flags over environment) and passed in.

Environment variables are the field names upper-cased with the prefix ``TGI_GATEWAY_`` (e.g.
``TGI_GATEWAY_ENDPOINT``); command-line flags win over them. Bad values are refused at start-up.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, SerializationInfo, field_serializer, field_validator
from pydantic import SerializerFunctionWrapHandler as Serialize
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .container_manager import DEFAULT_IMAGE
from .prompting.types import Version


class Settings(BaseSettings):
    # hide_input_in_errors: a validation error must not print the value it refused (it may hold API keys).
    model_config = SettingsConfigDict(
        env_prefix="TGI_GATEWAY_", extra="forbid", frozen=True, hide_input_in_errors=True
    )

    model: str = Field(description="Hub id or local directory of the Functionary model (its tokenizer files).")
    served_model_name: str | None = Field(None, description="Model name clients use; default: `model`.")
    endpoint: str = Field("http://127.0.0.1:8080", description="Base URL of TGI.")
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    template_version: Version | None = Field(None, description="Override the detected template version.")
    revision: str | None = Field(None, description="Hub revision of the model's tokenizer files.")
    tgi_api_key: SecretStr | None = Field(None, description="Bearer key for a TGI started with --api-key.")
    connect_timeout: float = Field(2.0, gt=0, description="Seconds to connect to TGI.")
    first_token_timeout: float = Field(
        120.0, gt=0, description="Seconds TGI may take to send the first token (queueing included)."
    )
    read_timeout: float = Field(60.0, gt=0, description="Seconds to wait for TGI between two stream events.")
    request_timeout: float = Field(
        600.0, gt=0, description="Seconds a non-stream request may wait for TGI's whole answer (queueing included)."
    )
    connect_retries: int = Field(3, ge=1, le=10, description="Connection attempts to TGI before a 503.")
    log_level: str = Field("info", description="critical, error, warning, info or debug.")
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one object a line.")
    shutdown_grace: float = Field(30.0, ge=0, description="Seconds in-flight requests get to finish at shutdown.")
    workers: int = Field(1, ge=1, le=64, description="Server processes (each one event loop, one CPU core).")
    drain_seconds: float = Field(0.0, ge=0, description="Seconds /health answers 503 before shutdown.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1, description="Largest request body (413 above).")

    # Launching TGI with Docker when nothing answers at a local endpoint (tgi_gateway/container_manager.py).
    launch: bool = Field(True, description="Start TGI in Docker when nothing answers at a local endpoint.")
    tgi_image: str = Field(DEFAULT_IMAGE, description="TGI image to run.")
    gpus: str = Field("all", pattern=r"^(all|\d+(,\d+)*)$", description="all, a count, or device ids (0,1).")
    tgi_publish_host: str = Field("127.0.0.1", description="Host address the TGI port is published on.")
    hf_cache: str | None = Field(None, description="Host directory mounted on /data (default: the HF home).")
    max_input_tokens: int | None = Field(None, ge=1)
    max_total_tokens: int | None = Field(None, ge=2)
    num_shard: int | None = Field(None, ge=1)
    quantize: str | None = None
    dtype: str | None = None
    tgi_args: tuple[str, ...] = Field((), description="Extra text-generation-launcher arguments.")
    startup_timeout: float = Field(1800.0, gt=0, description="Seconds TGI may take to become healthy.")
    keep_tgi: bool = Field(False, description="Leave the TGI container this gateway started running at exit.")

    # Access control (tgi_gateway/server/auth.py). ---------------------------------------------------------------
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), description="Keys clients must send as `Authorization: Bearer`; none: the gateway is open."
    )
    api_key_file: Path | None = Field(None, description="File of more keys, one per line (# comments).")
    max_concurrent_per_key: int | None = Field(None, ge=1, description="Requests in flight per key and process.")
    protect_health: bool = Field(False, description="Require a key on /health and /metrics too.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, v: Any) -> Any:
        return parse_keys(v) if isinstance(v, (str, list, tuple)) else v

    @field_validator("api_key_file")
    @classmethod
    def _api_key_file(cls, v: Path | None) -> Path | None:
        if v is not None:
            read_key_file(v)  # a bad file stops the CLI (exit 2) before any worker starts
        return v

    @field_serializer("api_keys", "tgi_api_key", mode="wrap", when_used="json")
    def _reveal_keys(
        self, v: tuple[SecretStr, ...] | SecretStr | None, nxt: Serialize, info: SerializationInfo
    ) -> Any:
        """Masked, unless asked for by `as_environment` (worker processes need the keys themselves)."""
        if info.context and info.context.get("reveal_secrets"):
            if isinstance(v, SecretStr):
                return v.get_secret_value()
            return None if v is None else [key.get_secret_value() for key in v]
        return nxt(v)
    # ------------------------------------------------------------------------------------------------------

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint must be an http(s) URL such as http://127.0.0.1:8080, not {v!r}")
        return v.rstrip("/")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError("log_level must be one of critical, error, warning, info, debug")
        return v

    def as_environment(self) -> dict[str, str]:
        """These settings as ``TGI_GATEWAY_*`` variables, so that worker processes rebuild the same object."""
        env = {}
        for name, value in self.model_dump(mode="json", context={"reveal_secrets": True}).items():
            if value is not None:
                env[f"TGI_GATEWAY_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        return env

    @property
    def model_name(self) -> str:
        """The name `/v1/models` lists and requests must use."""
        return self.served_model_name or self.model


# API keys as configured (used by the access control, tgi_gateway/server/auth.py) ------------------------


def check_key(key: str, where: str) -> str:
    """`key` if it can be sent in a Bearer header: visible ASCII, no spaces. The message names `where`
    the key was found, never the key."""
    if not key or not all("!" <= ch <= "~" for ch in key):
        raise ValueError(f"{where}: an API key must be visible ASCII characters, without spaces")
    return key


def parse_keys(value: str | Iterable[str]) -> list[str]:
    """The keys given inline: a list (repeated ``--api-key``), or one string (``TGI_GATEWAY_API_KEYS``).

    A string starting with ``[`` is a JSON list (what pydantic-settings expects, and what
    ``Settings.as_environment`` writes for worker processes); any other string is a comma-separated list,
    spaces around keys and empty items ignored, so an empty string means no key.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                raise ValueError("a value starting with '[' must be a JSON list of keys") from None
            if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
                raise ValueError("a value starting with '[' must be a JSON list of keys (strings)")
        else:
            items = [item.strip() for item in text.split(",") if item.strip()]
    else:
        items = list(value)
    return [check_key(key, f"API key #{n}") for n, key in enumerate(items, 1)]


def read_key_file(path: str | Path) -> list[str]:
    """The keys in `path`, one per line; surrounding spaces, blank lines and lines starting with ``#``
    are ignored (a ``#`` inside a line is part of the key). A file without any key is an error: the
    operator meant to protect the gateway, and an empty file would silently leave it open."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(check_key(line, f"{path}, line {number}"))
    if not keys:
        raise ValueError(f"{path} contains no API key (one per line; # starts a comment)")
    return keys
