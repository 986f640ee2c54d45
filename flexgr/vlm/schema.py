"""The event log the versioned store is built from, and what a tenant asks the loader for.

An event log is a table with one row per event:

- ``user``, ``item``, ``timestamp``: integers, required.
- ``arrival_ts``: integer, optional (default ``timestamp``): when the event reached the online
  system. A late event (``arrival_ts > timestamp``) is invisible to requests before its arrival
  even though its timestamp is older; this is what makes as-of reconstruction non-trivial.
- ``action``: non-negative integer bit set (click, like, ...), optional (default 0).
- any other column: a numeric side feature (dwell time, surface, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flexgr.data.errors import DataError
from flexgr.vlm.hashing import tie_keys

USER, ITEM, TIMESTAMP, ARRIVAL, ACTION = "user", "item", "timestamp", "arrival_ts", "action"
VERSION = "version"  # tier only: the compaction that absorbed the event
_REQUIRED = (USER, ITEM, TIMESTAMP)
_RESERVED = {USER, ITEM, TIMESTAMP, ARRIVAL, ACTION, VERSION}

# Feature groups a tenant may project; items and timestamps are always read.
ACTIONS, SIDE = "actions", "side"
FEATURE_GROUPS: tuple[str, ...] = (ACTIONS, SIDE)


@dataclass(frozen=True)
class Tenant:
    """A model reading the shared store: the newest ``max_len`` events, ``feature_groups`` only."""

    name: str
    max_len: int
    feature_groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"tenant {self.name!r}: max_len must be at least 1")
        unknown = set(self.feature_groups) - set(FEATURE_GROUPS)
        if unknown:
            raise ValueError(
                f"tenant {self.name!r}: unknown feature groups {sorted(unknown)}; "
                f"expected some of {', '.join(FEATURE_GROUPS)}"
            )

    @property
    def reads_actions(self) -> bool:
        return ACTIONS in self.feature_groups

    @property
    def reads_side(self) -> bool:
        return SIDE in self.feature_groups


@dataclass(frozen=True, eq=False)
class EventLog:
    """Validated event columns (int64 except side features), in the order given."""

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    arrivals: np.ndarray
    actions: np.ndarray
    side: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.users)
        columns = [self.items, self.timestamps, self.arrivals, self.actions, *self.side.values()]
        if any(len(column) != n for column in columns):
            raise ValueError("EventLog columns must have equal length")

    def __len__(self) -> int:
        return len(self.users)

    @property
    def side_names(self) -> tuple[str, ...]:
        return tuple(self.side)

    @property
    def side_dtypes(self) -> dict[str, str]:
        """Side feature dtypes: part of the tie key's input, so they must match everywhere."""
        return {name: column.dtype.str for name, column in self.side.items()}

    @cached_property
    def ties(self) -> np.ndarray:
        return tie_keys(self.users, self.items, self.actions, list(self.side.values()))

    def take(self, index: np.ndarray) -> EventLog:
        return EventLog(
            users=self.users[index],
            items=self.items[index],
            timestamps=self.timestamps[index],
            arrivals=self.arrivals[index],
            actions=self.actions[index],
            side={name: column[index] for name, column in self.side.items()},
        )

    @staticmethod
    def concat(logs: list[EventLog], side_names: tuple[str, ...]) -> EventLog:
        logs = [log for log in logs if len(log)] or logs[:1]  # empty parts carry no dtypes
        if not logs:
            return EventLog.empty(side_names)
        return EventLog(
            users=np.concatenate([log.users for log in logs]),
            items=np.concatenate([log.items for log in logs]),
            timestamps=np.concatenate([log.timestamps for log in logs]),
            arrivals=np.concatenate([log.arrivals for log in logs]),
            actions=np.concatenate([log.actions for log in logs]),
            side={name: np.concatenate([log.side[name] for log in logs]) for name in side_names},
        )

    @staticmethod
    def empty(
        side_names: tuple[str, ...] = (), side_dtypes: dict[str, str] | None = None
    ) -> EventLog:
        zero = np.zeros(0, dtype=np.int64)
        dtypes = side_dtypes or {}
        return EventLog(
            zero, zero, zero, zero, zero,
            {name: np.zeros(0, dtype=dtypes.get(name, "float32")) for name in side_names},
        )  # fmt: skip

    @staticmethod
    def read(path: str | os.PathLike[str]) -> EventLog:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"cannot read event log ({err})", path=path) from None
        return EventLog.from_table(table, source=path)

    @staticmethod
    def from_table(table: pa.Table, source: str | os.PathLike[str] = "event log") -> EventLog:
        """Validate ``table``; bad input raises a one-line DataError naming ``source``."""
        source = os.fspath(source) if isinstance(source, Path) else source
        for name in _REQUIRED:
            if name not in table.column_names:
                raise DataError(f"event log has no column {name!r}", path=source)
        n = table.num_rows
        users = _integers(table, USER, source)
        timestamps = _integers(table, TIMESTAMP, source)
        arrivals = (
            _integers(table, ARRIVAL, source) if ARRIVAL in table.column_names else timestamps
        )
        actions = (
            _integers(table, ACTION, source)
            if ACTION in table.column_names
            else np.zeros(n, dtype=np.int64)
        )
        early = np.flatnonzero(arrivals < timestamps)
        if len(early):
            row = int(early[0])
            raise DataError(
                f"arrival_ts {arrivals[row]} is before timestamp {timestamps[row]}",
                path=source, line=row + 1, where="row",
            )  # fmt: skip
        negative = np.flatnonzero(actions < 0)
        if len(negative):
            raise DataError(
                "action bits must be non-negative",
                path=source,
                line=int(negative[0]) + 1,
                where="row",
            )
        side = {}
        for name in table.column_names:
            if name in _RESERVED:
                continue
            side[name] = _numbers(table, name, source)
        return EventLog(users, _integers(table, ITEM, source), timestamps, arrivals, actions, side)


def _column(table: pa.Table, name: str, source: str) -> pa.ChunkedArray:
    column = table.column(name)
    if column.null_count:
        raise DataError(f"column {name!r} has {column.null_count} null values", path=source)
    return column


def _integers(table: pa.Table, name: str, source: str) -> np.ndarray:
    column = _column(table, name, source)
    if not pa.types.is_integer(column.type):
        raise DataError(
            f"column {name!r} must be an integer column, not {column.type}", path=source
        )
    return column.to_numpy().astype(np.int64, copy=False)


def _numbers(table: pa.Table, name: str, source: str) -> np.ndarray:
    column = _column(table, name, source)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise DataError(f"side feature {name!r} must be numeric, not {column.type}", path=source)
    return column.to_numpy()
