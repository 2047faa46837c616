"""LoRA adapters as models, end to end: the official openai SDK → the gateway on a real socket → the TGI double
started with the same adapters (its ``LORA_ADAPTERS``). `/v1/models` lists the base model and each adapter
with its parent; a chat naming an adapter reaches TGI with its ``adapter_id``; any other name is a 404, never
TGI's silent fall-back to the base model."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.serve import serve
from tests.fakes.tgi import EOT, FakeTGI, tokens
from tgi_gateway.prompting import Template, Version
from tgi_gateway.server.app import create_app
from tgi_gateway.settings import Settings

MODEL = "functionary-test"
ADAPTERS = ("org/chat-lora@v2", "sql=/adapters/sql")  # a hub adapter at a revision, a local one
ASK = [{"role": "user", "content": "How many orders?"}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI(script=tokens("It", " is", " 42", ".", EOT), lora_adapters=ADAPTERS) as double:
        yield double


@pytest.fixture(scope="module")
def url(tgi: FakeTGI) -> Iterator[str]:
    settings = Settings(model="/models/functionary", served_model_name=MODEL, endpoint=tgi.url,
                        lora_adapters=",".join(ADAPTERS))  # fmt: skip
    with serve(create_app(settings, Template(Version.V3_LLAMA31))) as address:
        yield address


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


def test_models_lists_the_base_model_and_each_adapter_with_its_parent(client: openai.OpenAI) -> None:
    cards = [m.model_dump() for m in client.models.list()]
    assert [(c["id"], c["parent"], c["root"]) for c in cards] == [
        (MODEL, None, "/models/functionary"),
        ("org/chat-lora", MODEL, "org/chat-lora"),
        ("sql", MODEL, "/adapters/sql"),
    ]
    assert {(c["object"], c["owned_by"]) for c in cards} == {("model", "tgi-gateway")}
    for name in ("sql", "org/chat-lora"):  # the SDK sends org%2Fchat-lora
        assert client.models.retrieve(name).model_dump() == next(c for c in cards if c["id"] == name)
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("org/chat-lora@v2")  # the entry is not the name: TGI's adapter_id is the id
    assert missing.value.code == "model_not_found"


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("model", ["sql", "org/chat-lora"])
def test_a_chat_naming_an_adapter_is_sent_with_its_adapter_id(
    tgi: FakeTGI, client: openai.OpenAI, model: str, stream: bool
) -> None:
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=ASK, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert {c.model for c in chunks} == {model}, "every chunk names the adapter"
    else:
        answer = client.chat.completions.create(model=model, messages=ASK)
        text = answer.choices[0].message.content
        assert answer.model == model
    assert text == "It is 42."
    gen = tgi.last_generation
    assert (gen.route, gen.parameters["adapter_id"], gen.adapter) == (
        "generate_stream" if stream else "generate", model, model,
    )  # fmt: skip


def test_the_base_model_sends_no_adapter_id(tgi: FakeTGI, client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=ASK)
    assert answer.model == MODEL
    assert "adapter_id" not in tgi.last_generation.parameters and tgi.last_generation.adapter is None


@pytest.mark.parametrize("name", ["other", "org/chat-lora@v2", "/models/functionary", "SQL"])
def test_any_other_name_is_a_404_before_tgi(tgi: FakeTGI, client: openai.OpenAI, name: str) -> None:
    """TGI would answer an unknown adapter_id with the base model, silently: the gateway never sends one."""
    before = len(tgi.generations)
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model=name, messages=ASK)
    assert (refused.value.code, refused.value.param) == ("model_not_found", "model")
    assert len(tgi.generations) == before


def test_metrics_count_requests_by_adapter(client: openai.OpenAI, url: str) -> None:
    def requests_total(model: str) -> float:
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
            for s in family.samples
        }
        labels = frozenset({"route": CHAT, "status": "200", "model": model}.items())
        return samples.get(("tgi_gateway_requests_total", labels), 0.0)

    before = requests_total("sql"), requests_total("other")
    client.chat.completions.create(model="sql", messages=ASK)
    assert (requests_total("sql"), requests_total("other")) == (before[0] + 1, before[1])


def test_an_adapter_cannot_take_the_models_name_nor_appear_twice() -> None:
    with pytest.raises(ValueError, match="the adapter name 'fn' is the model's name"):
        Settings(model="org/m", served_model_name="fn", lora_adapters="a,fn=/p")
    with pytest.raises(ValueError, match="the adapter name 'org/m' is the model's name"):
        Settings(model="org/m", lora_adapters=["org/m@v1"])
    with pytest.raises(ValueError, match="the adapter name 'a' is given more than once"):
        Settings(model="org/m", lora_adapters=["a", "a=/p"])
