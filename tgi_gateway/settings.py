"""The gateway's one configuration object, built at the edge (CLI flags over environment) and passed in.

Each setting is declared once, as a field of :class:`Settings`: its name, type, default, checks and
description. Its environment variable is the field name upper-cased with the prefix ``TGI_GATEWAY_``
(``TGI_GATEWAY_ENDPOINT``); its command-line flag is derived from the same field by
:func:`tgi_gateway.cli.build_parser` (``--endpoint``), with a :class:`Flag` in the field's ``Annotated``
metadata where the flag needs more than the field says (another name, a switch, an argument group, the
meaning of an unset value). The description is the flag's help text; the help shows the field's default.
Command-line flags win over environment variables. Bad values are refused at start-up.

This module is a leaf: of the gateway it imports only :mod:`tgi_gateway.prompting.types`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, SerializationInfo, ValidationInfo, field_serializer, field_validator
from pydantic import SerializerFunctionWrapHandler as Serialize
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .prompting.types import Version

ENV_PREFIX = "TGI_GATEWAY_"


@dataclass(frozen=True, slots=True)
class Flag:
    """How a setting appears on the command line (``Annotated`` metadata of a :class:`Settings` field).

    A field without a `Flag` gets ``--<field-name-with-dashes>`` taking one value, in the main group.

    - `name`: the flag when it is not derived from the field's name (``--api-key`` for ``api_keys``).
    - `action`: ``"store"`` (one value), ``"append"`` (repeatable, each occurrence one item),
      ``"store_true"`` / ``"store_false"`` (a switch that sets the field to True / False), or None: no
      flag at all, the environment variable only (:data:`ENV_ONLY`).
    - `metavar`: the value's placeholder in the help (default: argparse's, the field's name upper-cased).
    - `group`: the title of the help section the flag is listed in (None: the main options).
    - `unset`: what the gateway does when a field whose default is None is left unset, as the help and the
      documentation show it (``"unlimited"``, ``"detected"``).
    """

    name: str | None = None
    action: Literal["store", "append", "store_true", "store_false"] | None = "store"
    metavar: str | None = None
    group: str | None = None
    unset: str = "none"


ENV_ONLY = Flag(action=None)
ACCESS = "access control (see docs/operations.md)"
CONNECTIONS = "client connections (see docs/operations.md, Connection limits)"
LAUNCHING = "launching TGI with Docker (when nothing answers at a local --endpoint)"
REPLICAS = "several TGI replicas (see docs/operations.md, Several TGI replicas)"
STORE = "the response store of /v1/responses (see docs/operations.md, Response store)"
#: What --response-ttl defaults to: OpenAI keeps stored responses for 30 days.
DEFAULT_RESPONSE_TTL = 30 * 24 * 3600
#: The SQLite file of the default store, in the data directory.
STORE_FILE = "responses.db"


TGI_MAX_TOP_N_TOKENS = 5  # text-generation-launcher's default --max-top-n-tokens


class Settings(BaseSettings):
    """Every setting of the gateway. Frozen; unknown names are refused; secrets are `SecretStr`."""

    # hide_input_in_errors: a validation error must not print the value it refused (it may hold API keys).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, hide_input_in_errors=True
    )

    model: str = Field(description="hub id or local directory of the Functionary model (its tokenizer files)")
    served_model_name: Annotated[str | None, Flag(unset="--model")] = Field(
        None, description="the model name clients send and /v1/models lists"
    )
    # LoRA adapters (docs/operations.md, "LoRA adapters"); the entries as TGI's LORA_ADAPTERS takes them.
    # Declared after `model` and `served_model_name`: its check reads them.
    lora_adapters: Annotated[tuple[str, ...], NoDecode, Flag(action="append", metavar="ADAPTERS")] = Field(
        (),
        description="LoRA adapters TGI serves (its LORA_ADAPTERS), comma-separated or repeated: hub ids "
        "(org/name, org/name@revision) or name=path; each is a model clients can name",
    )
    endpoint: Annotated[tuple[str, ...], NoDecode, Flag(action="append", metavar="URL")] = Field(
        ("http://127.0.0.1:8080",),
        description="base URL of TGI; several replicas: repeated or comma-separated, and a host name with "
        "several addresses (a Kubernetes headless Service) is one replica per address",
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    template_version: Annotated[Version | None, Flag(unset="detected")] = Field(
        None, description="use this Functionary template version instead of detecting it"
    )
    revision: Annotated[str | None, Flag(unset="main")] = Field(
        None, description="hub revision (branch, tag or commit) of the model's tokenizer files"
    )
    # No flag: a key on the command line shows in `ps`.
    tgi_api_key: Annotated[SecretStr | None, ENV_ONLY] = Field(
        None, description="bearer key for a TGI started with --api-key"
    )
    connect_timeout: float = Field(2.0, gt=0, description="seconds to connect to TGI")
    first_token_timeout: float = Field(
        120.0, gt=0, description="seconds TGI may take to send the first token, queueing included"
    )
    read_timeout: float = Field(60.0, gt=0, description="seconds to wait between two TGI stream events")
    request_timeout: float = Field(
        600.0,
        gt=0,
        description="seconds a non-stream request may wait for TGI's whole answer, queueing included",
    )
    connect_retries: int = Field(
        3, ge=1, le=10, description="connection attempts to TGI before answering 503"
    )
    log_level: str = Field("info", description="critical, error, warning, info or debug")
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one object a line")
    shutdown_grace: float = Field(
        30.0, ge=0, description="seconds in-flight requests get to finish at shutdown"
    )
    drain_seconds: float = Field(
        0.0, ge=0, description="on SIGTERM, seconds /health answers 503 while requests are still served"
    )
    workers: int = Field(1, ge=1, le=64, description="server processes, one CPU core each")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1, description="largest request body, 413 above")
    max_top_n_tokens: int = Field(
        TGI_MAX_TOP_N_TOKENS,
        ge=0,
        description="TGI's --max-top-n-tokens, which its /info does not report: a larger top_logprobs is a 400 "
        "(a TGI the gateway launches is started with it)",
    )
    # The flag is --no-grammar: the description is its help (tgi_gateway/grammar/, docs/operations.md).
    grammar: Annotated[bool, Flag("--no-grammar", "store_false")] = Field(
        True,
        description="never send TGI a grammar (for a TGI started with --disable-grammar-support): tool "
        "choices rely on the prompt alone, a JSON response_format is refused",
    )

    # Connection limits (tgi_gateway/server/http_protocol.py; docs/operations.md, "Connection limits"). ------
    max_head_bytes: Annotated[int, Flag(metavar="BYTES", group=CONNECTIONS)] = Field(
        64 * 1024, ge=1024, description="largest request head (URL and headers), 431 above"
    )
    max_headers: Annotated[int, Flag(metavar="N", group=CONNECTIONS)] = Field(
        100, ge=8, description="most headers in a request, 431 above"
    )
    head_timeout: Annotated[float, Flag(metavar="SECONDS", group=CONNECTIONS)] = Field(
        10.0,
        gt=0,
        description="seconds from accepting a connection, or from the first byte of a request on a reused "
        "one, to the end of its headers: a silent new connection is closed, a partial head gets 408",
    )
    body_timeout: Annotated[float, Flag(metavar="SECONDS", group=CONNECTIONS)] = Field(
        30.0, gt=0, description="seconds from the end of the headers to the end of the body, 408 after"
    )
    keep_alive_timeout: Annotated[float, Flag(metavar="SECONDS", group=CONNECTIONS)] = Field(
        75.0, gt=0, description="seconds an idle keep-alive connection waits for its next request"
    )
    max_connections: Annotated[int | None, Flag(metavar="N", group=CONNECTIONS, unset="derived")] = Field(
        None,
        ge=1,
        description="open connections per worker process; at the cap the longest idle one is closed to make "
        "room, or the new one gets 503 (unset: half the descriptor limit, less 64)",
    )

    # Several TGI replicas (tgi_gateway/tgi/replicas.py; docs/operations.md, "Several TGI replicas"). -------
    health_interval: Annotated[float, Flag(metavar="SECONDS", group=REPLICAS)] = Field(
        2.0,
        ge=0,
        description="with several replicas, seconds between two /health probes of each (0: no probe): an "
        "unhealthy one is ejected, a healthy one re-admitted",
    )
    resolve_interval: Annotated[float, Flag(metavar="SECONDS", group=REPLICAS)] = Field(
        10.0,
        ge=0,
        description="seconds between two resolutions of an endpoint's host name (0: never): its addresses "
        "are its replicas, the new ones added, the gone ones drained",
    )
    eject_seconds: Annotated[float, Flag(metavar="SECONDS", group=REPLICAS)] = Field(
        1.0,
        gt=0,
        description="a replica that refuses a connection or answers 503 is ejected this long, doubled at "
        "each failure in a row (at most --eject-max-seconds)",
    )
    eject_max_seconds: Annotated[float, Flag(metavar="SECONDS", group=REPLICAS)] = Field(
        30.0, gt=0, description="the longest ejection"
    )
    # The flag is --no-affinity: the description is its help.
    affinity: Annotated[bool, Flag("--no-affinity", "store_false", group=REPLICAS)] = Field(
        True,
        description="route by load only: requests with the same tools and system prompt do not prefer the "
        "same replica (whose prefix cache holds them)",
    )
    affinity_load_factor: Annotated[float, Flag(metavar="C", group=REPLICAS)] = Field(
        1.25,
        ge=1.0,
        description="a prefix's replica takes at most C times the average requests in flight, else the next "
        "on the ring does",
    )

    # Access control (tgi_gateway/server/auth.py). --------------------------------------------------------
    api_keys: Annotated[
        tuple[SecretStr, ...], NoDecode, Flag("--api-key", "append", metavar="KEY", group=ACCESS)
    ] = Field(
        (),
        description="a key clients must send as 'Authorization: Bearer KEY' (repeatable; shows in ps: prefer "
        "--api-key-file or TGI_GATEWAY_API_KEYS); no key: the gateway is open",
    )
    api_key_file: Annotated[Path | None, Flag(metavar="PATH", group=ACCESS)] = Field(
        None, description="file of keys, one per line (# comments, blank lines)"
    )
    max_concurrent_per_key: Annotated[int | None, Flag(metavar="N", group=ACCESS, unset="unlimited")] = Field(
        None, ge=1, description="requests in flight per key and worker process; over it: 429"
    )
    protect_health: Annotated[bool, Flag(action="store_true", group=ACCESS)] = Field(
        False, description="require a key on /health and /metrics too"
    )
    redis_url: Annotated[SecretStr | None, Flag(metavar="URL", group=ACCESS, unset="none")] = Field(
        None,
        description="Redis that holds --max-concurrent-per-key's counts, shared by every worker process and "
        "gateway replica (redis://, rediss:// or unix://); without it the limit is per process",
    )

    # The response store (tgi_gateway/store/; docs/operations.md, "Response store"). ----------------------
    data_dir: Annotated[
        Path | None, Flag(metavar="PATH", group=STORE, unset="$XDG_DATA_HOME/tgi-gateway")
    ] = Field(
        None,
        description="directory of the gateway's own data: the default response store, responses.db "
        "($XDG_DATA_HOME unset: ~/.local/share)",
    )
    # A secret: a PostgreSQL URL may hold a password.
    response_store: Annotated[
        SecretStr | None, Flag(metavar="URL", group=STORE, unset="DATA_DIR/responses.db")
    ] = Field(
        None,
        description="database of stored responses: sqlite:///PATH (a file; four slashes for an absolute path) "
        "or postgresql://USER:PASSWORD@HOST:PORT/DATABASE (shared by several processes or hosts)",
    )
    response_ttl: Annotated[float, Flag(metavar="SECONDS", group=STORE)] = Field(
        DEFAULT_RESPONSE_TTL,
        ge=0,
        description="seconds a stored response is kept (30 days, as OpenAI); 0: kept until deleted",
    )

    # Launching TGI with Docker (tgi_gateway/container_manager.py). ----------------------------------------
    # The flag is --no-launch: the description is its help.
    launch: Annotated[bool, Flag("--no-launch", "store_false", group=LAUNCHING)] = Field(
        True, description="never start TGI; answer 503 until the endpoint is up"
    )
    # Pinned to a release: `latest` is built from TGI's main branch, never use it.
    tgi_image: Annotated[str, Flag(group=LAUNCHING)] = Field(
        "ghcr.io/huggingface/text-generation-inference:3.3.5", description="TGI image"
    )
    gpus: Annotated[str, Flag(group=LAUNCHING)] = Field(
        "all", pattern=r"^(all|\d+(,\d+)*)$", description="all, a count, or device ids such as 0,1"
    )
    tgi_publish_host: Annotated[str, Flag(group=LAUNCHING)] = Field(
        "127.0.0.1", description="host address TGI's port is published on"
    )
    hf_cache: Annotated[str | None, Flag(group=LAUNCHING, unset="your HF home")] = Field(
        None, description="host directory mounted on /data for downloads"
    )
    max_input_tokens: Annotated[int | None, Flag(group=LAUNCHING, unset="TGI's")] = Field(
        None, ge=1, description="TGI --max-input-tokens"
    )
    max_total_tokens: Annotated[int | None, Flag(group=LAUNCHING, unset="TGI's")] = Field(
        None, ge=2, description="TGI --max-total-tokens"
    )
    num_shard: Annotated[int | None, Flag(group=LAUNCHING, unset="TGI's")] = Field(
        None, ge=1, description="TGI --num-shard (GPUs to shard the model over)"
    )
    quantize: Annotated[str | None, Flag(group=LAUNCHING, unset="TGI's")] = Field(
        None, description="TGI --quantize (awq, gptq, bitsandbytes-nf4, fp8, ...)"
    )
    dtype: Annotated[str | None, Flag(group=LAUNCHING, unset="TGI's")] = Field(
        None, description="TGI --dtype (float16, bfloat16)"
    )
    tgi_args: Annotated[tuple[str, ...], Flag("--tgi-arg", "append", metavar="ARG", group=LAUNCHING)] = Field(
        (),
        description="extra text-generation-launcher argument (repeatable), "
        "e.g. --tgi-arg=--max-batch-prefill-tokens=4096",
    )
    startup_timeout: Annotated[float, Flag(group=LAUNCHING)] = Field(
        1800.0, gt=0, description="seconds TGI may take to load"
    )
    keep_tgi: Annotated[bool, Flag(action="store_true", group=LAUNCHING)] = Field(
        False, description="leave the TGI container this gateway started running at exit"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, v: Any) -> Any:
        return parse_keys(v) if isinstance(v, (str, list, tuple)) else v

    @field_validator("lora_adapters", mode="before")
    @classmethod
    def _lora_adapters(cls, v: Any) -> Any:
        return tuple(parse_lora_adapters(v)) if isinstance(v, (str, list, tuple)) else v

    @field_validator("lora_adapters")
    @classmethod
    def _adapter_names(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        names = [lora_adapter(entry).name for entry in v]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"the adapter name {twice[0]!r} is given more than once")
        base = info.data.get("served_model_name") or info.data.get("model")
        if base in names:
            raise ValueError(
                f"the adapter name {base!r} is the model's name (--served-model-name, else --model)"
            )
        return v

    @field_validator("api_key_file")
    @classmethod
    def _api_key_file(cls, v: Path | None) -> Path | None:
        if v is not None:
            read_key_file(v)  # a bad file stops the CLI (exit 2) before any worker starts
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            parts = urlsplit(v.get_secret_value())
            if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
                raise ValueError("redis_url must be a redis://host:port[/db], rediss:// or unix:// URL")
        return v

    @field_serializer("api_keys", "tgi_api_key", "redis_url", "response_store", mode="wrap", when_used="json")
    def _reveal_keys(
        self, v: tuple[SecretStr, ...] | SecretStr | None, nxt: Serialize, info: SerializationInfo
    ) -> Any:
        """Masked, unless asked for by `as_environment` (worker processes need the keys themselves)."""
        if info.context and info.context.get("reveal_secrets"):
            if isinstance(v, SecretStr):
                return v.get_secret_value()
            return None if v is None else [key.get_secret_value() for key in v]
        return nxt(v)

    @field_validator("endpoint", mode="before")
    @classmethod
    def _endpoints(cls, v: Any) -> Any:
        return tuple(parse_endpoints(v)) if isinstance(v, (str, list, tuple)) else v

    @field_validator("endpoint")
    @classmethod
    def _http_urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one endpoint is needed")
        for url in v:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"endpoint must be an http(s) URL such as http://127.0.0.1:8080, not {url!r}"
                )
        return tuple(dict.fromkeys(url.rstrip("/") for url in v))

    @field_validator("response_store")
    @classmethod
    def _store_url(cls, v: SecretStr | None) -> SecretStr | None:
        return None if v is None else SecretStr(check_store_url(v.get_secret_value()))

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
                env[ENV_PREFIX + name.upper()] = value if isinstance(value, str) else json.dumps(value)
        return env

    @property
    def store_url(self) -> str:
        """The response store's URL: ``--response-store``, else the SQLite file in the data directory."""
        if self.response_store is not None:
            return self.response_store.get_secret_value()
        return "sqlite:///" + str((self.data_dir or default_data_dir()).expanduser().absolute() / STORE_FILE)

    @property
    def store_ttl(self) -> float | None:
        """Seconds a stored response is kept; None: until deleted."""
        return self.response_ttl or None

    @property
    def model_name(self) -> str:
        """The name `/v1/models` lists and requests must use."""
        return self.served_model_name or self.model

    @property
    def adapters(self) -> tuple[LoraAdapter, ...]:
        """The LoRA adapters, parsed from `lora_adapters`."""
        return tuple(lora_adapter(entry) for entry in self.lora_adapters)

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name requests may use: the base model's, then each adapter's."""
        return (self.model_name, *(adapter.name for adapter in self.adapters))


def parse_endpoints(value: str | Iterable[str]) -> list[str]:
    """The TGI endpoints given: repeated ``--endpoint`` (each item itself comma-separated), or one string
    (``TGI_GATEWAY_ENDPOINT``: comma-separated, or a JSON list as ``Settings.as_environment`` writes it).
    Spaces around URLs and empty items are ignored."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                raise ValueError("a value starting with '[' must be a JSON list of URLs") from None
            if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
                raise ValueError("a value starting with '[' must be a JSON list of URLs (strings)")
        else:
            items = [text]
    else:
        items = list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


