"""Compaction: move the events that arrived before a watermark from the recent buffer into a new
version of the immutable tier, atomically.

Version ``k`` holds exactly the events that arrived before watermark ``W_k``; each row records
the version that absorbed it, so a reader can see the tier as of any earlier version (a late
event compacted at version 5 is invisible to an example that saw version 4, even though its
timestamp falls inside that example's history range). This is the MVCC half of "versioned".

Only buckets that received events are rewritten; the others are reused by reference. New files
always get new names and become visible only through :func:`flexgr.vlm.manifest.commit`, so a
crash at any point leaves the previous version whole. One compaction job writes a tier at a
time (the caller's scheduler guarantees it; nothing here locks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from flexgr.data.errors import DataError
from flexgr.vlm.files import ReadStats
from flexgr.vlm.hashing import bucket_of, canonical_order
from flexgr.vlm.manifest import Manifest, commit, read_current
from flexgr.vlm.schema import ACTION, ITEM, TIMESTAMP, USER, VERSION, EventLog
from flexgr.vlm.stripes import write_bucket
from flexgr.vlm.tier import Tier

_OWN_FILE = re.compile(r"^\.?v\d{6}-[0-9a-f]+\.parquet(\.tmp-\d+)?$")
_MANIFEST = re.compile(r"^manifest-(\d{6})\.json$")


@dataclass(frozen=True)
class Compacted:
    manifest: Manifest
    bytes_written: int  # data, index and manifest bytes this compaction wrote


class RecentBuffer:
    """Events newer than the last compaction, per user: the mutable part of the history.

    In production this is an online key-value store; here it is columns in memory, enough to
    drive compaction and to check that the examples' recent snapshots are what it served.
    """

    def __init__(self, side_dtypes: dict[str, str] | None = None) -> None:
        self.side_dtypes = dict(side_dtypes or {})
        self.side_names = tuple(self.side_dtypes)
        self.watermark: int | None = None
        self._events = EventLog.empty(self.side_names, self.side_dtypes)

    def __len__(self) -> int:
        return len(self._events)

    def append(self, events: EventLog) -> None:
        if self.watermark is not None and len(events) and events.arrivals.min() < self.watermark:
            raise DataError(
                f"event arrived at {events.arrivals.min()}, before the last compaction's "
                f"watermark {self.watermark}: it belongs to the immutable tier"
            )
        if len(events) and events.side_dtypes != self.side_dtypes:
            raise DataError(
                f"side features {events.side_dtypes} differ from the buffer's {self.side_dtypes}"
            )
        self._events = EventLog.concat([self._events, events], self.side_names)

    def snapshot(self, user: int, request_ts: int) -> EventLog:
        """What a request at ``request_ts`` reads from the buffer, in canonical order."""
        log = self._events
        index = np.flatnonzero(
            (log.users == user) & (log.arrivals < request_ts) & (log.timestamps < request_ts)
        )
        part = log.take(index)
        order = canonical_order(part.users, part.timestamps, part.ties, np.zeros(len(part), int))
        return part.take(order)

    def drain(self, watermark: int) -> EventLog:
        """Remove and return the events that arrived before ``watermark``."""
        early = self._events.arrivals < watermark
        drained = self._events.take(np.flatnonzero(early))
        self._events = self._events.take(np.flatnonzero(~early))
        self.watermark = watermark
        return drained


def compact(
    root: str | Path,
    events: EventLog,
    watermark: int,
    *,
    num_buckets: int = 16,
    stripe_rows: int = 512,
    pack_rows: int = 512,
    keep_versions: int = 2,
) -> Compacted:
    """Commit version ``v + 1`` = version ``v`` plus ``events`` (all arrived before
    ``watermark``, none before the previous watermark). Bucket count and stripe size are fixed
    by the first compaction (see :mod:`flexgr.vlm.stripes` for the stripe sizes)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    previous = read_current(root)
    side_dtypes = events.side_dtypes
    if previous is not None:
        num_buckets, stripe_rows = previous.num_buckets, previous.stripe_rows
        pack_rows = previous.pack_rows
        if watermark <= previous.watermark:
            raise DataError(
                f"watermark {watermark} is not after the tier's {previous.watermark}", path=root
            )
        if events.side_names != previous.side_names or (
            len(events) and side_dtypes != previous.side_dtypes
        ):
            raise DataError(
                f"side features {side_dtypes} differ from the tier's {previous.side_dtypes}",
                path=root,
            )
        side_dtypes = previous.side_dtypes
    _check_arrivals(events, None if previous is None else previous.watermark, watermark, root)
    version = 1 if previous is None else previous.version + 1
    buckets = bucket_of(events.users, num_buckets)
    old = {} if previous is None else {e.bucket: i for i, e in enumerate(previous.files)}
    # Its own reads are not the loader's read bandwidth: a private ReadStats.
    tier = None if previous is None else Tier(root, previous, ReadStats())
    files, written = [], 0
    for bucket in sorted(set(buckets.tolist()) | set(old)):
        new = events.take(np.flatnonzero(buckets == bucket))
        if not len(new):
            files.append(previous.files[old[bucket]])  # type: ignore[union-attr]
            continue
        parts, versions = [new], [np.full(len(new), version, dtype=np.int64)]
        if bucket in old:
            kept, kept_versions = _as_events(tier.read_whole_file(old[bucket]), side_dtypes)  # type: ignore[union-attr]
            parts.insert(0, kept)
            versions.insert(0, kept_versions)
        entry = write_bucket(
            root,
            bucket,
            version,
            EventLog.concat(parts, events.side_names),
            np.concatenate(versions),
            stripe_rows,
            pack_rows,
        )
        written += entry.bytes + entry.index_bytes
        files.append(entry)
    if tier is not None:
        tier.close()
    manifest = Manifest(
        version=version,
        watermarks=(() if previous is None else previous.watermarks) + (watermark,),
        num_buckets=num_buckets,
        stripe_rows=stripe_rows,
        pack_rows=pack_rows,
        columns=(USER, TIMESTAMP, VERSION, ITEM, ACTION, *events.side_names),
        side_dtypes=side_dtypes,
        files=tuple(files),
    )
    commit(root, manifest)
    written += len(manifest.to_json())
    collect_garbage(root, keep_versions)
    return Compacted(manifest, written)


