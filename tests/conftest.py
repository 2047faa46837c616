"""Fixtures shared by the test folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gateway_process import write_model_dir


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory the CLI detects as Functionary v3-llama3.1."""
    return write_model_dir(tmp_path)
