"""The response store's settings: where the default store is, which URLs are taken, the URL kept secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tgi_gateway.settings import Settings, check_store_url

URL = "postgresql://gateway:s3cret-pw@db.internal:5432/gateway"


@pytest.fixture(autouse=True)
def no_store_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TGI_GATEWAY_DATA_DIR", "TGI_GATEWAY_RESPONSE_STORE", "TGI_GATEWAY_RESPONSE_TTL"):
        monkeypatch.delenv(name, raising=False)


def test_the_default_store_follows_xdg_data_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Settings(model="m").store_url == f"sqlite:///{tmp_path}/tgi-gateway/responses.db"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")  # the XDG rule: only an absolute path counts
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Settings(model="m").store_url == f"sqlite:///{tmp_path}/home/.local/share/tgi-gateway/responses.db"


def test_data_dir_then_response_store_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings(model="m", data_dir="data").store_url == f"sqlite:///{tmp_path}/data/responses.db"
    settings = Settings(model="m", data_dir="data", response_store="sqlite:///elsewhere.db")
    assert settings.store_url == "sqlite:///elsewhere.db", (
        "relative to the working directory, as SQLAlchemy's"
    )


def test_the_ttl_default_is_30_days_and_0_keeps_forever() -> None:
    assert Settings(model="m").store_ttl == 30 * 24 * 3600
    assert Settings(model="m", response_ttl=0).store_ttl is None
    with pytest.raises(ValidationError):
        Settings(model="m", response_ttl=-1)


def test_the_store_url_is_a_secret_that_workers_still_get(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(model="m", response_store=URL)
    assert settings.store_url == URL
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert "s3cret-pw" not in shown
    env = settings.as_environment()
    assert env["TGI_GATEWAY_RESPONSE_STORE"] == URL
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().store_url == URL


@pytest.mark.parametrize(
    "url",
    ["sqlite:///responses.db", "sqlite:////var/lib/x.db", "sqlite+aiosqlite:///x.db", URL,
     "postgres://u@h/db", "postgresql+asyncpg://u@h:1/db", "postgresql:///db?host=/run/postgresql"],
)  # fmt: skip
def test_accepted_urls(url: str) -> None:
    assert check_store_url(url) == url
    assert Settings(model="m", response_store=url).store_url == url


@pytest.mark.parametrize(
    "url,reason",
    [
        ("mysql://u:s3cret-pw@h/db", "must be a sqlite:///PATH or postgresql://HOST/DATABASE URL"),
        ("responses.db", "must be a sqlite:///PATH or postgresql://HOST/DATABASE URL"),
        ("sqlite://", "needs a file path"),
        ("sqlite:///:memory:", "in-memory database would be lost"),
        ("sqlite://host/x.db", "names a file, not a host"),
        ("postgresql://u:s3cret-pw@host", "must name its database"),
    ],
)
def test_refused_urls_say_why_without_the_password(url: str, reason: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(model="m", response_store=url)
    assert reason in str(refused.value) and "s3cret-pw" not in str(refused.value)
