"""Access control: API keys and the per-key limit of requests in flight (tgi_gateway/server/auth.py).

Key parsing and the settings first, then the middleware driven with raw ASGI messages, then the gateway on a
real socket with the official openai SDK, then the real process (`server_tgi.py --workers 2`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

from tests.fakes.serve import serve
from tests.fakes.tgi import EOT, Fail, FakeTGI, Gate, tokens
from tests.gateway_process import V31_TEMPLATE, start_gateway
from tgi_gateway import cli
from tgi_gateway import settings as settings_module
from tgi_gateway.cli import build_parser
from tgi_gateway.prompting import Template, Version
from tgi_gateway.server import auth
from tgi_gateway.server.app import create_app
from tgi_gateway.server.auth import KEY_ID_SCOPE, OPEN_PATHS, AccessControl, KeyRing, key_id, mask
from tgi_gateway.settings import Settings

KEY_A = "sk-gw-a-0123456789abcdef0123456789abcdef"
KEY_B = "sk-gw-b-fedcba9876543210fedcba9876543210"
WRONG = "sk-gw-x-00000000000000000000000000000000"
MODEL = "functionary-test"
ASK = [{"role": "user", "content": "Hi"}]
TEXT = tokens("It", " is", " sunny", ".", EOT)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TGI_GATEWAY_* variable of the shell (or of another test) leaks into Settings()."""
    for name in list(os.environ):
        if name.startswith("TGI_GATEWAY_"):
            monkeypatch.delenv(name)


# ------------------------------------------------------------------------------------------------
# Keys: flags, environment, file; secrets stay secret
# ------------------------------------------------------------------------------------------------


def secrets(settings: Settings) -> list[str]:
    return [key.get_secret_value() for key in settings.api_keys]


def test_env_keys_are_a_comma_separated_or_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TGI_GATEWAY_API_KEYS", f" {KEY_A} ,{KEY_B},")
    assert secrets(Settings(model="m")) == [KEY_A, KEY_B]
    monkeypatch.setenv("TGI_GATEWAY_API_KEYS", json.dumps([KEY_A, "with,comma"]))
    assert secrets(Settings(model="m")) == [KEY_A, "with,comma"]
    monkeypatch.setenv("TGI_GATEWAY_API_KEYS", "")
    assert Settings(model="m").api_keys == (), "empty (compose's ${VAR:-}): no key, the gateway is open"


@pytest.mark.parametrize("value", ['["not json', '[{"a": 1}]', '["ok", 3]'])
def test_env_keys_starting_with_a_bracket_must_be_a_json_list(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("TGI_GATEWAY_API_KEYS", value)
    with pytest.raises(ValidationError, match="JSON list"):
        Settings(model="m")


@pytest.mark.parametrize("bad", ["has space", "tab\there", "", "caf\u00e9-key"])
def test_unusable_keys_are_refused_without_being_echoed(bad: str) -> None:
    with pytest.raises(ValidationError) as e:
        Settings(model="m", api_keys=[KEY_A, bad])
    assert "API key #2" in str(e.value)
    assert KEY_A not in str(e.value) and (not bad or bad not in str(e.value)), "the input is hidden"


def test_key_file_ignores_blank_lines_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# production\r\n\n  {KEY_A}  \r\n#{WRONG}\nkey#with-hash\n")
    assert settings_module.read_key_file(path) == [KEY_A, "key#with-hash"]
    settings = Settings(model="m", api_key_file=str(path))
    assert settings.api_key_file == path and settings.api_keys == ()


def test_key_file_must_exist_and_hold_a_key(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ValidationError, match="contains no API key"):
        Settings(model="m", api_key_file=str(empty))
    with pytest.raises(ValidationError, match="cannot read"):
        Settings(model="m", api_key_file=str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_text(f"{KEY_A}\nsk bad\n")
    with pytest.raises(ValidationError, match="line 2") as e:
        Settings(model="m", api_key_file=str(bad))
    assert "sk bad" not in str(e.value)


def test_cli_flags_build_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(KEY_B + "\n")
    argv = ["--model", "m", "--api-key", KEY_A, "--api-key", WRONG, "--api-key-file", str(path),
            "--max-concurrent-per-key", "3", "--protect-health"]  # fmt: skip
    args = build_parser().parse_args(argv)
    settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})  # as cli.main does
    assert secrets(settings) == [KEY_A, WRONG]
    assert settings.api_key_file == path
    assert (settings.max_concurrent_per_key, settings.protect_health) == (3, True)
    plain = build_parser().parse_args(["--model", "m"])
    defaults = Settings(**{k: v for k, v in vars(plain).items() if v is not None})
    assert (defaults.api_keys, defaults.max_concurrent_per_key, defaults.protect_health) == ((), None, False)