# The response store's location (opened by tgi_gateway/store/) ---------------------------------------------

#: URL schemes of the response store, and the database each names.
STORE_SCHEMES = {
    "sqlite": "sqlite",
    "sqlite+aiosqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "postgresql+asyncpg": "postgresql",
}


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/tgi-gateway``, else ``~/.local/share/tgi-gateway`` (the XDG base directory rule: a
    per-user place for data that must survive restarts, unlike a cache)."""
    base = os.environ.get("XDG_DATA_HOME", "").strip()
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "tgi-gateway"


def check_store_url(url: str) -> str:
    """`url` if it names a response store this gateway can open (a ValueError says why not, the password
    never shown): ``sqlite:///relative/path``, ``sqlite:////absolute/path``, ``postgresql://…`` (or
    ``postgres://``; the ``+aiosqlite`` / ``+asyncpg`` forms too)."""
    scheme, sep, rest = url.strip().partition("://")
    kind = STORE_SCHEMES.get(scheme.lower())
    if not sep or kind is None:
        raise ValueError(
            f"the response store must be a sqlite:///PATH or postgresql://HOST/DATABASE URL, not one starting "
            f"with {(scheme + sep)[:40]!r}"
        )
    if kind == "sqlite":
        path = rest[1:] if rest.startswith("/") else None
        if rest and not rest.startswith("/"):
            raise ValueError("a sqlite URL names a file, not a host: sqlite:///relative/path or "
                             "sqlite:////absolute/path")  # fmt: skip
        if not path or path.split("?")[0] in ("", ":memory:"):
            raise ValueError("a sqlite response store needs a file path (sqlite:///PATH): an in-memory "
                             "database would be lost at exit and not shared between workers")  # fmt: skip
    elif not urlsplit("postgresql://" + rest).path.strip("/") and "dbname=" not in rest:
        raise ValueError("a postgresql response store URL must name its database: postgresql://HOST/DATABASE")
    return url.strip()


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


