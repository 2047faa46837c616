"""The stored responses through the real gateway process (``server_tgi.py``) and the official openai SDK:
``responses.retrieve``, ``responses.delete``, ``responses.input_items.list``, on SQLite and on PostgreSQL.

The create route is another part of the gateway: the tests seed the store directly, through ``open_store`` on
the same URL, before and while the gateway runs (which is also two processes sharing one store).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.responses import (
    ResponseFunctionToolCallItem,
    ResponseInputMessageItem,
)

from tests.fakes.serve import serve
from tests.fakes.tgi import FakeTGI
from tests.gateway_process import run_cli, start_gateway, stop_gateway
from tests.postgres_server import PostgresServer
from tgi_gateway.prompting import Template
from tgi_gateway.prompting.types import Version
from tgi_gateway.server.app import create_app
from tgi_gateway.server.auth import key_id
from tgi_gateway.settings import Settings
from tgi_gateway.store import StoredResponse, open_store
from tgi_gateway.store.sql import SCHEMA_VERSION, SQLStore, schema_version

KEY_A = "sk-gw-a-0123456789abcdef0123456789abcdef"
KEY_B = "sk-gw-b-fedcba9876543210fedcba9876543210"
OWNER_A = key_id(KEY_A)
TEMPLATE = Template(Version.V3_LLAMA31)

RESPONSE = {
    "id": "resp_a1", "object": "response", "created_at": 1767225600, "completed_at": 1767225601,
    "status": "completed", "error": None, "incomplete_details": None, "model": "fn", "instructions": None,
    "metadata": {}, "output": [
        {"type": "message", "id": "msg_51c0", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Sunny, 21 °C.", "annotations": [], "logprobs": []}]}],
    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "temperature": 1.0, "top_p": 1.0,
    "max_output_tokens": None, "previous_response_id": None, "text": {"format": {"type": "text"}},
    "truncation": "disabled", "store": True, "reasoning": {"effort": None, "summary": None}, "user": None,
    "usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
              "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15},
}  # fmt: skip
INPUT_ITEMS = [
    {"id": "msg_in1", "type": "message", "role": "user", "status": "completed",
     "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
    {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "get_weather",
     "arguments": "{\"city\":\"Paris\"}", "status": "completed"},
    {"id": "fco_1", "type": "function_call_output", "call_id": "call_1", "output": "21", "status": "completed"},
    {"id": "msg_in2", "type": "message", "role": "user", "status": "completed",
     "content": [{"type": "input_text", "text": "And tomorrow?"}]},
    {"id": "msg_in3", "type": "message", "role": "developer", "status": "completed",
     "content": [{"type": "input_text", "text": "Be brief."}]},
]  # fmt: skip


def stored(rid: str, owner: str | None = OWNER_A) -> StoredResponse:
    response = {**copy.deepcopy(RESPONSE), "id": rid}
    return StoredResponse(rid, owner, int(time.time()), response, copy.deepcopy(INPUT_ITEMS), [], None)


def seed(url: str, *responses: StoredResponse) -> None:
    async def save() -> None:
        store = await open_store(url, ttl_seconds=3600)
        try:
            for response in responses:
                await store.save(response)
        finally:
            await store.close()

    asyncio.run(save())


@contextmanager
def gateway(model_dir: Path, store_url: str, *args: str) -> Iterator[str]:
    with FakeTGI() as tgi:
        proc, url = start_gateway("--model", str(model_dir), "--served-model-name", "fn", "--endpoint", tgi.url,
                                  "--response-store", store_url, "--api-key", KEY_A, "--api-key", KEY_B, *args)  # fmt: skip
        try:
            yield url
        finally:
            stop_gateway(proc)


def client(url: str, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)


def test_retrieve_delete_and_list_with_the_sdk(model_dir: Path, store_url: str) -> None:
    seed(store_url, stored("resp_before"))
    with gateway(model_dir, store_url) as url:
        seed(store_url, stored("resp_while"))  # a second process writing while the gateway runs
        a, b = client(url), client(url, KEY_B)
        for rid in ("resp_before", "resp_while"):
            got = a.responses.retrieve(rid)
            assert (got.id, got.output_text, got.usage.total_tokens) == (rid, "Sunny, 21 °C.", 15)  # type: ignore[union-attr]
            raw = a.responses.with_raw_response.retrieve(rid)
            assert raw.http_response.json() == {**RESPONSE, "id": rid}, "exactly as stored"

        # three pages, followed by the SDK
        listed = list(a.responses.input_items.list("resp_before", limit=2))
        assert [item.id for item in listed] == [item["id"] for item in reversed(INPUT_ITEMS)]
        first = listed[-1]
        assert isinstance(first, ResponseInputMessageItem) and first.content[0].text == "Weather in Paris?"  # type: ignore[union-attr]
        assert isinstance(listed[-2], ResponseFunctionToolCallItem) and listed[-2].call_id == "call_1"
        ascending = a.responses.input_items.list("resp_before", order="asc", limit=3)
        assert [item.id for item in ascending.data] == ["msg_in1", "fc_1", "fco_1"] and ascending.has_more
        assert [item.id for item in ascending.get_next_page().data] == ["msg_in2", "msg_in3"]
        after = a.responses.input_items.list("resp_before", order="asc", after="fco_1")
        assert [item.id for item in after.data] == ["msg_in2", "msg_in3"] and not after.has_more

        for other in (lambda: b.responses.retrieve("resp_before"), lambda: b.responses.delete("resp_before"),
                      lambda: b.responses.input_items.list("resp_before")):  # fmt: skip
            with pytest.raises(openai.NotFoundError) as hidden:
                other()
            assert hidden.value.body == {  # the same 404 as an unknown id
                "message": "No response found with id 'resp_before'.", "type": "invalid_request_error",
                "param": "response_id", "code": "response_not_found",
            }  # fmt: skip
        assert a.responses.retrieve("resp_before").id == "resp_before", "B's delete did nothing"

        assert a.responses.delete("resp_before") is None
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}) as http:
            answer = http.delete("/v1/responses/resp_while")
            assert (answer.status_code, answer.json()) == (
                200,
                {"id": "resp_while", "object": "response.deleted", "deleted": True},
            )
        for gone in ("resp_before", "resp_while", "resp_never"):
            with pytest.raises(openai.NotFoundError):
                a.responses.retrieve(gone)
            with pytest.raises(openai.NotFoundError):
                a.responses.delete(gone)
            with pytest.raises(openai.NotFoundError):
                a.responses.input_items.list(gone)


def test_bad_queries_are_400s(model_dir: Path, tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'responses.db'}"
    seed(store_url, stored("resp_1"))
    with (
        gateway(model_dir, store_url) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}) as http,
    ):
        items = "/v1/responses/resp_1/input_items"
        for query, param in [({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
                             ({"order": "up"}, "order"), ({"after": "nope"}, "after")]:  # fmt: skip
            answer = http.get(items, params=query)
            assert answer.status_code == 400, (query, answer.text)
            assert answer.json()["error"]["param"] == param, answer.json()
        assert http.get(items, params={"limit": 100}).status_code == 200
        answer = http.get("/v1/responses/resp_1", params={"stream": "true"})
        assert (answer.status_code, answer.json()["error"]["param"]) == (400, "stream")
        assert http.get("/v1/responses/resp_1", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_responses_survive_a_restart_and_are_shared_by_workers(model_dir: Path, store_url: str) -> None:
    seed(store_url, *(stored(f"resp_{n}") for n in range(8)))
    with gateway(model_dir, store_url) as url:
        client(url).responses.delete("resp_0")
    with gateway(model_dir, store_url, "--workers", "2") as url:
        a = client(url)
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve("resp_0")
        for n in range(1, 8):  # whichever worker answers, it sees the one store
            assert a.responses.retrieve(f"resp_{n}").id == f"resp_{n}"
            a.responses.delete(f"resp_{n}")
            with pytest.raises(openai.NotFoundError):
                a.responses.retrieve(f"resp_{n}")


def test_a_lost_database_is_a_503_until_it_is_back(postgres: PostgresServer) -> None:
    """Through the app's error handling: 503 `store_unavailable` with Retry-After (the SDK retries it), and
    answers again as soon as PostgreSQL is back (its connections are checked before use)."""
    store_url = postgres.new_database()
    seed(store_url, stored("resp_1", owner=None))
    with FakeTGI() as tgi:
        settings = Settings(model="fn", endpoint=tgi.url, response_store=store_url)
        with serve(create_app(settings, TEMPLATE)) as url, httpx.Client(base_url=url) as http:
            assert http.get("/v1/responses/resp_1").status_code == 200
            postgres.stop()
            try:
                answer = http.get("/v1/responses/resp_1")
                assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
                assert answer.json()["error"] == {
                    "message": "The response store is unavailable; retry shortly.", "type": "server_error",
                    "param": None, "code": "store_unavailable",
                }  # fmt: skip
                assert http.delete("/v1/responses/resp_1").status_code == 503
            finally:
                postgres.start_again()
            assert http.get("/v1/responses/resp_1").json()["id"] == "resp_1"


class OneResponse:
    """A store double holding one response (the seam: a store set as app.state.store before the app starts)."""

    def __init__(self) -> None:
        self.closed = False

    async def save(self, stored: StoredResponse) -> None:
        raise AssertionError("not called by the retrieval routes")

    async def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        return stored("resp_given", owner=None) if response_id == "resp_given" and owner is None else None

    async def delete(self, response_id: str, owner: str | None) -> bool:
        return False

    async def close(self) -> None:
        self.closed = True


def test_a_store_set_before_the_app_starts_is_used_as_it_is(data_home: Path) -> None:
    given = OneResponse()
    with FakeTGI() as tgi:
        app = create_app(Settings(model="fn", endpoint=tgi.url, data_dir=data_home / "seam"), TEMPLATE)
        app.state.store = given
        with serve(app) as url, httpx.Client(base_url=url) as http:
            assert http.get("/v1/responses/resp_given").json()["id"] == "resp_given"
            assert http.get("/v1/responses/resp_other").status_code == 404
    assert app.state.store is given and not given.closed, "its owner closes it"
    assert not (data_home / "seam").exists(), "no store of the settings was opened"


def test_an_app_opens_and_closes_its_store_each_time_it_is_served(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'responses.db'}"
    seed(store_url, stored("resp_1", owner=None))
    with FakeTGI() as tgi:
        app = create_app(Settings(model="fn", endpoint=tgi.url, response_store=store_url), TEMPLATE)
        for _ in range(2):
            with serve(app) as url, httpx.Client(base_url=url) as http:
                assert http.get("/v1/responses/resp_1").status_code == 200
            assert getattr(app.state, "store", None) is None, "closed and forgotten at exit"


def test_without_keys_responses_have_no_owner(model_dir: Path, tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'responses.db'}"
    seed(store_url, stored("resp_open", owner=None), stored("resp_keyed", owner=OWNER_A))
    with FakeTGI() as tgi:
        proc, url = start_gateway(
            "--model", str(model_dir), "--endpoint", tgi.url, "--response-store", store_url
        )
        try:
            anyone = client(url, "anything")
            assert anyone.responses.retrieve("resp_open").id == "resp_open"
            with pytest.raises(openai.NotFoundError):
                anyone.responses.retrieve("resp_keyed")
        finally:
            stop_gateway(proc)


def test_the_default_store_is_a_file_in_the_data_directory(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    seed(f"sqlite:///{data / 'responses.db'}", stored("resp_1", owner=None))
    with FakeTGI() as tgi:
        proc, url = start_gateway("--model", str(model_dir), "--endpoint", tgi.url, "--data-dir", str(data))
        try:
            assert client(url).responses.retrieve("resp_1").id == "resp_1"
        finally:
            stop_gateway(proc)


def test_a_store_with_a_newer_schema_stops_the_gateway(model_dir: Path, store_url: str) -> None:
    async def bump() -> None:
        store = await open_store(store_url, ttl_seconds=None)
        assert isinstance(store, SQLStore)
        async with store.engine.begin() as conn:
            await conn.execute(schema_version.update().values(version=SCHEMA_VERSION + 1))
        await store.close()

    asyncio.run(bump())
    done = run_cli("--model", str(model_dir), "--no-launch", "--response-store", store_url)
    assert done.returncode == 2, done.stderr
    assert f"has schema version {SCHEMA_VERSION + 1}, written by a newer tgi-gateway" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_an_unusable_store_url_stops_the_gateway(model_dir: Path) -> None:
    done = run_cli("--model", str(model_dir), "--no-launch", "--response-store", "mysql://db/gw")
    assert done.returncode == 2
    assert "error: --response-store: the response store must be a sqlite:///PATH or postgresql" in done.stderr
    done = run_cli("--model", str(model_dir), "--no-launch", "--response-ttl", "-1")
    assert done.returncode == 2 and "--response-ttl" in done.stderr
