"""Unit tests: pure functions and this process's own kernel objects only. No root, no target process, no
ptrace or userfaultfd: ``pytest tests/unit`` runs in seconds as any user."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(autouse=True)
def run_dir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Overrides tests/conftest.py's run_dir: a private WPDUMP_RUN_DIR, without its keeper clean-up (no
    unit test starts a keeper)."""
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("WPDUMP_RUN_DIR", str(d))
    return d
