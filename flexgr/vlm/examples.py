"""Versioned examples: a pointer into the tier instead of the history, and the files they live in.

One row per request::

    request_id, user, request_ts          int64
    history_version                       int64  tier version the request saw
    history_start_ts, history_end_ts      int64  time range of the immutable part (inclusive;
                                                 start > end when it is empty)
    history_len                           int64  events in the whole history (both parts)
    checksum                              uint64 of the whole history (flexgr.vlm.hashing)
    tail_checksums                        list<uint64> of its last 256, 512, ... events
    recent_item, recent_ts, recent_action list   the recent-buffer snapshot, oldest first
    recent_pos                            list<int32> each one's position in the history
    recent_<side>                         list   side features of the snapshot
    candidates, candidate_ts, labels      list   the request's impressions and action bits

Example files are append-only parts ``part-000000.parquet``, ``part-000001.parquet``, ...
each written whole and renamed into place, so a reader (a streaming trainer tailing the
directory, or a backfill job listing it) sees complete files only. ``_CLOSED`` marks the end
of a log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flexgr.atomic import atomic_write_text
from flexgr.data.errors import DataError
from flexgr.vlm.files import ReadStats, TrackedFile, parquet_bytes, read_footer, write_file

POINTER_COLUMNS = (
    "request_id",
    "user",
    "request_ts",
    "history_version",
    "history_start_ts",
    "history_end_ts",
    "history_len",
    "checksum",
    "tail_checksums",
)
CANDIDATE_COLUMNS = ("candidates", "candidate_ts", "labels")
CLOSED = "_CLOSED"
_PART = re.compile(r"^part-(\d{6})\.parquet$")


def lists(offsets: np.ndarray, values: np.ndarray, kind: pa.DataType) -> pa.Array:
    """A list column from CSR offsets and flat values."""
    flat = pa.array(values, type=kind)
    if offsets[-1] >= 2**31:  # a big fat-row table: 32-bit offsets would wrap
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), flat)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), flat)


def list_parts(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n + 1], flat values) of a list column, offsets starting at 0."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


@dataclass(frozen=True)
class ExampleChunk:
    """Rows of one example file (projected), with where they came from for error messages."""

    table: pa.Table
    path: str
    first_row: int  # 0-based row of the file the chunk starts at


@dataclass(frozen=True)
class ExampleRows:
    """A batch worth of example rows and, per row, the file and 0-based row it came from."""

    table: pa.Table
    paths: np.ndarray  # object [n]
    rows: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return self.table.num_rows

    @staticmethod
    def of_chunk(chunk: ExampleChunk) -> ExampleRows:
        n = chunk.table.num_rows
        paths = np.full(n, chunk.path, dtype=object)
        return ExampleRows(chunk.table, paths, chunk.first_row + np.arange(n, dtype=np.int64))

    @staticmethod
    def concat(parts: Sequence[ExampleRows]) -> ExampleRows:
        return ExampleRows(
            pa.concat_tables([part.table for part in parts]),
            np.concatenate([part.paths for part in parts]),
            np.concatenate([part.rows for part in parts]),
        )

    def slice(self, start: int, length: int) -> ExampleRows:
        stop = start + length
        return ExampleRows(
            self.table.slice(start, length), self.paths[start:stop], self.rows[start:stop]
        )

    def take(self, index: np.ndarray) -> ExampleRows:
        return ExampleRows(self.table.take(pa.array(index)), self.paths[index], self.rows[index])

    def error(self, row: int, problem: str) -> DataError:
        """A one-line error naming the example (request, user, file and row)."""
        column = self.table.column
        request = column("request_id")[row].as_py()
        user, request_ts = column("user")[row].as_py(), column("request_ts")[row].as_py()
        return DataError(
            f"request {request} (user {user}, request_ts {request_ts}): {problem}",
            path=self.paths[row], line=int(self.rows[row]) + 1, where="row",
        )  # fmt: skip


class ExampleLog:
    """Appends example parts to ``directory`` atomically (one writer per directory)."""

    def __init__(self, directory: str | Path, rows_per_group: int = 4096) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rows_per_group = rows_per_group
        if (self.directory / CLOSED).exists():
            raise DataError("example log is closed", path=self.directory)
        self._next = 1 + max((int(m.group(1)) for m in _parts(self.directory)), default=-1)
        self.bytes_written = 0

    def append(
        self, table: pa.Table, delta_columns: Sequence[str] = (), statistics: Sequence[str] = ()
    ) -> Path:
        path = self.directory / f"part-{self._next:06d}.parquet"
        step = self.rows_per_group
        parts = [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]
        data, _ = parquet_bytes(parts, table.schema, delta_columns, statistics)
        write_file(path, data)
        self._next += 1
        self.bytes_written += len(data)
        return path

    def close(self) -> None:
        atomic_write_text(self.directory / CLOSED, "")


def _parts(directory: Path) -> list[re.Match[str]]:
    matches = (_PART.match(path.name) for path in directory.iterdir())
    return sorted((m for m in matches if m), key=lambda m: int(m.group(1)))


def example_files(directory: str | Path) -> list[Path]:
    """The complete parts of a log, in append order (batch backfill reads these)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("example directory does not exist", path=directory)
    return [directory / m.group(0) for m in _parts(directory)]


def follow(
    directory: str | Path, *, poll_s: float = 0.2, idle_timeout_s: float | None = None
) -> Iterator[Path]:
    """Parts as they are appended (streaming training), until the log is closed.

    ``idle_timeout_s`` bounds the wait for a new part; past it a DataError says the writer
    stalled, rather than hanging a training job forever.
    """
    directory = Path(directory)
    seen = 0
    waited = 0.0
    while True:
        closed = (directory / CLOSED).exists()  # read before listing: no part is missed
        files = example_files(directory) if directory.is_dir() else []
        if len(files) > seen:
            yield from files[seen:]
            seen, waited = len(files), 0.0
            continue
        if closed:
            return
        if idle_timeout_s is not None and waited >= idle_timeout_s:
            raise DataError(f"no new example part for {idle_timeout_s:g} s", path=directory)
        time.sleep(poll_s)
        waited += poll_s


def read_chunks(
    paths: Iterator[Path] | Sequence[Path], columns: Sequence[str], stats: ReadStats
) -> Iterator[ExampleChunk]:
    """Each file's row groups, ``columns`` only, counting the bytes read into ``stats``."""
    for path in paths:
        with TrackedFile(Path(path), stats) as tracked:
            metadata, _ = read_footer(tracked)
            missing = set(columns) - set(metadata.schema.to_arrow_schema().names)
            if missing:
                raise DataError(f"example file has no columns {sorted(missing)}", path=path)
            parquet = pq.ParquetFile(
                tracked, metadata=metadata, pre_buffer=False, page_checksum_verification=True
            )
            row = 0
            for group in range(metadata.num_row_groups):
                try:
                    table = parquet.read_row_group(group, columns=list(columns), use_threads=False)
                except (OSError, pa.ArrowException) as err:
                    raise DataError(f"row group {group}: unreadable ({err})", path=path) from None
                yield ExampleChunk(table, str(path), row)
                row += table.num_rows
