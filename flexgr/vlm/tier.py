"""Reading the immutable history tier: one seek per user range, only the columns asked for.

Each data file holds the events of one user bucket sorted by (user, time, tie key), cut into
stripes (row groups): several short users share a stripe, a long user spans several, newest
last. The per-user index (one row per user and stripe) says which rows of which stripe belong
to a user, so the reader fetches exactly the stripes covering the wanted time range, never a
whole file, and decodes only the projected columns.

Every file is checked when opened (its size and footer CRC against the manifest, so a torn or
swapped file fails here) and every column chunk when read (its CRC, in :class:`TrackedFile`).
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flexgr.data.errors import DataError
from flexgr.vlm.batch import gather_ranges
from flexgr.vlm.files import Chunk, ReadStats, TrackedFile, chunk_layout, read_footer
from flexgr.vlm.manifest import DataFile, Manifest, read_current

INDEX_COLUMNS = ("user", "row_group", "row_start", "rows", "ts_min", "ts_max")


class _OpenFile:
    def __init__(self, root: Path, entry: DataFile, stats: ReadStats) -> None:
        path = root / entry.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError("tier data file is missing", path=path) from None
        if size != entry.bytes:
            raise DataError(
                f"size {size} bytes, the manifest says {entry.bytes} (torn or truncated write)",
                path=path,
            )
        self.tracked = TrackedFile(path, stats)
        try:
            metadata, crc = read_footer(self.tracked)
            if crc != entry.footer_crc32:
                raise DataError("footer checksum differs from the manifest", path=path)
            rows = tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))
            if rows != entry.stripe_rows:
                raise DataError("stripes differ from the manifest", path=path)
        except DataError:
            self.tracked.close()
            raise
        layout = chunk_layout(metadata)
        self.chunks = {
            (group, name): Chunk(group, name, start, length, entry.chunk_crc32[group][index])
            for group, columns in enumerate(layout)
            for index, (name, start, length) in enumerate(columns)
        }
        self.tracked.register(list(self.chunks.values()))
        self.parquet = pq.ParquetFile(
            self.tracked, metadata=metadata, pre_buffer=False, page_checksum_verification=True
        )
        self.path = path

    def read(self, groups: Sequence[int], columns: Sequence[str]) -> pa.Table:
        wanted = [self.chunks[(group, name)] for group in groups for name in columns]
        self.tracked.verified.difference_update((c.row_group, c.column) for c in wanted)
        try:
            table = self.parquet.read_row_groups(
                list(groups), columns=list(columns), use_threads=False
            )
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"stripes {list(groups)}: unreadable ({err})", path=self.path) from None
        self.tracked.verify(wanted)
        return table


class Tier:
    """A read handle on one committed version of the tier (see :mod:`flexgr.vlm.manifest`)."""

    def __init__(
        self, root: Path, manifest: Manifest, stats: ReadStats, cache_stripes: int = 0
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.stats = stats
        self.cache_stripes = cache_stripes
        self._cache: OrderedDict[tuple[int, int, tuple[str, ...]], dict[str, np.ndarray]]
        self._cache = OrderedDict()
        self._open: dict[int, _OpenFile] = {}
        self._lock = threading.Lock()
        self._load_index()

    @classmethod
    def open(
        cls, root: str | Path, *, stats: ReadStats | None = None, cache_stripes: int = 0
    ) -> Tier:
        root = Path(root)
        manifest = read_current(root)
        if manifest is None:
            raise DataError("no committed tier here (never compacted)", path=root)
        return cls(root, manifest, stats or ReadStats(), cache_stripes)

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def watermarks(self) -> tuple[int, ...]:
        return self.manifest.watermarks

    def version_at(self, request_ts: int) -> int:
        """The version a request at ``request_ts`` saw: the last one committed by then."""
        return int(np.searchsorted(np.asarray(self.watermarks), request_ts, side="right"))

    def refresh(self) -> bool:
        """Switch to a newer committed version if there is one; True if it switched."""
        manifest = read_current(self.root)
        if manifest is None or manifest.version == self.version:
            return False
        with self._lock:
            self.close()
            self.manifest = manifest
            self._load_index()
        return True

    def close(self) -> None:
        for handle in self._open.values():
            handle.tracked.close()
        self._open.clear()
        self._cache.clear()

    # ------------------------------------------------------------------ index

    def _load_index(self) -> None:
        parts = []
        for file_id, entry in enumerate(self.manifest.files):
            path = self.root / entry.index_path
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise DataError("tier index file is missing", path=path) from None
            self.stats.add(len(data))
            if len(data) != entry.index_bytes or zlib.crc32(data) != entry.index_crc32:
                raise DataError("index differs from the manifest (torn write?)", path=path)
            table = pq.read_table(pa.BufferReader(data))
            parts.append((file_id, {name: table.column(name).to_numpy() for name in INDEX_COLUMNS}))

        def column(name: str) -> np.ndarray:
            return np.concatenate([part[name] for _, part in parts]) if parts else np.zeros(0, int)

        files = [np.full(len(part["user"]), file_id) for file_id, part in parts]
        users = column("user").astype(np.int64)
        # Stable: keeps each user's stripes in time order (the order the index lists them).
        order = np.argsort(users, kind="stable")
        self._seg_user = users[order]
        self._seg_file = (np.concatenate(files) if files else np.zeros(0, int))[order]
        self._seg_group = column("row_group")[order].astype(np.int64)
        self._seg_start = column("row_start")[order].astype(np.int64)
        self._seg_rows = column("rows")[order].astype(np.int64)
        self.seg_ts_min = column("ts_min")[order].astype(np.int64)
        self.seg_ts_max = column("ts_max")[order].astype(np.int64)

    def segments(self, user: int) -> tuple[int, int]:
        """[first, end) of the user's segments (one per stripe it occupies), oldest first."""
        first = int(np.searchsorted(self._seg_user, user, side="left"))
        return first, int(np.searchsorted(self._seg_user, user, side="right"))

    def segment_rows(self, segments: np.ndarray) -> np.ndarray:
        return self._seg_rows[segments]

    def segment_files(self, segments: np.ndarray) -> np.ndarray:
        return self._seg_file[segments]

    # ------------------------------------------------------------------ reads

    def read_segments(self, segments: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
        """The rows of ``segments`` (in the order given), ``columns`` only."""
        columns = tuple(columns)
        missing = set(columns) - set(self.manifest.columns)
        if missing:
            raise DataError(f"tier has no columns {sorted(missing)}", path=self.root)
        segments = np.asarray(segments, dtype=np.int64)
        files = self._seg_file[segments]
        parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
        # A user's segments live in one file; runs of one file are read with one call.
        cuts = np.flatnonzero(np.diff(files)) + 1
        for run in np.split(segments, cuts) if len(segments) else []:
            with self._lock:
                arrays, offsets = self._stripes(int(self._seg_file[run[0]]), run, columns)
            starts = offsets + self._seg_start[run]
            index = gather_ranges(starts, starts + self._seg_rows[run])
            for name in columns:
                parts[name].append(arrays[name][index])
        return {
            name: np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
            for name, chunks in parts.items()
        }

    def _stripes(
        self, file_id: int, run: np.ndarray, columns: tuple[str, ...]
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The stripes ``run`` touches, concatenated, and where each segment's stripe starts."""
        groups, position = np.unique(self._seg_group[run], return_inverse=True)
        cached = [self._cache.get((file_id, int(group), columns)) for group in groups]
        for group, hit in zip(groups, cached, strict=True):
            if hit is not None:  # most recently used, before new stripes evict anything
                self._cache.move_to_end((file_id, int(group), columns))
        wanted = [int(group) for group, hit in zip(groups, cached, strict=True) if hit is None]
        fresh: dict[int, dict[str, np.ndarray]] = {}
        if wanted:
            table = self._file(file_id).read(wanted, columns)
            arrays = {name: table.column(name).to_numpy() for name in columns}
            rows = self.manifest.files[file_id].stripe_rows
            offset = 0
            for group in wanted:
                fresh[group] = {k: v[offset : offset + rows[group]] for k, v in arrays.items()}
                offset += rows[group]
                self._remember((file_id, group, columns), fresh[group])
            if len(wanted) == len(groups):
                starts = np.r_[0, np.cumsum([rows[g] for g in wanted])[:-1]]
                return arrays, starts[position]
        stripes = [hit if hit is not None else fresh[int(g)] for g, hit in zip(groups, cached)]
        sizes = np.array([len(stripe[columns[0]]) for stripe in stripes], dtype=np.int64)
        starts = np.r_[0, np.cumsum(sizes)[:-1]]
        merged = {name: np.concatenate([stripe[name] for stripe in stripes]) for name in columns}
        return merged, starts[position]

    def _remember(
        self, key: tuple[int, int, tuple[str, ...]], stripe: dict[str, np.ndarray]
    ) -> None:
        if self.cache_stripes <= 0:
            return
        self._cache[key] = stripe
        while len(self._cache) > self.cache_stripes:
            self._cache.popitem(last=False)

    def _file(self, file_id: int) -> _OpenFile:
        handle = self._open.get(file_id)
        if handle is None:
            handle = _OpenFile(self.root, self.manifest.files[file_id], self.stats)
            self._open[file_id] = handle
        return handle

    def read_whole_file(self, file_id: int) -> pa.Table:
        """Every row and column of one data file (compaction merges it with new events)."""
        handle = self._file(file_id)
        groups = range(len(self.manifest.files[file_id].stripe_rows))
        return handle.read(list(groups), self.manifest.columns)
