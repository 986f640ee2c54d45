"""Raw events as read from a file, before any indexing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class RawEvents:
    """Columns of one interaction file, in the file's row order.

    Ids stay Arrow string arrays: a million Python ``str`` objects would cost more time and memory
    than everything else in the pipeline together.
    """

    users: pa.Array  # string, raw user ids
    items: pa.Array  # string, raw item ids
    ratings: np.ndarray  # float32, NaN where the source has no rating
    timestamps: np.ndarray  # int64, as written in the source (seconds for MovieLens)
    # Action columns by name (ranking: clicks, likes, watch buckets, bit fields), int64 >= 0 each;
    # empty for formats without them. MovieLens' action is its rating, already in ``ratings``.
    actions: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.users)
        if not (len(self.items) == len(self.ratings) == len(self.timestamps) == n):
            raise ValueError("RawEvents columns must have equal length")
        if any(len(values) != n for values in self.actions.values()):
            raise ValueError("RawEvents action columns must have one value per event")

    def __len__(self) -> int:
        return len(self.users)

    @staticmethod
    def unknown_ratings(n: int) -> np.ndarray:
        return np.full(n, np.nan, dtype=np.float32)

    @staticmethod
    def from_lists(
        users: list[str],
        items: list[str],
        timestamps: list[int],
        ratings: list[float] | None = None,
        actions: dict[str, list[int]] | None = None,
    ) -> RawEvents:
        """Small in-memory tables (tests, notebooks)."""
        return RawEvents(
            users=pa.array(users, pa.string()),
            items=pa.array(items, pa.string()),
            ratings=(
                RawEvents.unknown_ratings(len(users))
                if ratings is None
                else np.asarray(ratings, dtype=np.float32)
            ),
            timestamps=np.asarray(timestamps, dtype=np.int64),
            actions={k: np.asarray(v, dtype=np.int64) for k, v in (actions or {}).items()},
        )
