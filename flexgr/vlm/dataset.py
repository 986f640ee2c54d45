"""A versioned training dataset on disk: the history tier, the examples, and the table that
evaluation reads, tied together by ``vlm.json``.

::

    DIR/vlm.json     what it was built from: source, split protocol, time scale, requests, counts
    DIR/tier/        the immutable history tier (flexgr.vlm.tier)
    DIR/examples/    the versioned examples (flexgr.vlm.examples), a closed log
    DIR/table/       synthetic log only: the prepared flexgr dataset of the same events

**Only training events.** The store is built from the training events of a split of the table
(``protocol``): no validation or test event is in the tier, in a snapshot or among the
candidates, so a model trained from it is evaluated on the table's targets exactly as a model
trained from the table is (docs/evaluation.md). ``train_digest`` records those events; the
trainer refuses a store whose table has changed since.

**Two sources.** From a prepared flexgr dataset (:func:`prepare_from_table`): one request per
user at its last training event, so each example is the table's training sequence of that
user. The table orders a user's tied events by its own seeded hash, the tier by another one;
to keep the table's order, timestamps are refined to ``ts * time_scale + rank`` among the
user's events at that second (``time_scale`` = the largest tie group; 1 when there are no
ties, and then the times are unchanged), and the trainer divides by ``time_scale``. From the
synthetic multi-tenant log (:func:`prepare_synthetic`): its K requests per user per day, late
arrivals and daily compactions; the table is written in the tier's canonical order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flexgr.atomic import atomic_write_text
from flexgr.data import InteractionData, Split, load_prepared, make_split, prepare
from flexgr.data.errors import DataError
from flexgr.vlm.asof import RequestSpec
from flexgr.vlm.batch import gather_ranges
from flexgr.vlm.compaction import build_tier
from flexgr.vlm.convert import examples_from_log
from flexgr.vlm.examples import ExampleLog
from flexgr.vlm.fatrow import EXAMPLE_DELTA_COLUMNS
from flexgr.vlm.hashing import canonical_order
from flexgr.vlm.schema import EventLog
from flexgr.vlm.synthetic import SyntheticSpec, synthetic_log

META = "vlm.json"
FORMAT = 1
TABLE, TIER, EXAMPLES = "table", "tier", "examples"


@dataclass(frozen=True)
class VersionedMeta:
    source: str  # "synthetic", or the name of the prepared dataset it was built from
    table: str  # the prepared dataset evaluation reads: "table" (inside DIR) or a path
    protocol: str  # the split whose training events the store holds
    train_digest: str  # CRC32 of those events (user, item, timestamp), see train_digest()
    time_scale: int  # stored time = table time * time_scale + tie rank
    group_by: str  # how requests were formed (flexgr.vlm.asof.RequestSpec)
    log_max_len: int  # the longest history an example records
    watermarks: list[int]
    examples: int
    events: int  # training events in the store
    users: int
    synthetic: dict[str, Any] = field(default_factory=dict)  # the SyntheticSpec, if any
    format: int = FORMAT

    def table_path(self, root: Path) -> Path:
        path = Path(self.table)
        return path if path.is_absolute() else root / path


def read_meta(root: str | os.PathLike[str]) -> VersionedMeta:
    path = Path(root) / META
    if not path.is_file():
        raise DataError(
            f"no versioned dataset at {root} (no {META}; create one with flexgr vlm prepare)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT:
            raise DataError(f"format {raw.get('format')} is not {FORMAT}", path=path)
        return VersionedMeta(**raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise DataError(f"unreadable ({err})", path=path) from None


def train_digest(data: InteractionData, split: Split) -> tuple[np.ndarray, str]:
    """The training events' global indices (user by user, time order) and their CRC32."""
    starts = data.user_offsets[:-1].astype(np.int64)
    index = gather_ranges(starts, split.train_end.astype(np.int64))
    users = np.repeat(np.arange(data.num_users), split.train_end - starts)
    crc = 0
    for column in (users, data.items[index], data.timestamps[index]):
        crc = zlib.crc32(np.ascontiguousarray(column, dtype=np.int64).tobytes(), crc)
    return index, f"{crc:08x}"


def prepare_from_table(
    target: str | os.PathLike[str],
    data: InteractionData,
    split: Split,
    *,
    table: str,
    compactions: int = 3,
    log_max_len: int = 0,
    num_buckets: int = 16,
    force: bool = False,
) -> Path:
    """The store of ``data``'s training events under ``split``: one example per user with at
    least one training event, requested at its last one. ``compactions`` watermarks at
    quantiles of the event times (the events after the last one reach the examples through
    their recent snapshots); ``log_max_len`` 0 keeps every history whole."""
    if compactions < 1:
        raise DataError(f"compactions must be at least 1, got {compactions}")
    index, digest = train_digest(data, split)
    if not len(index):
        raise DataError(f"dataset {data.name!r} has no training events under {split.protocol}")
    counts = split.train_end - data.user_offsets[:-1]
    users = np.repeat(np.arange(data.num_users, dtype=np.int64), counts)
    stamps = data.timestamps[index].astype(np.int64)
    time, scale = refine_ties(users, stamps)
    log = EventLog(
        users, data.items[index].astype(np.int64), time, time, np.zeros(len(index), np.int64)
    )
    marks = np.unique(np.quantile(time, np.arange(1, compactions + 1) / (compactions + 1)))
    longest = int(counts.max())
    spec = RequestSpec(group_by="last", log_max_len=log_max_len or max(longest, 1))
    meta = VersionedMeta(
        source=data.name, table=table, protocol=split.protocol, train_digest=digest,
        time_scale=scale, group_by=spec.group_by, log_max_len=spec.log_max_len,
        watermarks=[int(m) for m in marks.astype(np.int64)], examples=0, events=len(index),
        users=int(np.count_nonzero(counts)),
    )  # fmt: skip
    return _write(Path(target), lambda _: (log, spec, meta), num_buckets, force)


