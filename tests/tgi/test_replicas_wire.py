"""tgi_gateway.tgi.client over several TGI doubles on loopback addresses (127.0.0.2, 127.0.0.3, …) and real
sockets: spread, failover before any response (refused, 503), never a re-send after the first token, passive
and active ejection and re-admission, a replica stopped mid-run, a host name's addresses as replicas (a test
resolver, never real DNS), /info's narrowest limits and /health."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any, Self

import pytest

from tests.fakes.tgi import Drop, FakeTGI, Gate, tokens
from tgi_gateway.errors import GatewayError, TGIProtocolError, TGIUnavailableError
from tgi_gateway.tgi.client import StreamEnd, TGIClient
from tgi_gateway.tgi.replicas import affinity_key

pytestmark = pytest.mark.anyio

SETTINGS = {
    "connect_timeout": 2.0,
    "first_token_timeout": 5.0,
    "read_timeout": 5.0,
    "request_timeout": 30.0,
    "connect_retries": 3,
    "health_interval": 0,  # no probe loop unless a test asks for one
}
SCRIPT = tokens("Hel", "lo", "<|eot_id|>")


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Recorder:
    """A ReplicaEvents that records: attempts and in flight per replica, failovers, the last ejection state."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.failovers: Counter[str] = Counter()
        self.ejections: dict[str, bool] = {}

    def request(self, url: str) -> None:
        self.requests[url] += 1
        self.in_flight[url] += 1

    def done(self, url: str) -> None:
        self.in_flight[url] -= 1

    def failover(self, url: str) -> None:
        self.failovers[url] += 1

    def ejected(self, url: str, ejected: bool) -> None:
        self.ejections[url] = ejected


@contextlib.contextmanager
def doubles(n: int, *, port: int = 0, first: int = 2, **config: Any) -> Iterator[list[FakeTGI]]:
    """``n`` TGI doubles on 127.0.0.<first>, … all on one port (the first one's, ephemeral unless given)."""
    started: list[FakeTGI] = []
    try:
        for i in range(n):
            tgi = FakeTGI(SCRIPT, host=f"127.0.0.{first + i}", port=port, **config).start()
            port = tgi.port
            started.append(tgi)
        yield started
    finally:
        for tgi in started:
            tgi.stop()


