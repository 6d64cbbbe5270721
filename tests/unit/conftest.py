"""Fixtures shared by the unit tests."""

import os
from pathlib import Path

import pytest


@pytest.fixture
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the caller's WORKER_* variables and config/worker.toml out of the settings."""
    for name in list(os.environ):
        if name.upper().startswith("WORKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