# LoRA adapters (TGI's LORA_ADAPTERS: server/text_generation_server/utils/adapter.py, parse_lora_adapters) ----

# An adapter's name is what clients send as `model` and TGI's `adapter_id`: a hub id's characters, segments
# joined by single slashes, none starting with a dot (no `..`, no hidden path when it names a mount point).
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*")
MAX_ADAPTER_NAME = 128


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """One entry of TGI's ``LORA_ADAPTERS``: ``name[=path][@revision]``. Without a path, `name` is the
    adapter's hub id; TGI's ``adapter_id`` is always `name`."""

    name: str
    path: str | None = None
    revision: str | None = None

    @property
    def entry(self) -> str:
        """The entry as TGI takes it."""
        path = f"={self.path}" if self.path is not None else ""
        revision = f"@{self.revision}" if self.revision is not None else ""
        return f"{self.name}{path}{revision}"

    @property
    def source(self) -> str:
        """Where TGI loads it from: the path, else the hub id."""
        return self.path if self.path is not None else self.name


def lora_adapter(entry: str) -> LoraAdapter:
    """One ``LORA_ADAPTERS`` entry parsed as TGI parses it (at most one ``=`` and one ``@``; the name is what
    comes before them), with the name's characters checked; a ValueError says what is wrong."""
    text = entry.strip()
    if text.count("=") > 1 or text.count("@") > 1:
        raise ValueError(f"LoRA adapter {text!r}: at most one '=' (name=path) and one '@' (@revision)")
    head, _, revision = text.partition("@")
    name, eq, path = head.partition("=")
    name, path, revision = name.strip(), path.strip(), revision.strip()
    if len(name) > MAX_ADAPTER_NAME or not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"LoRA adapter {text!r}: the name must be letters, digits, '_', '-', '.' and single '/' between "
            f"parts (a hub id such as org/adapter), no part starting with '.', at most {MAX_ADAPTER_NAME} "
            "characters"
        )
    if eq and not path:
        raise ValueError(f"LoRA adapter {text!r}: no path after '='")
    if "@" in text and not revision:
        raise ValueError(f"LoRA adapter {text!r}: no revision after '@'")
    return LoraAdapter(name, path or None, revision or None)


def parse_lora_adapters(value: str | Iterable[str]) -> list[str]:
    """The adapter entries given: repeated ``--lora-adapters`` (each item itself comma-separated), or one
    string (``TGI_GATEWAY_LORA_ADAPTERS``: comma-separated, or a JSON list as ``Settings.as_environment``
    writes it). Spaces around entries and empty items are ignored; each entry is checked and normalised."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                raise ValueError("a value starting with '[' must be a JSON list of adapters") from None
            if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
                raise ValueError("a value starting with '[' must be a JSON list of adapters (strings)")
        else:
            items = [text]
    else:
        items = list(value)
    entries = [part for item in items for part in str(item).split(",") if part.strip()]
    return [lora_adapter(part).entry for part in entries]