def build_tier(
    root: str | Path, log: EventLog, watermarks: list[int], **options: int
) -> tuple[list[Compacted], RecentBuffer]:
    """Replay ``log`` through a recent buffer and compact at each watermark, in order.

    Returns every compaction and the buffer left over (events that arrived after the last
    watermark: they reach requests only through the examples' recent snapshots).
    """
    buffer = RecentBuffer(log.side_dtypes)
    buffer.append(log)
    done = [compact(root, buffer.drain(mark), mark, **options) for mark in sorted(watermarks)]
    return done, buffer


def collect_garbage(root: Path, keep_versions: int) -> None:
    """Delete manifests and files no kept version names (and leftovers of crashed writes).

    The last ``keep_versions`` versions stay readable, so a reader that opened the previous
    version just before a commit can finish.
    """
    current = read_current(root)
    if current is None:
        return
    keep = set(range(max(1, current.version - keep_versions + 1), current.version + 1))
    referenced: set[str] = set()
    for path in root.glob("manifest-*.json"):
        match = _MANIFEST.match(path.name)
        if match is None:
            continue
        if int(match.group(1)) in keep:
            referenced |= Manifest.from_json(path.read_text(), path).file_names()
        else:
            path.unlink(missing_ok=True)
    for pattern in ("bucket=*/*", "_index/bucket=*/*"):
        for path in root.glob(pattern):
            relative = path.relative_to(root).as_posix()
            if _OWN_FILE.match(path.name) and relative not in referenced:
                path.unlink(missing_ok=True)


def _check_arrivals(events: EventLog, low: int | None, high: int, root: Path) -> None:
    late = events.arrivals >= high
    early = np.zeros_like(late) if low is None else events.arrivals < low
    bad = np.flatnonzero(late | early)
    if len(bad):
        row = int(bad[0])
        bound = f"at or after the watermark {high}" if late[row] else f"before {low}"
        raise DataError(
            f"event arrived at {events.arrivals[row]}, {bound}: not this compaction's",
            path=root, line=row + 1, where="new event",
        )  # fmt: skip


def _as_events(table: pa.Table, side_dtypes: dict[str, str]) -> tuple[EventLog, np.ndarray]:
    column = {name: table.column(name).to_numpy() for name in table.column_names}
    events = EventLog(
        users=column[USER],
        items=column[ITEM],
        timestamps=column[TIMESTAMP],
        arrivals=column[TIMESTAMP],  # not stored: the version says when it arrived
        actions=column[ACTION],
        side={name: column[name].astype(dtype) for name, dtype in side_dtypes.items()},
    )
    return events, column[VERSION]
