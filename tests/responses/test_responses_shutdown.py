"""A Responses stream cut at the end of the shutdown grace ends as a failed response (``response.failed``,
the route's own end of a broken stream, with the next ``sequence_number``), then the end of its body — not the
chat route's ``data: {"error": …}``, which the SDK would raise as a chat error. A real gateway process,
SIGTERM, the TGI double generating slowly behind it, the official SDK reading the stream."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import openai

from tests.fakes.tgi import EOT, FakeTGI, Pause
from tests.gateway_process import start_gateway

SLOW = [item for i in range(100) for item in (f" w{i}", Pause(0.1))]  # 10 s: outlasts the grace
MESSAGE = "The gateway is shutting down: this answer was cut when its shutdown grace period ended; retry the request."


def test_a_responses_stream_cut_by_the_shutdown_ends_as_a_failed_response(model_dir: Path) -> None:
    events: list[Any] = []
    failure: list[BaseException] = []

    def read(url: str) -> None:
        try:
            with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=20) as client:
                events.extend(client.responses.create(model="fn", input="slow", stream=True))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    with FakeTGI(script=lambda inputs, parameters: [*SLOW, EOT]) as tgi:
        proc, url = start_gateway("--model", str(model_dir), "--served-model-name", "fn", "--endpoint", tgi.url,
                                  "--shutdown-grace", "1")  # fmt: skip
        try:
            reader = threading.Thread(target=read, args=(url,), daemon=True)
            reader.start()
            assert tgi.wait_until(lambda: tgi.streams_open == 1 and len(tgi.generations[0].tokens) >= 3, 10)
            proc.send_signal(signal.SIGTERM)
            reader.join(15)
            out, _ = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert not failure, failure
    assert [e.sequence_number for e in events] == list(range(len(events))), "numbered without a gap"
    assert any(e.type == "response.output_text.delta" for e in events)
    last = events[-1]
    assert last.type == "response.failed", [e.type for e in events[-3:]]
    assert last.response.status == "failed" and last.response.error.message == MESSAGE
    assert events[-2].type == "response.output_item.done" and events[-2].item.status == "incomplete"
    assert proc.returncode == 0 and "Traceback" not in out, out
