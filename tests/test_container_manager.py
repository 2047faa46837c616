"""The container manager: launch recipe, pull progress, failure hints (unit); scenarios against the Docker
Engine double through the real docker SDK are further below."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tgi_gateway.container_manager import (
    DEFAULT_IMAGE,
    LaunchSpec,
    PullProgress,
    _hint,
    _split_image,
    is_local_endpoint,
)


def test_launch_recipe_for_a_hub_model(tmp_path: Path) -> None:
    spec = LaunchSpec(
        model="meetkai/functionary-small-v3.2",
        endpoint="http://127.0.0.1:8080",
        hf_cache=tmp_path,
        hf_token="hf_secret",
        revision="main",
        max_input_tokens=4096,
        max_total_tokens=8192,
        quantize="awq",
        extra_args=("--max-batch-prefill-tokens", "4096"),
    )
    assert spec.port == 8080 and spec.name == "tgi-gateway-8080"
    assert spec.command() == [
        "--model-id", "meetkai/functionary-small-v3.2", "--revision", "main", "--max-input-tokens", "4096",
        "--max-total-tokens", "8192", "--quantize", "awq", "--max-batch-prefill-tokens", "4096",
    ]  # fmt: skip
    assert spec.volumes() == {str(tmp_path): {"bind": "/data", "mode": "rw"}}
    assert spec.environment() == {"HF_TOKEN": "hf_secret"}
    assert spec.labels == {
        "tgi-gateway.managed": "true",
        "tgi-gateway.model": "meetkai/functionary-small-v3.2",
        "tgi-gateway.port": "8080",
    }
    assert DEFAULT_IMAGE.rsplit(":", 1)[1][0].isdigit(), "the image is pinned to a release, never latest"


def test_launch_recipe_for_a_local_model_directory(tmp_path: Path) -> None:
    model = tmp_path / "functionary"
    model.mkdir()
    spec = LaunchSpec(model=str(model), endpoint="http://localhost:9000", hf_cache=tmp_path / "cache", revision="x")
    assert spec.command() == ["--model-id", "/model"], "a local directory is mounted; no revision"
    assert spec.volumes()[str(model)] == {"bind": "/model", "mode": "ro"}
    assert spec.port == 9000 and spec.environment() == {}


@pytest.mark.parametrize(
    "gpus,count,ids", [("all", -1, []), ("2", 2, []), ("0,1", 0, ["0", "1"]), ("3", 3, [])]
)
def test_gpu_device_requests(gpus: str, count: int, ids: list[str]) -> None:
    [req] = LaunchSpec(model="m", endpoint="http://127.0.0.1:8080", gpus=gpus).device_requests()
    assert (req["Count"], req["DeviceIDs"], req["Capabilities"]) == (count, ids, [["gpu"]])


@pytest.mark.parametrize(
    "image,repo,tag",
    [
        ("ghcr.io/huggingface/text-generation-inference:3.3.5", "ghcr.io/huggingface/text-generation-inference", "3.3.5"),
        ("localhost:5000/tgi", "localhost:5000/tgi", "latest"),
        ("localhost:5000/tgi:2", "localhost:5000/tgi", "2"),
        ("tgi", "tgi", "latest"),
    ],
)
def test_split_image(image: str, repo: str, tag: str) -> None:
    assert _split_image(image) == (repo, tag)


def test_local_endpoints() -> None:
    assert is_local_endpoint("http://127.0.0.1:8080") and is_local_endpoint("http://localhost:80")
    assert not is_local_endpoint("http://tgi:80") and not is_local_endpoint("https://tgi.example.com")


def test_pull_progress_log_lines_sum_layers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="tgi_gateway.container")
    progress = PullProgress(io.StringIO(), every=0)
    for event in (
        {"status": "Pulling from huggingface/text-generation-inference", "id": "3.3.5"},
        {"status": "Downloading", "progressDetail": {"current": 1_000_000, "total": 4_000_000}, "id": "a"},
        {"status": "Downloading", "progressDetail": {"current": 500_000, "total": 1_000_000}, "id": "b"},
        {"status": "Download complete", "progressDetail": {}, "id": "b"},
    ):
        progress.update(event)
    assert progress.totals == (2_000_000, 5_000_000)
    assert "pulling TGI image: 2.0 MB of 5.0 MB (2 layers)" in caplog.text


def test_pull_progress_bar_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    progress = PullProgress(out)
    progress.update({"status": "Downloading", "progressDetail": {"current": 50, "total": 100}, "id": "a"})
    progress.close()
    assert out.getvalue().startswith("\rpulling TGI image [###############...............]")
    assert out.getvalue().endswith("\n")


@pytest.mark.parametrize(
    "tail,code,oom,fragment",
    [
        ("torch.cuda.OutOfMemoryError: CUDA out of memory.\nError: ShardCannotStart", 1, False, "--max-total-tokens"),
        ("", 137, True, "host memory"),
        ("401 Client Error ... Cannot access gated repo", 1, False, "HF_TOKEN"),
        ("Error: DownloadError\nRepository Not Found for url", 1, False, "check the model id"),
    ],
)
def test_failure_hints(tail: str, code: int, oom: bool, fragment: str) -> None:
    assert fragment in _hint(tail, code, oom, LaunchSpec(model="org/m", endpoint="http://127.0.0.1:8080"))
