"""The fat-row baseline: every example stores its whole history, as production logging does.

Built from the same as-of plan as the versioned examples (:mod:`flexgr.vlm.asof`), so a fat
row's history is by definition what the request saw, and the two stores can be compared event
for event. Histories are cut at ``log_max_len``, the longest any tenant reads: in a union
dataset every tenant pays for the longest one, which is the cost the versioned store removes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from flexgr.vlm.asof import RequestSpec, plan_requests
from flexgr.vlm.batch import JaggedBatch, gather_ranges, offsets_of, tensor
from flexgr.vlm.examples import CANDIDATE_COLUMNS, ExampleRows, list_parts, lists
from flexgr.vlm.schema import EventLog, Tenant

# The tier's encoding choices, column for column (flexgr.vlm.files.parquet_bytes).
FAT_DELTA_COLUMNS = (
    "request_id",
    "request_ts",
    "hist_item",
    "hist_ts",
    "candidates",
    "candidate_ts",
)
EXAMPLE_DELTA_COLUMNS = (
    "request_id",
    "request_ts",
    "recent_item",
    "recent_ts",
    "candidates",
    "candidate_ts",
)


def fat_rows_from_log(log: EventLog, spec: RequestSpec) -> pa.Table:
    """One row per request, same order and ids as :func:`examples_from_log`."""
    plan = plan_requests(log, spec, ())  # no tier: visibility is all a fat row needs
    ev = plan.events
    hist, cand = plan.hist_index, plan.cand_index
    columns: dict[str, pa.Array] = {
        "request_id": pa.array(np.arange(plan.num_requests, dtype=np.int64)),
        "user": pa.array(plan.request_user),
        "request_ts": pa.array(plan.request_ts),
        "hist_item": lists(plan.hist_offsets, ev.items[hist], pa.int64()),
        "hist_ts": lists(plan.hist_offsets, ev.timestamps[hist], pa.int64()),
        "hist_action": lists(plan.hist_offsets, ev.actions[hist], pa.int64()),
    }
    for name, values in ev.side.items():
        kind = pa.from_numpy_dtype(values.dtype)
        columns[f"hist_{name}"] = lists(plan.hist_offsets, values[hist], kind)
    columns["candidates"] = lists(plan.cand_offsets, ev.items[cand], pa.int64())
    columns["candidate_ts"] = lists(plan.cand_offsets, ev.timestamps[cand], pa.int64())
    columns["labels"] = lists(plan.cand_offsets, ev.actions[cand], pa.int64())
    return pa.table(columns)


class FatRowSlicer:
    """The fat-row loader's materialisation: read whole histories, keep the tenant's tail.

    Column projection applies (a tenant without side features does not read them), length
    projection cannot: a Parquet list is read whole.
    """

    def __init__(self, tenant: Tenant, side_names: Sequence[str]) -> None:
        self.tenant = tenant
        self.side = tuple(side_names) if tenant.reads_side else ()
        self.features = (("action",) if tenant.reads_actions else ()) + self.side

    def example_columns(self) -> tuple[str, ...]:
        hist = ["hist_item", "hist_ts", *(f"hist_{name}" for name in self.features)]
        return ("request_id", "user", "request_ts", *hist, *CANDIDATE_COLUMNS)

    def __call__(self, rows: ExampleRows) -> JaggedBatch:
        t = rows.table
        offsets, items = list_parts(t.column("hist_item"))
        keep_from = np.maximum(offsets[:-1], offsets[1:] - self.tenant.max_len)
        index = gather_ranges(keep_from, offsets[1:])

        def cut(name: str) -> np.ndarray:
            return list_parts(t.column(f"hist_{name}"))[1][index]

        cand_off, cand = list_parts(t.column("candidates"))
        return JaggedBatch(
            request_ids=tensor(t.column("request_id").to_numpy()),
            users=tensor(t.column("user").to_numpy()),
            query_time=tensor(t.column("request_ts").to_numpy()),
            item_ids=tensor(items[index]),
            timestamps=tensor(cut("ts")),
            offsets=tensor(offsets_of(offsets[1:] - keep_from)),
            candidates=tensor(cand),
            candidate_timestamps=tensor(list_parts(t.column("candidate_ts"))[1]),
            labels=tensor(list_parts(t.column("labels"))[1]),
            candidate_offsets=tensor(cand_off),
            actions=tensor(cut("action")) if self.tenant.reads_actions else None,
            side={name: tensor(cut(name), cut(name).dtype) for name in self.side},
        )