def refine_ties(users: np.ndarray, stamps: np.ndarray) -> tuple[np.ndarray, int]:
    """``stamps * scale + rank`` (rank among the user's events at that time, in the given
    order) and ``scale``, so that the times order each user's events as given."""
    n = len(stamps)
    new = np.r_[True, (users[1:] != users[:-1]) | (stamps[1:] != stamps[:-1])]
    rank = np.arange(n) - np.maximum.accumulate(np.where(new, np.arange(n), 0))
    scale = int(rank.max()) + 1 if n else 1
    if scale > 1 and int(np.abs(stamps).max()) >= (2**62) // scale:
        raise DataError(f"timestamps too large to order {scale} tied events by refinement")
    return stamps * scale + rank, scale


def prepare_synthetic(
    target: str | os.PathLike[str],
    spec: SyntheticSpec,
    *,
    protocol: str = "loo-val",
    log_max_len: int = 4096,
    num_buckets: int = 16,
    force: bool = False,
) -> Path:
    """The synthetic multi-tenant log as a store of its training events, its table beside it."""
    log = canonical_log(spec)  # the table is written in this order, ties included

    request = spec.request_spec(log_max_len)

    def build(building: Path) -> tuple[EventLog, RequestSpec, VersionedMeta]:
        events = building / "events.parquet"
        columns = {"user": log.users, "item": log.items, "timestamp": log.timestamps}
        pq.write_table(pa.table(columns), events)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # file order is the tier's seeded tie order
            table = prepare(
                events, fmt="parquet", name=TABLE, data_dir=building, ties="file",
                progress=False, user_col="user", item_col="item", time_col="timestamp",
            )  # fmt: skip
        events.unlink()
        data = load_prepared(table)
        if not (
            np.array_equal(data.timestamps, log.timestamps)
            and np.array_equal(np.asarray(data.item_ids, np.int64)[data.items - 1], log.items)
        ):
            raise RuntimeError("the prepared table does not keep the log's event order")
        split = make_split(data, protocol)
        train, digest = training_log(log, data, split), train_digest(data, split)[1]
        meta = VersionedMeta(
            source="synthetic", table=TABLE, protocol=protocol, train_digest=digest,
            time_scale=1, group_by=request.group_by, log_max_len=log_max_len,
            watermarks=spec.watermarks(), examples=0, events=len(train), users=spec.users,
            synthetic=asdict(spec),
        )  # fmt: skip
        return train, request, meta

    return _write(Path(target), build, num_buckets, force)


def canonical_log(spec: SyntheticSpec) -> EventLog:
    """The synthetic log in the tier's canonical order (the order its table is written in)."""
    full = EventLog.from_table(synthetic_log(spec), source="synthetic log")
    order = canonical_order(full.users, full.timestamps, full.ties, np.zeros(len(full), np.int64))
    return full.take(order)


def training_log(log: EventLog, data: InteractionData, split: Split) -> EventLog:
    """The training events of ``log`` (canonical order, = ``data``'s order), with the table's
    item indices (1..I) as the model and the evaluation use them."""
    index, _ = train_digest(data, split)
    train = log.take(index)
    return EventLog(
        train.users, data.items[index].astype(np.int64), train.timestamps,
        train.arrivals, train.actions, train.side,
    )  # fmt: skip


def _write(
    target: Path,
    build: Callable[[Path], tuple[EventLog, RequestSpec, VersionedMeta]],
    num_buckets: int,
    force: bool,
) -> Path:
    """Build everything in a temp directory beside ``target``, then rename it into place (a
    crash leaves no half-built store under the target's name). ``build(directory)`` writes
    what it needs there and returns the training events, the request rule and the meta."""
    if target.exists() and not force:
        raise DataError(f"{target} already exists (pass force to rebuild it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        log, spec, meta = build(building)
        marks = list(meta.watermarks)
        build_tier(building / TIER, log, marks, num_buckets=num_buckets)
        examples = examples_from_log(log, spec, marks)
        writer = ExampleLog(building / EXAMPLES)
        writer.append(examples, delta_columns=EXAMPLE_DELTA_COLUMNS)
        writer.close()
        meta = _replace(meta, examples=examples.num_rows)
        atomic_write_text(building / META, json.dumps(asdict(meta), indent=1) + "\n")
        if target.exists():
            retired = target.with_name(f".{target.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.rename(target, retired)
            os.rename(building, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return target


def _replace(meta: VersionedMeta, **changes: Any) -> VersionedMeta:
    return VersionedMeta(**{**asdict(meta), **changes})
