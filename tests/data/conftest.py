from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, bytes | str], Path]:
    """Write bytes or text (as UTF-8) to tmp_path/name and return the path."""

    def write(name: str, content: bytes | str) -> Path:
        path = tmp_path / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    return write


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data dir, also set as FLEXGR_HOME so nothing touches ~/.cache."""
    directory = tmp_path / "flexgr-home"
    monkeypatch.setenv("FLEXGR_HOME", str(directory))
    return directory