def free_port(host: str) -> int:
    """A port nothing listens on at ``host`` (connections are refused)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def client_to(urls: list[str], **settings: Any) -> TGIClient:
    return TGIClient(urls, **{**SETTINGS, **settings})


async def stream(client: TGIClient, key: int | None = None) -> list:
    async with client.generate_stream("Hi", {"details": True}, affinity=key) as events:
        return [item async for item in events]


def served(tgi: FakeTGI) -> int:
    return len(tgi.generations)


async def test_requests_spread_evenly_over_the_replicas() -> None:
    with doubles(4, token_delay=0.002) as tgis:
        async with client_to([t.url for t in tgis]) as client:
            limit = asyncio.Semaphore(16)

            async def one() -> None:
                async with limit:
                    assert isinstance((await stream(client))[-1], StreamEnd)

            await asyncio.gather(*(one() for _ in range(400)))
            assert [r.in_flight for r in client.balancer.live] == [0, 0, 0, 0]
    shares = [served(t) / 100 for t in tgis]
    assert sum(served(t) for t in tgis) == 400
    assert all(0.8 < share < 1.2 for share in shares), shares


async def test_a_refused_connection_fails_over_and_ejects_the_replica() -> None:
    dead = f"http://127.0.0.6:{free_port('127.0.0.6')}"
    events = Recorder()
    with doubles(1) as (live,):
        async with client_to([dead, live.url], events=events, eject_base=60) as client:
            for _ in range(20):
                assert isinstance((await stream(client))[-1], StreamEnd)
                assert (await client.generate("Hi", {"details": True})).generated_tokens == 3
            refused = client.balancer.live[0]
            assert refused.failovers == events.failovers[dead] >= 1
            assert refused.failovers == 1  # ejected for 60 s after its first failure: never tried again
            assert events.ejections == {dead: True}
            assert events.in_flight[dead] == events.in_flight[live.url] == 0
    assert served(live) == 40


async def test_every_replica_refusing_is_a_503_within_the_attempts() -> None:
    urls = [f"http://127.0.0.{i}:{free_port(f'127.0.0.{i}')}" for i in (6, 7)]
    events = Recorder()
    async with client_to(urls, events=events) as client:
        with pytest.raises(TGIUnavailableError) as info:
            await stream(client)
        assert "not reachable" in info.value.message
        assert sum(events.requests.values()) == 3  # the attempt budget, over both replicas
        assert set(events.requests) == set(urls)
        assert all(r.in_flight == 0 for r in client.balancer.live)


class Answer503:
    """A server that answers every request 503 (an overloaded or restarting replica behind a proxy)."""

    def __init__(self, host: str) -> None:
        self.host, self.hits = host, 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Self:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    self.hits += 1
                    length = next(
                        (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                         if line.startswith(b"content-length:")),
                        0,
                    )  # fmt: skip
                    await reader.readexactly(length)
                    body = b"upstream connect error"
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                    await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, self.host, 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{self.host}:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_503_before_the_first_token_is_sent_to_another_replica() -> None:
    events = Recorder()
    with doubles(1) as (live,):
        async with Answer503("127.0.0.7") as busy, client_to([busy.url, live.url], events=events) as client:
            for _ in range(10):
                assert isinstance((await stream(client))[-1], StreamEnd)
            await asyncio.sleep(
                1.1
            )  # the ejection (1 s) is over: the replica is tried again, fails over again
            for _ in range(10):
                assert (await client.generate("Hi", {"details": True})).generated_tokens == 3
            assert busy.hits == events.failovers[busy.url] == 2
            assert client.balancer.live[0].failures == 2  # back-off doubled
    assert served(live) == 20


async def test_one_replica_answering_503_is_the_503_as_before() -> None:
    async with Answer503("127.0.0.7") as busy, client_to([busy.url]) as client:
        with pytest.raises(TGIUnavailableError):
            await stream(client)
        assert busy.hits == 1  # not retried: there is nowhere else to go


async def test_a_stream_that_fails_after_its_first_token_is_never_sent_again() -> None:
    with doubles(2) as tgis:
        for tgi in tgis:
            tgi.script = [*tokens("Hel"), Drop()]
        async with client_to([t.url for t in tgis]) as client:
            items: list = []
            with pytest.raises(TGIProtocolError):
                async with client.generate_stream("Hi", {"details": True}) as events:
                    async for item in events:
                        items.append(item)
            assert [i.text for i in items] == ["Hel"]
            assert [r.failovers for r in client.balancer.live] == [0, 0]
    assert sum(served(t) for t in tgis) == 1


async def test_an_unhealthy_replica_is_ejected_by_the_probe_and_readmitted_when_healthy() -> None:
    events = Recorder()
    with doubles(2) as (a, b):
        async with client_to([a.url, b.url], events=events, health_interval=0.05) as client:
            b.config.healthy = False
            assert await b.wait_until_async(lambda: events.ejections.get(b.url) is True, 3)
            before = served(b)
            for _ in range(30):
                await stream(client)
            assert served(b) == before  # ejected: nothing sent to it
            assert await client.health()  # ready while one replica is
            b.config.healthy = True
            assert await b.wait_until_async(lambda: events.ejections.get(b.url) is False, 3)
            for _ in range(30):
                await stream(client)
            assert served(b) > before
            a.config.healthy = b.config.healthy = False
            assert not await client.health()


async def test_a_replica_stopped_mid_run_loses_only_its_started_streams_and_comes_back() -> None:
    events = Recorder()
    with doubles(3, token_delay=0.005) as tgis:
        victim = tgis[1]
        urls = [t.url for t in tgis]
        async with client_to(urls, events=events, health_interval=0.05) as client:
            failed_before_first_token: list[BaseException] = []
            cut_mid_stream = 0

            async def one() -> None:
                nonlocal cut_mid_stream
                started = False
                try:
                    async with client.generate_stream("Hi", {"details": True}) as items:
                        async for _ in items:
                            started = True
                except GatewayError as exc:
                    if started:
                        cut_mid_stream += 1
                    else:
                        failed_before_first_token.append(exc)

            async def load(n: int) -> None:
                limit = asyncio.Semaphore(12)

                async def bounded() -> None:
                    async with limit:
                        await one()

                await asyncio.gather(*(bounded() for _ in range(n)))

            running = asyncio.ensure_future(load(300))
            await asyncio.sleep(0.1)
            await asyncio.to_thread(victim.stop)  # killed mid-run
            await running
            assert failed_before_first_token == []
            assert events.ejections.get(victim.url) is True
            # it returns on the same address and port: the probe re-admits it, requests reach it again
            host, port = victim.host, victim.port
            back = FakeTGI(SCRIPT, host=host, port=port).start()
            try:
                assert await back.wait_until_async(lambda: events.ejections.get(victim.url) is False, 3)
                await load(60)
                assert served(back) > 0
            finally:
                back.stop()


class FakeResolver:
    """aiohttp's resolver interface, answering from a table the test changes (never real DNS)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls = 0

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        self.calls += 1
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        return [
            {"hostname": host, "host": address, "port": port, "family": family, "proto": 0, "flags": 0}
            for address in self.table[host]
        ]

    async def close(self) -> None:
        pass