@pytest.mark.parametrize(
    "argv,env,expected",
    [
        (["--api-key", KEY_A, "--api-key", "bad key"], {}, "error: --api-key: API key #2: an API key must be"),
        ([], {"TGI_GATEWAY_API_KEYS": f"{KEY_A},bad key"}, "error: TGI_GATEWAY_API_KEYS: API key #2: an API key"),
        ([], {"TGI_GATEWAY_API_KEYS": '["not json'}, "error: TGI_GATEWAY_API_KEYS: a value starting with '['"),
        (["--api-key-file", "{keys}"], {}, "error: --api-key-file: {keys}, line 2: an API key must be"),
        ([], {"TGI_GATEWAY_API_KEY_FILE": "{keys}"}, "error: TGI_GATEWAY_API_KEY_FILE: {keys}, line 2: an API"),
        (["--api-key", KEY_A], {"TGI_GATEWAY_API_KEYS": "bad key"}, None),  # the flag wins: the variable unread
        (["--max-concurrent-per-key", "0"], {}, "error: --max-concurrent-per-key: Input should be greater"),
        ([], {"TGI_GATEWAY_PORT": "http"}, "error: TGI_GATEWAY_PORT: Input should be a valid integer"),
    ],
)
def test_cli_errors_name_the_flag_or_variable_the_user_set(
    argv: list[str], env: dict[str, str], expected: str | None, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_A}\nbad key\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(keys=keys))
    argv = [arg.format(keys=keys) for arg in argv]
    if expected is None:  # valid: main goes on to serve, which is not tested here
        monkeypatch.setattr("tgi_gateway.cli._serve", lambda *args: 0)
        assert cli.main(["--model", "m", "--template-version", "v1", "--no-launch", *argv]) == 0
        return
    assert cli.main(["--model", "m", "--template-version", "v1", "--no-launch", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected.format(keys=keys)), err
    assert "--api-keys" not in err and "Value error" not in err and "bad key" not in err and KEY_A not in err


def test_settings_survive_the_worker_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys"
    path.write_text(KEY_B + "\n")
    settings = Settings(model="m", api_keys=[KEY_A, "with,comma"], api_key_file=str(path),
                        max_concurrent_per_key=2, protect_health=True)  # fmt: skip
    env = settings.as_environment()
    assert KEY_B not in json.dumps(env), "keys from the file stay in the file: workers read it themselves"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rebuilt = Settings()
    assert rebuilt == settings
    assert secrets(rebuilt) == [KEY_A, "with,comma"]


def test_keys_stay_out_of_repr_and_dumps() -> None:
    settings = Settings(model="m", api_keys=[KEY_A])
    for text in (repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())):
        assert KEY_A not in text
    assert settings.as_environment()["TGI_GATEWAY_API_KEYS"] == json.dumps([KEY_A]), "workers get the key"


TGI_KEY = "tgi-key-0123456789abcdef-not-to-be-shown"


def test_tgi_key_stays_out_of_repr_and_dumps_but_reaches_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TGI_GATEWAY_TGI_API_KEY", TGI_KEY)
    settings = Settings(model="m")
    assert settings.tgi_api_key is not None and settings.tgi_api_key.get_secret_value() == TGI_KEY
    for text in (repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump()),
                 json.dumps(settings.model_dump(mode="json"))):  # fmt: skip
        assert TGI_KEY not in text
    env = settings.as_environment()
    assert env["TGI_GATEWAY_TGI_API_KEY"] == TGI_KEY, "workers get the key"
    monkeypatch.delenv("TGI_GATEWAY_TGI_API_KEY")
    assert "TGI_GATEWAY_TGI_API_KEY" not in Settings(model="m").as_environment(), "no key: no variable"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings


def test_key_id_is_short_stable_and_not_the_key() -> None:
    assert key_id(KEY_A) == key_id(KEY_A.encode()) != key_id(KEY_B)
    assert key_id(KEY_A).startswith("key-") and len(key_id(KEY_A)) == 12
    assert KEY_A[:8] not in key_id(KEY_A)


