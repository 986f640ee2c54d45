"""Converters to versioned examples: from an event log, and from fat-row examples.

Both end in :func:`versioned_table`, which turns each request's full history (as the online
system served it) and the mask of its immutable events into the pointer, the checksums and
the recent snapshot. So the two converters cannot disagree on the format, only on the split,
and the tests check that the loader rebuilds the same histories from either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from flexgr.data.errors import DataError
from flexgr.vlm.asof import RequestSpec, plan_requests
from flexgr.vlm.examples import list_parts, lists
from flexgr.vlm.hashing import TAIL_CHECKPOINT_BASE, event_hashes, tie_keys
from flexgr.vlm.schema import EventLog
from flexgr.vlm.tier import Tier


def examples_from_log(log: EventLog, spec: RequestSpec, watermarks: Sequence[int]) -> pa.Table:
    """Versioned examples of every request in ``log``, in request order (see flexgr.vlm.asof)."""
    plan = plan_requests(log, spec, watermarks)
    hist, of = plan.hist_index, plan.hist_request()
    immutable = plan.versions[hist] <= plan.request_version[of]
    return versioned_table(
        np.arange(plan.num_requests, dtype=np.int64),
        plan.request_user,
        plan.request_ts,
        plan.request_version,
        plan.hist_offsets,
        _take(plan.events, hist),
        immutable,
        plan.cand_offsets,
        _take(plan.events, plan.cand_index),
    )


def versioned_table(
    request_id: np.ndarray,
    user: np.ndarray,
    request_ts: np.ndarray,
    version: np.ndarray,
    hist_offsets: np.ndarray,
    hist: dict[str, np.ndarray],
    immutable: np.ndarray,
    cand_offsets: np.ndarray,
    cand: dict[str, np.ndarray],
) -> pa.Table:
    """``hist``/``cand``: flat columns ``item``, ``ts``, ``action`` and the side features."""
    count = len(request_id)
    of = np.repeat(np.arange(count), np.diff(hist_offsets))
    length = np.diff(hist_offsets)
    pos = np.arange(len(of)) - hist_offsets[of]
    start, end = np.zeros(count, np.int64), np.full(count, -1, np.int64)
    owner, stamps = of[immutable], hist["ts"][immutable]
    if len(owner):
        first = np.r_[True, owner[1:] != owner[:-1]]
        last = np.r_[owner[1:] != owner[:-1], True]
        start[owner[first]], end[owner[last]] = stamps[first], stamps[last]
    terms = event_hashes(hist["ts"], hist["item"], length[of] - 1 - pos)
    running = np.zeros(len(terms) + 1, dtype=np.uint64)
    np.cumsum(terms, out=running[1:])
    stops = hist_offsets[1:]
    checksum = running[stops] - running[hist_offsets[:-1]]  # modular, like the sum itself
    tail_offsets, tail_values = _tails(running, stops, length)
    recent = ~immutable
    recent_offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.bincount(of[recent], minlength=count), out=recent_offsets[1:])
    columns: dict[str, pa.Array] = {
        "request_id": pa.array(request_id, pa.int64()),
        "user": pa.array(user, pa.int64()),
        "request_ts": pa.array(request_ts, pa.int64()),
        "history_version": pa.array(version, pa.int64()),
        "history_start_ts": pa.array(start),
        "history_end_ts": pa.array(end),
        "history_len": pa.array(length, pa.int64()),
        "checksum": pa.array(checksum, pa.uint64()),
        "tail_checksums": lists(tail_offsets, tail_values, pa.uint64()),
        "recent_item": lists(recent_offsets, hist["item"][recent], pa.int64()),
        "recent_ts": lists(recent_offsets, hist["ts"][recent], pa.int64()),
        "recent_pos": lists(recent_offsets, pos[recent], pa.int32()),
        "recent_action": lists(recent_offsets, hist["action"][recent], pa.int64()),
    }
    for name in _side_names(hist):
        values = hist[name][recent]
        columns[f"recent_{name}"] = lists(recent_offsets, values, pa.from_numpy_dtype(values.dtype))
    columns["candidates"] = lists(cand_offsets, cand["item"], pa.int64())
    columns["candidate_ts"] = lists(cand_offsets, cand["ts"], pa.int64())
    columns["labels"] = lists(cand_offsets, cand["action"], pa.int64())
    return pa.table(columns)


def examples_from_fat_rows(fat: pa.Table, tier: Tier) -> pa.Table:
    """Versioned examples for fat rows (``flexgr.vlm.fatrow`` layout), given the tier built from
    the same events: each history event found in the tier version the request saw is
    immutable, the others become the recent snapshot. A fat row whose history the tier
    contradicts (an event of the tier inside its range that the row lacks) is a DataError
    naming the row."""
    side = tier.manifest.side_names
    columns = ("timestamp", "version", "item", "action", *side)
    hist = {key: list_parts(fat.column(f"hist_{key}")) for key in ("item", "ts", "action", *side)}
    hist_offsets = hist["item"][0]
    flat = {key: values for key, (_, values) in hist.items()}
    users = fat.column("user").to_numpy()
    request_ts = fat.column("request_ts").to_numpy()
    request_id = fat.column("request_id").to_numpy()
    versions = np.array([tier.version_at(int(ts)) for ts in request_ts], dtype=np.int64)
    immutable = np.zeros(len(flat["item"]), dtype=bool)
    cache: dict[int, dict[str, np.ndarray]] = {}
    for row in range(fat.num_rows):
        user, a, b = int(users[row]), int(hist_offsets[row]), int(hist_offsets[row + 1])
        if user not in cache:
            first, stop = tier.segments(user)
            rows = tier.read_segments(np.arange(first, stop), columns)
            rows["tie"] = tie_keys(
                np.full(len(rows["item"]), user), rows["item"], rows["action"],
                [rows[name] for name in side],
            )  # fmt: skip
            cache[user] = rows
        rows = cache[user]
        seen = (rows["version"] <= versions[row]) & (rows["timestamp"] < request_ts[row])
        ties = tie_keys(
            np.full(b - a, user), flat["item"][a:b], flat["action"][a:b],
            [flat[name][a:b] for name in side],
        )  # fmt: skip
        where = f"fat row {row} (request {request_id[row]})"
        immutable[a:b] = _split(
            flat["ts"][a:b], ties, rows["timestamp"][seen], rows["tie"][seen], where
        )
    cand = {key: list_parts(fat.column(name))[1] for key, name in _CANDIDATES.items()}
    return versioned_table(
        request_id, users, request_ts, versions, hist_offsets, flat, immutable,
        list_parts(fat.column("candidates"))[0], cand,
    )  # fmt: skip


_CANDIDATES = {"item": "candidates", "ts": "candidate_ts", "action": "labels"}


def _split(
    ts: np.ndarray, ties: np.ndarray, tier_ts: np.ndarray, tier_ties: np.ndarray, where: str
) -> np.ndarray:
    """Mask of the history events (canonical order) that the tier holds."""
    n = len(ts)
    if n == 0:
        return np.zeros(0, dtype=bool)
    if np.any((ts[1:] < ts[:-1]) | ((ts[1:] == ts[:-1]) & (ties[1:] < ties[:-1]))):
        raise DataError(f"{where}: history is not in time order")
    # Tier events from the history's first key on must all be in the history (older ones
    # were cut by log_max_len).
    later = (tier_ts > ts[0]) | ((tier_ts == ts[0]) & (tier_ties >= ties[0]))
    key = np.dtype([("ts", np.int64), ("tie", np.uint64)])
    both = np.empty(n + int(later.sum()), dtype=key)
    both["ts"] = np.r_[ts, tier_ts[later]]
    both["tie"] = np.r_[ties, tier_ties[later]]
    distinct, inverse = np.unique(both, return_inverse=True)
    mine, theirs = inverse[:n], inverse[n:]
    in_history = np.bincount(mine, minlength=len(distinct))
    in_tier = np.bincount(theirs, minlength=len(distinct))
    extra = in_tier > in_history
    extra[mine[0]] = False  # ties with the oldest kept event may have been cut
    if extra.any():
        stamp = distinct[np.flatnonzero(extra)[0]]["ts"]
        raise DataError(f"{where}: the tier holds an event at {stamp} the history lacks")
    run_start = np.r_[0, np.flatnonzero(mine[1:] != mine[:-1]) + 1]
    rank = np.arange(n) - np.repeat(run_start, np.diff(np.r_[run_start, n]))
    return rank < np.minimum(in_tier, in_history)[mine]


def _tails(
    running: np.ndarray, stops: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """CSR checksums of each history's last 256, 512, ... events (shorter than it)."""
    checkpoints = []
    size = TAIL_CHECKPOINT_BASE
    while len(length) and size < length.max():
        checkpoints.append(size)
        size *= 2
    if not checkpoints:
        return np.zeros(len(length) + 1, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    sizes = np.array(checkpoints, dtype=np.int64)
    present = sizes[None, :] < length[:, None]  # [R, K]
    begin = np.maximum(stops[:, None] - sizes[None, :], 0)
    values = running[stops][:, None] - running[begin]
    offsets = np.zeros(len(length) + 1, dtype=np.int64)
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    return offsets, values[present]


def _take(events: EventLog, index: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "item": events.items[index],
        "ts": events.timestamps[index],
        "action": events.actions[index],
        **{name: column[index] for name, column in events.side.items()},
    }


def _side_names(columns: dict[str, np.ndarray]) -> list[str]:
    return [name for name in columns if name not in ("item", "ts", "action")]