async def test_a_name_with_several_addresses_is_one_replica_per_address_kept_up_to_date() -> None:
    with doubles(3, token_delay=0.001) as (a, b, c):
        port = a.port
        resolver = FakeResolver({"tgi.test": ["127.0.0.2", "127.0.0.3"]})
        name = f"http://tgi.test:{port}"
        async with client_to([name], resolver=resolver, resolve_interval=0.05) as client:
            balancer = client.balancer

            async def replicas_are(*urls: str) -> bool:
                return await a.wait_until_async(lambda: [r.url for r in balancer.live] == list(urls), 3)

            assert await replicas_are(a.url, b.url)
            for _ in range(40):
                await stream(client)
            assert served(a) > 0 and served(b) > 0 and served(c) == 0
            # a stream in flight on a replica that disappears from the name finishes there
            gate = Gate()
            a.script = [*tokens("Hel"), gate, *tokens("lo", "<|eot_id|>")]
            b.script = [*tokens("Hel"), gate, *tokens("lo", "<|eot_id|>")]
            held = [client.generate_stream("Hi", {"details": True}) for _ in range(2)]
            opened = [await h.__aenter__() for h in held]
            firsts = [await s.batch() for s in opened]
            resolver.table["tgi.test"] = ["127.0.0.3", "127.0.0.4"]
            assert await replicas_are(b.url, c.url)
            # two streams, two replicas: the second went to the idle one, so one of them is held on `a`
            assert [r.url for r in balancer.draining] == [a.url] and balancer.draining[0].in_flight == 1
            gate.open()
            for s in opened:
                rest = [item async for item in s]
                assert isinstance(rest[-1], StreamEnd)
            for h in held:
                await h.__aexit__(None, None, None)
            assert firsts and balancer.draining == []  # drained, then forgotten
            a.script = b.script = SCRIPT
            before_a = served(a)
            for _ in range(40):
                await stream(client)
            assert served(a) == before_a and served(c) > 0  # no new request to the drained one
            # one address: the URL as given (aiohttp resolves it through the same resolver)
            resolver.table["tgi.test"] = ["127.0.0.4"]
            assert await replicas_are(name)
            before_c = served(c)
            await stream(client)
            assert served(c) == before_c + 1
            # the name stops resolving: the replicas are kept
            del resolver.table["tgi.test"]
            calls = resolver.calls
            assert await a.wait_until_async(lambda: resolver.calls > calls + 1, 3)
            assert [r.url for r in balancer.live] == [name]


async def test_the_limits_are_the_narrowest_of_the_replicas_answering() -> None:
    with doubles(2) as (a, b):
        a.config.max_input_tokens, a.config.max_total_tokens = 1000, 4000
        b.config.max_input_tokens, b.config.max_total_tokens = 3000, 2000
        async with client_to([a.url, b.url, f"http://127.0.0.6:{free_port('127.0.0.6')}"]) as client:
            info = await client.info()
            assert (info.max_input_tokens, info.max_total_tokens) == (1000, 2000)
            assert [r.info.max_input_tokens for r in client.balancer.live[:2]] == [1000, 3000]
            assert client.balancer.live[2].info is None


async def test_requests_with_one_prefix_prefer_one_replica() -> None:
    key = affinity_key([{"role": "system", "content": "You are helpful."}], [{"type": "function"}])
    with doubles(4) as tgis:
        async with client_to([t.url for t in tgis]) as client:
            for _ in range(40):
                await stream(client, key)
            home = client.balancer.owner(key)  # type: ignore[arg-type]
    assert [served(t) for t in tgis if t.url == home.url] == [40]


@pytest.mark.parametrize("fault", ["cut", "overloaded"])
async def test_a_stream_that_fails_before_its_first_event_goes_to_another_replica(fault: str) -> None:
    events = Recorder()
    with doubles(2) as (bad, good):
        if fault == "cut":
            bad.script = [Drop()]  # the 200 head, then the connection reset before any event
        else:
            bad.config.max_concurrent_requests = 0  # "Model is overloaded" as the first event
        rng = random.Random(4)  # seeded: the bad replica is drawn first several times
        async with client_to([bad.url, good.url], events=events, eject_base=60, rng=rng) as client:
            for _ in range(10):
                assert [i.text for i in (await stream(client))[:-1]] == ["Hel", "lo", "<|eot_id|>"]
            failovers = client.balancer.live[0].failovers
            assert failovers == events.failovers[bad.url] >= 1
            # a cut ejects the replica (tried once only); an overloaded one is not ejected, only avoided
            assert (failovers == 1) is (fault == "cut")
    assert served(good) == 10
