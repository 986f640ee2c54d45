"""Evaluation batches: each user's history before a validation or test target, packed (jagged)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from flexgr.data import InteractionData, Split


def concat_ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``[starts[i], ends[i])`` for every i, concatenated, and their offsets [n + 1]."""
    lengths = (ends - starts).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    return np.repeat(starts.astype(np.int64), lengths) + within, offsets


@dataclass(frozen=True)
class EvalBatch:
    """B users, each with the most recent ``max_seq_len`` events before its target.

    ``query_time`` is the target's timestamp, the time the prediction is made for (as in the
    reference HSTU). ``exclude_items`` / ``exclude_offsets`` list, per user, the items left out
    of its ranking: its whole history before the target (``"all"``), the events in the input
    window (``"window"``), or none.
    """

    item_ids: Tensor  # [T] int64
    offsets: Tensor  # [B + 1] int64
    timestamps: Tensor  # [T] int64
    query_time: Tensor  # [B] int64
    targets: Tensor  # [B] int64, item index of each user's target
    exclude_items: Tensor  # [X] int64
    exclude_offsets: Tensor  # [B + 1] int64
    users: Tensor  # [B] int64

    def to(self, device: torch.device, non_blocking: bool = False) -> EvalBatch:
        return EvalBatch(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    @property
    def num_users(self) -> int:
        return self.targets.shape[0]


Exclusion = Literal["all", "window", "none"]
EXCLUSIONS: tuple[str, ...] = ("all", "window", "none")


class EvalSequences:
    """The users that have a ``which`` target under ``split``, ascending, batched on demand."""

    def __init__(
        self,
        data: InteractionData,
        split: Split,
        which: Literal["val", "test"],
        max_seq_len: int,
        exclude: Exclusion = "all",
    ) -> None:
        if exclude not in EXCLUSIONS:
            raise ValueError(f"exclude must be one of {', '.join(EXCLUSIONS)}, got {exclude!r}")
        self.data = data
        self.users = split.users_with(which)
        if len(self.users) == 0:
            raise ValueError(f"no user has a {which} target under protocol {split.protocol!r}")
        self.target_pos = split._targets(which)[self.users]
        self.history_start = data.user_offsets[self.users].astype(np.int64)
        self.window_start = np.maximum(self.history_start, self.target_pos - max_seq_len)
        self.exclude = exclude

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, rows: np.ndarray) -> EvalBatch:
        data = self.data
        seq_index, offsets = concat_ranges(self.window_start[rows], self.target_pos[rows])
        target_pos = self.target_pos[rows]
        if self.exclude != "none":
            first = self.history_start if self.exclude == "all" else self.window_start
            seen, seen_offsets = concat_ranges(first[rows], target_pos)
            exclude_items = data.items[seen]
        else:
            exclude_items = np.zeros(0, dtype=np.int64)
            seen_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        return EvalBatch(
            item_ids=torch.from_numpy(data.items[seq_index].astype(np.int64)),
            offsets=torch.from_numpy(offsets),
            timestamps=torch.from_numpy(data.timestamps[seq_index].astype(np.int64)),
            query_time=torch.from_numpy(data.timestamps[target_pos].astype(np.int64)),
            targets=torch.from_numpy(data.items[target_pos].astype(np.int64)),
            exclude_items=torch.from_numpy(exclude_items.astype(np.int64)),
            exclude_offsets=torch.from_numpy(seen_offsets),
            users=torch.from_numpy(self.users[rows].astype(np.int64)),
        )

    def batches(self, batch_size: int) -> Iterator[EvalBatch]:
        """All users in batches of similar history length: metrics do not depend on the order,
        and backends that pad to the longest sequence of a batch (the CPU one) waste less."""
        for rows in self.batch_rows(batch_size):
            yield self.batch(rows)

    def batch_rows(self, batch_size: int) -> list[np.ndarray]:
        """The rows of each batch that :meth:`batches` yields, in the same order."""
        order = np.argsort(self.target_pos - self.window_start, kind="stable")
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
