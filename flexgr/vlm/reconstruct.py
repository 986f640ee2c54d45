"""Rebuilding each example's history from its pointer: scan, merge, verify, then emit.

For an example with history length ``n`` and a tenant reading ``max_len`` events:

1. **Pointer checks.** The recent snapshot and ``history_end_ts`` must be strictly before
   ``request_ts`` (the leak rule of :mod:`flexgr.vlm.asof`); positions must be increasing.
2. **What to read.** ``L`` = the shortest verifiable tail covering ``max_len``
   (:func:`flexgr.vlm.hashing.read_length`). Of the last ``L`` positions, the snapshot fills
   those it recorded; the other ``m`` come from the tier.
3. **Range scan.** The user's newest stripes are read back until they hold ``m`` rows with
   ``version <= history_version`` and ``history_start_ts <= ts <= history_end_ts``; the last
   ``m`` such rows are the immutable part. One scan serves all of a user's examples in a batch.
4. **Verify.** Too few rows, bounds that do not match the rows found, any event at or after
   ``request_ts``, or a checksum (of the ``L`` events) that differs: a DataError naming the
   example. Never a silent truncation.
5. **Emit** the last ``min(max_len, n)`` events, only the tenant's feature groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from flexgr.vlm.batch import JaggedBatch, gather_ranges, offsets_of, tensor
from flexgr.vlm.examples import CANDIDATE_COLUMNS, POINTER_COLUMNS, ExampleRows, list_parts
from flexgr.vlm.hashing import event_hashes, read_length
from flexgr.vlm.schema import Tenant
from flexgr.vlm.tier import Tier

Columns = dict[str, np.ndarray]


@dataclass(frozen=True)
class _Pointers:
    """The example columns of one batch as numpy arrays (lists as CSR)."""

    col: Columns  # the scalar pointer columns
    tail_offsets: np.ndarray
    tail_values: np.ndarray
    recent_offsets: np.ndarray
    recent: Columns  # flat: "timestamp", "item", "pos" and the tenant's feature columns

    @staticmethod
    def of(table: pa.Table, features: tuple[str, ...]) -> _Pointers:
        col = {name: table.column(name).to_numpy() for name in POINTER_COLUMNS[:-1]}
        tail_offsets, tail_values = list_parts(table.column("tail_checksums"))
        recent_offsets, items = list_parts(table.column("recent_item"))
        recent = {
            "item": items,
            "timestamp": list_parts(table.column("recent_ts"))[1],
            "pos": list_parts(table.column("recent_pos"))[1].astype(np.int64),
        }
        for name in features:
            recent[name] = list_parts(table.column(f"recent_{name}"))[1]
        return _Pointers(col, tail_offsets, tail_values, recent_offsets, recent)

    def recent_span(self, i: int) -> slice:
        return slice(int(self.recent_offsets[i]), int(self.recent_offsets[i + 1]))


class _Plan(NamedTuple):
    length: int  # L: events read and verified, from the end of the history
    expected: int  # recorded checksum of those L events
    need: int  # m: of them, how many come from the tier
    recent: slice  # the snapshot events among them


class Reconstructor:
    """Turns rows of versioned examples into a :class:`JaggedBatch` for one tenant."""

    def __init__(self, tier: Tier, tenant: Tenant) -> None:
        self.tier, self.tenant = tier, tenant
        self.side = tier.manifest.side_names if tenant.reads_side else ()
        action = ("action",) if tenant.reads_actions else ()
        self.features = (*action, *self.side)  # tier columns beyond item and time
        self.tier_columns = ("timestamp", "version", "item", *self.features)

    def example_columns(self) -> tuple[str, ...]:
        """The example columns this tenant reads (projection pushdown on the primary side)."""
        recent = ["recent_item", "recent_ts", "recent_pos"]
        recent += [f"recent_{name}" for name in self.features]
        return (*POINTER_COLUMNS, *recent, *CANDIDATE_COLUMNS)

    def __call__(self, rows: ExampleRows) -> JaggedBatch:
        p = _Pointers.of(rows.table, self.features)
        self._check_version(rows, p.col["history_version"])
        plans = [self._plan(rows, p, i) for i in range(len(rows))]
        found = self._scan(p, plans)
        for i, plan in enumerate(plans):
            self._check_rows(rows, p, i, plan, found.get(i))
        return self._emit(rows.table, p.col, self._merge(rows, p, plans, found))

    def _check_version(self, rows: ExampleRows, versions: np.ndarray) -> None:
        if len(versions) and versions.max() > self.tier.version and not self.tier.refresh():
            row = int(np.argmax(versions))
            raise rows.error(
                row,
                f"saw tier version {versions[row]}, the tier is at {self.tier.version} "
                "(compaction not committed yet?)",
            )

    def _plan(self, rows: ExampleRows, p: _Pointers, i: int) -> _Plan:
        n, request = int(p.col["history_len"][i]), int(p.col["request_ts"][i])
        span = p.recent_span(i)
        stamps, pos = p.recent["timestamp"][span], p.recent["pos"][span]
        if len(stamps) and stamps.max() >= request:
            raise rows.error(i, f"recent event at {stamps.max()} is not before request_ts (leak)")
        if len(pos) and (pos[0] < 0 or pos[-1] >= n or np.any(np.diff(pos) <= 0)):
            raise rows.error(i, "recent_pos must increase and stay below history_len")
        immutable = n - len(pos)
        start, end = p.col["history_start_ts"][i], p.col["history_end_ts"][i]
        if immutable < 0:
            raise rows.error(i, f"history_len {n} is shorter than its recent snapshot")
        if immutable and end >= request:
            raise rows.error(i, f"history_end_ts {end} is not before request_ts (leak)")
        if immutable and start > end:
            raise rows.error(i, "history_start_ts is after history_end_ts")
        length, checkpoint = read_length(n, self.tenant.max_len)
        expected = int(p.col["checksum"][i])
        if checkpoint >= 0:
            first, stop = p.tail_offsets[i], p.tail_offsets[i + 1]
            if stop - first <= checkpoint:
                raise rows.error(i, f"no tail checksum for the last {length} events")
            expected = int(p.tail_values[first + checkpoint])
        in_tail = int(np.sum(pos >= n - length))
        recent = slice(span.stop - in_tail, span.stop)
        return _Plan(length, expected, length - in_tail, recent)

    def _scan(self, p: _Pointers, plans: list[_Plan]) -> dict[int, Columns]:
        """Per example needing tier rows, the last ``m`` visible ones; one scan per user.

        The first pass of every user's scan is one batched read (one pyarrow call per data
        file, not per user: per-call overhead, not bytes, dominated the short tenant's time);
        a user whose rows were thinned by later versions reads further back on its own."""
        by_user: dict[int, list[int]] = {}
        for i, plan in enumerate(plans):
            if plan.need:
                by_user.setdefault(int(p.col["user"][i]), []).append(i)
        tier = self.tier
        scans = []  # (members, the user's overlapping segments, how many newest to read first)
        for user, members in by_user.items():
            first, stop = tier.segments(user)
            end = max(p.col["history_end_ts"][i] for i in members)
            begin = min(p.col["history_start_ts"][i] for i in members)
            segs = np.arange(first, stop)
            segs = segs[(tier.seg_ts_min[segs] <= end) & (tier.seg_ts_max[segs] >= begin)]
            need = max(plans[i].need for i in members)
            # Rows bound the visible events from above: start with enough stripes for `need`
            # rows and read further back only if later versions' rows were filtered out.
            rows_back = np.cumsum(tier.segment_rows(segs)[::-1])
            count = min(len(segs), int(np.searchsorted(rows_back, need)) + 1)
            scans.append((members, segs, count))
        firsts = [segs[len(segs) - count :] for _, segs, count in scans]
        batched = self._read_many(firsts)
        found = {}
        for (members, segs, count), data in zip(scans, batched, strict=True):
            parts, have = [data], count
            while True:
                picks = {i: _visible(data, p.col, i, plans[i].need) for i in members}
                if count == len(segs) or all(len(picks[i]) >= plans[i].need for i in members):
                    break
                count = min(len(segs), 2 * count)
                new = segs[len(segs) - count : len(segs) - have]
                parts.insert(0, tier.read_segments(new, self.tier_columns))
                have = count
                data = {k: np.concatenate([part[k] for part in parts]) for k in self.tier_columns}
            for i in members:
                found[i] = {k: v[picks[i]] for k, v in data.items()}
        return found

    def _read_many(self, runs: list[np.ndarray]) -> list[Columns]:
        """``tier.read_segments`` of each run, read with one call per data file."""
        if not runs:
            return []
        segs = np.concatenate(runs).astype(np.int64)
        by_file = np.argsort(self.tier.segment_files(segs), kind="stable")
        data = self.tier.read_segments(segs[by_file], self.tier_columns)
        rows = self.tier.segment_rows(segs)
        sorted_starts = offsets_of(rows[by_file])[:-1]
        starts = np.empty_like(sorted_starts)
        starts[by_file] = sorted_starts  # where each segment's rows landed
        index = gather_ranges(starts, starts + rows)  # back in the order of the runs
        flat = {k: v[index] for k, v in data.items()}
        run_of = np.repeat(np.arange(len(runs)), [len(run) for run in runs])
        totals = np.bincount(run_of, weights=rows, minlength=len(runs)).astype(np.int64)
        bounds = offsets_of(totals)
        return [{k: v[a:b] for k, v in flat.items()} for a, b in pairwise(bounds)]

    def _check_rows(
        self, rows: ExampleRows, p: _Pointers, i: int, plan: _Plan, tier_rows: Columns | None
    ) -> None:
        n = int(p.col["history_len"][i])
        got = 0 if tier_rows is None else len(tier_rows["timestamp"])
        if got < plan.need:
            raise rows.error(
                i,
                f"the tier holds {got} of the {plan.need} immutable events the example records "
                f"(version {p.col['history_version'][i]})",
            )
        if tier_rows is not None and plan.need:
            stamps = tier_rows["timestamp"]
            if stamps[-1] != p.col["history_end_ts"][i] or (
                plan.length == n and stamps[0] != p.col["history_start_ts"][i]
            ):
                raise rows.error(i, "the tier's events do not span the recorded history range")

    def _merge(
        self, rows: ExampleRows, p: _Pointers, plans: list[_Plan], found: dict[int, Columns]
    ) -> Columns:
        """Every example's ``L`` events (snapshot at its recorded positions, tier rows in the
        others), verified against its checksum, then its last ``min(max_len, n)`` events; flat
        over the batch, one numpy pass (a per-example loop cost more than the reads)."""
        count = len(plans)
        lengths = np.array([plan.length for plan in plans], dtype=np.int64)
        offsets = offsets_of(lengths)
        n = p.col["history_len"].astype(np.int64)
        # Snapshot events: their flat positions, and where they sit in the recent columns.
        recent_start = np.array([plan.recent.start for plan in plans], dtype=np.int64)
        recent_stop = np.array([plan.recent.stop for plan in plans], dtype=np.int64)
        recent = gather_ranges(recent_start, recent_stop)
        of_recent = np.repeat(np.arange(count), recent_stop - recent_start)
        slots = np.zeros(int(offsets[-1]), dtype=bool)
        slots[p.recent["pos"][recent] - (n - lengths)[of_recent] + offsets[of_recent]] = True
        with_rows = [i for i in range(count) if plans[i].need]
        events = {}
        for name in ("timestamp", "item", *self.features):
            source = p.recent[name]
            values = np.empty(int(offsets[-1]), dtype=source.dtype)  # the log's dtype throughout
            values[slots] = source[recent]
            tier = [found[i][name] for i in with_rows]
            values[~slots] = np.concatenate(tier) if tier else source[:0]
            events[name] = values
        # No event can be at or after request_ts here: the snapshot and history_end_ts were
        # checked against it in _plan, and tier rows are filtered to ts <= history_end_ts.
        owner = np.repeat(np.arange(count), lengths)
        from_end = offsets[1:][owner] - 1 - np.arange(int(offsets[-1]))
        terms = event_hashes(events["timestamp"], events["item"], from_end)
        rebuilt = np.zeros(count, dtype=np.uint64)
        if len(terms):
            np.add.at(rebuilt, owner, terms)  # modular, like the recorded sums
        expected = np.array([plan.expected for plan in plans], dtype=np.uint64)
        wrong = np.flatnonzero(rebuilt != expected)
        if len(wrong):
            i = int(wrong[0])
            raise rows.error(
                i,
                f"history checksum mismatch over the last {plans[i].length} events "
                f"(recorded {int(expected[i]):#018x}, rebuilt {int(rebuilt[i]):#018x})",
            )
        keep = np.minimum(self.tenant.max_len, n)
        index = gather_ranges(offsets[1:] - keep, offsets[1:])
        return {name: values[index] for name, values in events.items()}

    def _emit(self, table: pa.Table, col: Columns, flat: Columns) -> JaggedBatch:
        cand_offsets, candidates = list_parts(table.column("candidates"))
        lengths = np.minimum(self.tenant.max_len, col["history_len"].astype(np.int64))
        return JaggedBatch(
            request_ids=tensor(col["request_id"]),
            users=tensor(col["user"]),
            query_time=tensor(col["request_ts"]),
            item_ids=tensor(flat["item"]),
            timestamps=tensor(flat["timestamp"]),
            offsets=tensor(offsets_of(lengths)),
            candidates=tensor(candidates),
            candidate_timestamps=tensor(list_parts(table.column("candidate_ts"))[1]),
            labels=tensor(list_parts(table.column("labels"))[1]),
            candidate_offsets=tensor(cand_offsets),
            actions=tensor(flat["action"]) if self.tenant.reads_actions else None,
            side={name: tensor(flat[name], flat[name].dtype) for name in self.side},
        )


def _visible(data: Columns, col: Columns, i: int, need: int) -> np.ndarray:
    """Indices of the last ``need`` rows example ``i`` saw: old enough version, inside bounds."""
    if not need:
        return np.zeros(0, dtype=np.int64)
    ts = data["timestamp"]
    mask = (data["version"] <= col["history_version"][i]) & (ts <= col["history_end_ts"][i])
    mask &= ts >= col["history_start_ts"][i]
    return np.flatnonzero(mask)[-need:]