def test_mask_reveals_at_most_a_quarter_of_a_key() -> None:
    assert mask("sk-proj-0123456789abcdef0123456wxyz") == "sk-p****wxyz"
    assert mask("short") == "****" and mask("") == "****"
    for n in range(80):
        key = "".join(chr(ord("A") + i % 26) for i in range(n))
        shown = len(mask(key)) - len("****")
        assert shown <= n / 4, (n, mask(key))


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    ring = KeyRing([KEY_A, KEY_B, "k3"])
    for presented, expected in ((KEY_A, key_id(KEY_A)), ("k3", key_id("k3")), (KEY_A[:-1], None),
                                (KEY_A + "x", None), ("", None)):  # fmt: skip
        calls.clear()
        assert ring.match(presented.encode()) == expected
        assert calls == [(32, 32)] * 3, "every key, digests of one length: no early exit, no length leak"


# ------------------------------------------------------------------------------------------------
# The middleware, driven with raw ASGI messages
# ------------------------------------------------------------------------------------------------


class Inner:
    """The app behind the middleware: 200, optionally after `hold` is set; records the scopes it saw."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.hold: asyncio.Event | None = None
        self.fail = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            raise RuntimeError("the app failed")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app: Any, path: str = "/v1/chat/completions", key: str | None = None, *,
               header: bytes | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One HTTP request through `app`: status, headers, body."""
    headers = []
    if key is not None or header is not None:
        headers.append((b"authorization", header if header is not None else b"Bearer " + key.encode()))
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, *bodies = sent
    return (
        start["status"],
        {k.decode(): v.decode() for k, v in start["headers"]},
        b"".join(m["body"] for m in bodies),
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_missing_or_wrong_key_is_openai_401() -> None:
    inner = Inner()
    app = AccessControl(inner, keys=[KEY_A])

    status, headers, body = run(call(app))
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    err = json.loads(body)["error"]
    assert err == {"message": auth.MISSING_KEY, "type": "invalid_request_error", "param": None,
                   "code": "invalid_api_key"}  # fmt: skip

    for header in (b"Bearer " + WRONG.encode(), b"Bearer " + KEY_A[:-1].encode(), b"Basic " + KEY_A.encode(),
                   b"Bearer", b"Bearer   ", KEY_A.encode()):  # fmt: skip
        status, headers, body = run(call(app, header=header))
        assert status == 401 and headers["www-authenticate"] == "Bearer", header
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
        assert KEY_A not in body.decode() and WRONG not in body.decode()
    status, _, body = run(call(app, key=WRONG))
    assert json.loads(body)["error"]["message"] == f"Incorrect API key provided: {mask(WRONG)}."
    assert inner.scopes == [], "a refused request never reaches the app"


def test_valid_key_passes_with_its_id_in_the_scope_seen_by_outer_middlewares() -> None:
    inner = Inner()
    app = AccessControl(inner, keys=[KEY_A, KEY_B])
    seen: list[Any] = []

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:  # e.g. request logging
        await app(scope, receive, send)
        seen.append(scope.get(KEY_ID_SCOPE))

    assert run(call(outer, key=KEY_B))[0] == 200
    assert run(call(outer, header=b"bearer " + KEY_A.encode()))[0] == 200, "the scheme is case-insensitive"
    assert seen == [key_id(KEY_B), key_id(KEY_A)]
    assert [s[KEY_ID_SCOPE] for s in inner.scopes] == seen


def test_open_paths_unless_protected() -> None:
    inner = Inner()
    app = AccessControl(inner, keys=[KEY_A])
    for path in sorted(OPEN_PATHS):
        assert run(call(app, path))[0] == 200, path
    for path in ("/docs", "/openapi.json", "/v1/models", "/health/", "/healthz", "/nowhere"):
        assert run(call(app, path))[0] == 401, path
    assert KEY_ID_SCOPE not in inner.scopes[0], "an open path is not authenticated"
    protected = AccessControl(inner, keys=[KEY_A], open_paths=frozenset())
    assert run(call(protected, "/health"))[0] == 401
    assert run(call(protected, "/health", KEY_A))[0] == 200


def test_lifespan_passes_through() -> None:
    got: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        got.append(scope["type"])

    run(AccessControl(inner, keys=[KEY_A], max_concurrent=1)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert got == ["lifespan"]


def test_limit_is_per_key_with_retry_after() -> None:
    async def go() -> None:
        inner, hold = Inner(), asyncio.Event()
        inner.hold = hold
        app = AccessControl(inner, keys=[KEY_A, KEY_B], max_concurrent=2)
        assert app.in_flight is not None
        held = [asyncio.create_task(call(app, key=KEY_A)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert app.in_flight[key_id(KEY_A)] == 2
        inner.hold = None  # requests from now on are answered at once
        status, headers, body = await call(app, key=KEY_A)
        assert status == 429 and headers["retry-after"] == "1"
        assert json.loads(body)["error"] == {
            "message": "Too many concurrent requests for this API key: at most 2 at a time. "
                       "Retry when one of them has finished.",
            "type": "requests", "param": None, "code": "rate_limit_exceeded",
        }  # fmt: skip
        assert (await call(app, key=KEY_B))[0] == 200, "another key has its own slots"
        assert (await call(app, key=WRONG))[0] == 401, "authentication comes first"
        hold.set()
        assert [status for status, _, _ in await asyncio.gather(*held)] == [200, 200]
        assert app.in_flight[key_id(KEY_A)] == 0
        assert (await call(app, key=KEY_A))[0] == 200

    run(go())


def test_slot_comes_back_when_the_app_fails_or_is_cancelled() -> None:
    async def go() -> None:
        inner = Inner()
        app = AccessControl(inner, keys=[KEY_A], max_concurrent=1)
        assert app.in_flight is not None
        inner.fail = True
        with pytest.raises(RuntimeError):
            await call(app, key=KEY_A)
        assert app.in_flight[key_id(KEY_A)] == 0
        inner.fail, inner.hold = False, asyncio.Event()
        task = asyncio.create_task(call(app, key=KEY_A))
        await asyncio.sleep(0.01)
        assert app.in_flight[key_id(KEY_A)] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert app.in_flight[key_id(KEY_A)] == 0
        inner.hold = None
        assert (await call(app, key=KEY_A))[0] == 200

    run(go())


def test_slot_comes_back_with_the_last_body_message_before_the_app_returns() -> None:
    async def go() -> None:
        cleanup = asyncio.Event()

        async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            await cleanup.wait()  # e.g. closing the upstream TGI response

        app = AccessControl(streaming, keys=[KEY_A], max_concurrent=1)
        first = asyncio.create_task(call(app, key=KEY_A))
        await asyncio.sleep(0.01)
        assert not first.done(), "the app is still cleaning up"
        second = asyncio.create_task(call(app, key=KEY_A))
        await asyncio.sleep(0.01)
        cleanup.set()
        assert (await first)[0] == 200
        assert (await second)[0] == 200, "the client had its whole answer: its next request is not refused"
        assert app.in_flight is not None and app.in_flight[key_id(KEY_A)] == 0

    run(go())


def test_limit_without_keys_is_shared_by_everyone() -> None:
    async def go() -> None:
        inner, hold = Inner(), asyncio.Event()
        inner.hold = hold
        app = AccessControl(inner, max_concurrent=1)
        held = asyncio.create_task(call(app))
        await asyncio.sleep(0.01)
        inner.hold = None
        status, _, body = await call(app, key=KEY_A)
        assert status == 429 and "this gateway" in json.loads(body)["error"]["message"]
        assert (await call(app, "/health"))[0] == 200, "open paths are not counted"
        hold.set()
        assert (await held)[0] == 200
        assert KEY_ID_SCOPE not in inner.scopes[0], "no key, no key id"

    run(go())


def test_create_app_adds_the_middleware_only_when_configured(tmp_path: Path) -> None:
    def middlewares(**settings: Any) -> list[Any]:
        app = create_app(Settings(model=MODEL, **settings), Template(Version.V3_LLAMA31))
        return [(m.cls, m.kwargs) for m in app.user_middleware if m.cls is AccessControl]

    assert middlewares() == []
    path = tmp_path / "keys"
    path.write_text(KEY_B + "\n")
    [(cls, kwargs)] = middlewares(api_keys=[KEY_A], api_key_file=str(path), max_concurrent_per_key=4)
    assert cls is AccessControl
    assert kwargs == {"keys": [KEY_A, KEY_B], "max_concurrent": 4, "in_flight": None, "open_paths": OPEN_PATHS}
    [(_, kwargs)] = middlewares(max_concurrent_per_key=1, protect_health=True)
    assert kwargs == {"keys": [], "max_concurrent": 1, "in_flight": None, "open_paths": frozenset()}


# ------------------------------------------------------------------------------------------------
# End to end: the openai SDK → the gateway on a real socket → the TGI double
# ------------------------------------------------------------------------------------------------


@contextmanager
def gateway(tgi: FakeTGI, **settings: Any) -> Iterator[str]:
    app = create_app(Settings(model=MODEL, endpoint=tgi.url, **settings), Template(Version.V3_LLAMA31))
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI(script=TEXT) as double:
        yield double


@pytest.fixture(scope="module")
def url(tgi: FakeTGI) -> Iterator[str]:
    with gateway(tgi, api_keys=[KEY_A, KEY_B], max_concurrent_per_key=1) as u:
        yield u


@pytest.fixture(autouse=True)
def plain_script(tgi: FakeTGI) -> None:
    tgi.script = TEXT


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)


def auth_header(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@contextmanager
def held_stream(url: str, key: str, tgi: FakeTGI) -> Iterator[Gate]:
    """A stream of `key`, held by TGI after its first token (until the gate opens); the client leaves it at the
    end of the block."""
    gate = Gate()
    tgi.script = ["It", gate, " is", EOT]
    with httpx.stream("POST", url + "/v1/chat/completions", headers=auth_header(key),
                      json={"model": MODEL, "messages": ASK, "stream": True}, timeout=20) as r:  # fmt: skip
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a collected line iterator would close the response, i.e. leave
        assert any('"content":"It"' in line for line in lines)
        tgi.script = TEXT
        yield gate


def wait_for_a_slot(url: str, key: str, timeout: float = 5.0) -> int:
    """Poll with `key` until a request is not refused with 429; its status."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(url + "/v1/models", headers=auth_header(key))
        if r.status_code != 429 or time.monotonic() > deadline:
            return r.status_code
        time.sleep(0.02)


def test_sdk_with_a_valid_key_stream_and_not(url: str) -> None:
    with sdk(url, KEY_A) as client:
        assert (
            client.chat.completions.create(model=MODEL, messages=ASK).choices[0].message.content
            == "It is sunny."
        )
        with client.chat.completions.stream(model=MODEL, messages=ASK) as s:
            assert s.get_final_completion().choices[0].message.content == "It is sunny."
        assert [m.id for m in client.models.list()] == [MODEL]


def test_sequential_streams_at_a_limit_of_one_are_never_refused(url: str) -> None:
    with sdk(url, KEY_B) as client:
        for _ in range(20):
            chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True))
            assert chunks[-1].choices[0].finish_reason == "stop"


def test_sdk_with_a_wrong_key_is_an_authentication_error(url: str, tgi: FakeTGI) -> None:
    before = len(tgi.generations)
    with sdk(url, WRONG) as client, pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, stream=True)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert e.value.response.headers["www-authenticate"] == "Bearer"
    assert e.value.response.json() == {"error": {"message": f"Incorrect API key provided: {mask(WRONG)}.",
                                                 "type": "invalid_request_error", "param": None,
                                                 "code": "invalid_api_key"}}  # fmt: skip
    assert WRONG not in e.value.message
    assert len(tgi.generations) == before, "nothing reached TGI"


def test_missing_key_is_401_and_only_health_is_open(url: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/openapi.json", "/docs"):
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers=auth_header(KEY_A)).status_code == 200, path
    assert httpx.get(url + "/health").status_code == 200


def test_over_the_limit_is_a_rate_limit_error_with_retry_after(url: str, tgi: FakeTGI) -> None:
    with held_stream(url, KEY_A, tgi) as gate:
        with sdk(url, KEY_A) as client, pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK)
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.code == "rate_limit_exceeded"
        with sdk(url, KEY_B) as other:
            assert other.chat.completions.create(model=MODEL, messages=ASK).choices[0].message.content
    gate.open()
    assert wait_for_a_slot(url, KEY_A) == 200


def test_slot_comes_back_when_the_client_leaves_mid_stream(url: str, tgi: FakeTGI) -> None:
    with held_stream(url, KEY_A, tgi) as gate:
        assert httpx.get(url + "/v1/models", headers=auth_header(KEY_A)).status_code == 429
        held = tgi.last_generation
    assert tgi.wait_until(lambda: held.disconnected, 5), "the gateway noticed the client left"
    assert wait_for_a_slot(url, KEY_A) == 200, "the slot of the abandoned stream came back"
    gate.open()


def test_slot_comes_back_after_errors_and_an_abandoned_request(url: str, tgi: FakeTGI) -> None:
    with sdk(url, KEY_A) as client:
        with pytest.raises(openai.BadRequestError):  # TGI refuses it before the first token
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100_000)
        assert wait_for_a_slot(url, KEY_A) == 200
        tgi.script = ["It", Fail("CUDA out of memory")]  # fails mid-stream: an error event
        with pytest.raises(openai.APIError, match="CUDA"):
            list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True))
        assert wait_for_a_slot(url, KEY_A) == 200
        gate = Gate()
        tgi.script = ["It", gate, EOT]

        async def abandon() -> None:  # a non-stream request the client gives up on
            async with httpx.AsyncClient(base_url=url, headers=auth_header(KEY_A)) as h:
                task = asyncio.create_task(
                    h.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK})
                )
                assert await tgi.wait_until_async(lambda: tgi.generate_open == 1, 5)  # TGI's /generate
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        asyncio.run(abandon())
        gate.open()
        assert wait_for_a_slot(url, KEY_A) == 200


def test_keys_never_reach_the_log(tgi: FakeTGI, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), gateway(tgi, api_keys=[KEY_A, KEY_B], max_concurrent_per_key=2) as u:
        with sdk(u, KEY_A) as client:
            client.chat.completions.create(model=MODEL, messages=ASK)
        httpx.get(u + "/v1/models", headers=auth_header(WRONG))
    assert f"2 API key(s) ({', '.join(sorted([key_id(KEY_A), key_id(KEY_B)]))})" in caplog.text
    assert "at most 2 requests in flight per key" in caplog.text
    for secret in (KEY_A, KEY_B, WRONG):
        assert secret not in caplog.text


# ------------------------------------------------------------------------------------------------
# The real process: keys from a flag and a file, two worker processes
# ------------------------------------------------------------------------------------------------


def test_tgi_key_is_sent_to_tgi_as_a_bearer_token(tgi: FakeTGI) -> None:
    """Every request to TGI carries the key: the generations (/generate, /generate_stream) and the control
    routes (/health, /info)."""
    tgi.config.api_key = TGI_KEY
    try:
        with gateway(tgi, tgi_api_key=TGI_KEY) as url, sdk(url, "unused") as client:
            start = len(tgi.requests)
            answer = client.chat.completions.create(model=MODEL, messages=ASK)
            assert answer.choices[0].message.content == "It is sunny."
            chunks = client.chat.completions.create(model=MODEL, messages=ASK, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "It is sunny."
            assert httpx.get(url + "/health").status_code == 200
            seen = tgi.requests[start:]
    finally:
        tgi.config.api_key = None
    assert {r.path for r in seen} >= {"/generate", "/generate_stream", "/health"}
    assert {r.headers.get("authorization") for r in seen} == {f"Bearer {TGI_KEY}"}


def test_keys_from_flag_and_file_in_worker_processes(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": V31_TEMPLATE}))
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# rotated 2024-06\n{KEY_B}\n")
    with FakeTGI(script=TEXT) as tgi:
        proc, url = start_gateway("--model", str(tmp_path), "--served-model-name", MODEL, "--endpoint", tgi.url,
                                  "--api-key", KEY_A, "--api-key-file", str(key_file),
                                  "--max-concurrent-per-key", "4", "--workers", "2", "--shutdown-grace", "2")  # fmt: skip
        try:
            for key in (KEY_A, KEY_B, KEY_A, KEY_B):
                with sdk(url, key) as client:
                    assert (
                        client.chat.completions.create(model=MODEL, messages=ASK).choices[0].message.content
                    )
            with sdk(url, WRONG) as client, pytest.raises(openai.AuthenticationError):
                client.models.list()
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            workers = [Path(f"/proc/{c}/cmdline").read_bytes() for c in children]
            workers = [cmd for cmd in workers if b"spawn_main" in cmd]
            assert len(workers) == 2
            for cmd in workers:
                assert KEY_A.encode() not in cmd and KEY_B.encode() not in cmd
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert out.count(f"2 API key(s) ({', '.join(sorted([key_id(KEY_A), key_id(KEY_B)]))})") == 2, out
    assert KEY_A not in out and KEY_B not in out and WRONG not in out
