"""The gateway process over two TGI doubles (127.0.0.2, 127.0.0.3), through the official openai SDK, with
``--workers 2`` (the endpoints' round trip through the environment): requests with one prefix stay on one
replica, a replica stopped is failed over and ejected (the per-replica metrics say so), ``/health`` is ready
while one replica is."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.tgi import FakeTGI
from tests.gateway_process import served_gateway, start_gateway, stop_gateway

MODEL = "fn"
ASK = [{"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": "Hi"}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]


def metrics(url: str) -> dict[tuple[str, str], float]:
    """The per-replica samples: (name, replica) → value."""
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, s.labels["replica"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "replica" in s.labels
    }


def test_two_replicas_behind_the_gateway(model_dir) -> None:
    a = FakeTGI(host="127.0.0.2").start()
    b = FakeTGI(host="127.0.0.3", port=a.port).start()
    try:
        proc, url = start_gateway(
            "--model", str(model_dir), "--served-model-name", MODEL, "--no-launch", "--workers", "2",
            "--endpoint", a.url, "--endpoint", b.url, "--health-interval", "30", "--eject-seconds", "30",
            "--log-level", "warning",
        )  # fmt: skip
        try:
            with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=20) as client:
                for n in range(12):  # one prefix (tools + system prompt), one at a time: one replica
                    if n % 2:
                        chunks = list(
                            client.chat.completions.create(
                                model=MODEL, messages=ASK, tools=TOOLS, stream=True
                            )
                        )
                        assert chunks[-1].choices[0].finish_reason == "stop"
                    else:
                        answer = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
                        assert answer.choices[0].message.content
                home, other = (a, b) if a.generations else (b, a)
                assert (len(home.generations), len(other.generations)) == (12, 0)
                seen = metrics(url)  # whichever worker answers: the sum over both
                assert seen[("tgi_gateway_replica_requests_total", home.url)] == 12
                assert seen.get(("tgi_gateway_replica_requests_total", other.url), 0) == 0
                assert seen[("tgi_gateway_replica_in_flight", home.url)] == 0

                home.stop()  # the replica that served the prefix goes away (no probe runs meanwhile: 30 s)
                for _ in range(6):
                    assert client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS).choices
                assert len(other.generations) == 6
                seen = metrics(url)
                assert (
                    1 <= seen[("tgi_gateway_replica_failovers_total", home.url)] <= 2
                )  # once per worker at most
                assert seen[("tgi_gateway_replica_ejected", home.url)] == 1
                assert httpx.get(url + "/health").status_code == 200  # one replica is enough

                other.stop()
                r = httpx.get(url + "/health")
                assert r.status_code == 503 and r.json()["status"] == "unavailable"
                assert a.url in r.json()["error"] and b.url in r.json()["error"]
        finally:
            output = stop_gateway(proc)
        assert proc.returncode == 0, output
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("affinity", [True, False])
def test_the_chat_flow_gives_the_prefix_key_unless_affinity_is_off(affinity: bool) -> None:
    """In process (`create_app`), four replicas: one prefix sent one request at a time stays on one replica with
    affinity, and spreads over them by load alone with `--no-affinity`."""
    doubles = [FakeTGI(host=f"127.0.0.{i}") for i in (2, 3, 4, 5)]
    try:
        port = 0
        for tgi in doubles:
            tgi.port = port
            port = tgi.start().port
        urls = [tgi.url for tgi in doubles]
        with (
            served_gateway(urls, "v3-llama3.1", MODEL, affinity=affinity, health_interval=0) as url,  # type: ignore[arg-type]
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=20) as client,
        ):
            for _ in range(24):
                assert client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS).choices
        served = sorted(len(tgi.generations) for tgi in doubles)
        if affinity:
            assert served == [0, 0, 0, 24]
        else:
            assert served[-1] < 24 and sum(1 for n in served if n) >= 3  # ties drawn at random
    finally:
        for tgi in doubles:
            tgi.stop()
