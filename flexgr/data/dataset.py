"""The in-memory form of a prepared dataset, as the training code consumes it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from flexgr.data.errors import DataError


@dataclass(frozen=True, eq=False, repr=False)
class InteractionData:
    """All events, grouped by user (CSR style) and in time order inside each user.

    Events of user ``u`` are ``[user_offsets[u], user_offsets[u + 1])``. Item indices start at 1;
    0 is left free for padding. Events that share a timestamp keep their order in the source file.
    """

    name: str
    user_offsets: np.ndarray  # int64 [U + 1]
    items: np.ndarray  # int32 [E], 1..num_items
    timestamps: np.ndarray  # int64 [E]
    ratings: np.ndarray  # float32 [E], NaN where unknown
    num_items: int
    user_ids: list[str]  # index -> raw id
    item_ids: list[str]  # item_ids[i - 1] is the raw id of item index i

    def __post_init__(self) -> None:
        events = len(self.items)
        if len(self.user_offsets) != len(self.user_ids) + 1:
            raise ValueError("user_offsets must have one entry more than user_ids")
        if len(self.timestamps) != events or len(self.ratings) != events:
            raise ValueError("items, timestamps and ratings must have equal length")
        if len(self.item_ids) != self.num_items:
            raise ValueError("item_ids must have num_items entries")
        if len(self.user_offsets) and (
            self.user_offsets[0] != 0 or self.user_offsets[-1] != events
        ):
            raise ValueError("user_offsets must start at 0 and end at the number of events")

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_events(self) -> int:
        return len(self.items)

    def events_of(self, user: int) -> slice:
        """The global event range of user index ``user``."""
        return slice(int(self.user_offsets[user]), int(self.user_offsets[user + 1]))

    def user_index(self, raw: str) -> int:
        """Index of raw user id ``raw``; DataError (not KeyError) when unknown."""
        try:
            return self._user_lookup[raw]
        except KeyError:
            raise DataError(f"unknown user id {raw!r} in dataset {self.name!r}") from None

    def item_index(self, raw: str) -> int:
        """Index (1..num_items) of raw item id ``raw``; DataError when unknown."""
        try:
            return self._item_lookup[raw]
        except KeyError:
            raise DataError(f"unknown item id {raw!r} in dataset {self.name!r}") from None

    # Built on first use: most training runs never look a raw id up.
    @cached_property
    def _user_lookup(self) -> dict[str, int]:
        return {raw: index for index, raw in enumerate(self.user_ids)}

    @cached_property
    def _item_lookup(self) -> dict[str, int]:
        return {raw: index for index, raw in enumerate(self.item_ids, start=1)}

    def __repr__(self) -> str:
        return (
            f"InteractionData(name={self.name!r}, users={self.num_users}, "
            f"items={self.num_items}, events={self.num_events})"
        )
