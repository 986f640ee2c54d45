"""The in-memory form of a prepared dataset, as the training code consumes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from flexgr.data.errors import DataError

ItemPool = Literal["rated", "catalog"]
ITEM_POOLS: tuple[str, ...] = ("rated", "catalog")


@dataclass(frozen=True, eq=False, repr=False)
class InteractionData:
    """All events, grouped by user (CSR style) and in time order inside each user.

    Events of user ``u`` are ``[user_offsets[u], user_offsets[u + 1])``. Item indices start at 1;
    0 is left free for padding. Events that share a timestamp are in the order the dataset was
    prepared with (a seeded hash by default; meta.json says which).

    Items: 1..num_items were rated at least once (``item_ids``); where the source has an item
    catalogue, its never-rated items follow as num_items+1..num_catalog_items (``catalog_ids``).
    An item pool (:data:`ITEM_POOLS`) picks which of them a model ranks and samples.
    """

    name: str
    user_offsets: np.ndarray  # int64 [U + 1]
    items: np.ndarray  # int32 [E], 1..num_items
    timestamps: np.ndarray  # int64 [E]
    ratings: np.ndarray  # float32 [E], NaN where unknown
    num_items: int
    user_ids: list[str]  # index -> raw id
    item_ids: list[str]  # item_ids[i - 1] is the raw id of item index i
    catalog_ids: list[str] = field(default_factory=list)  # raw ids of num_items+1, ...
    # Action columns by name, int64 [E] each, in event order (empty: the source had none).
    actions: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        events = len(self.items)
        if len(self.user_offsets) != len(self.user_ids) + 1:
            raise ValueError("user_offsets must have one entry more than user_ids")
        if len(self.timestamps) != events or len(self.ratings) != events:
            raise ValueError("items, timestamps and ratings must have equal length")
        if any(len(values) != events for values in self.actions.values()):
            raise ValueError("every action column must have one value per event")
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

    @property
    def num_catalog_items(self) -> int:
        """Items of the catalogue: the rated ones and, after them, the never-rated ones."""
        return self.num_items + len(self.catalog_ids)

    def pool_size(self, pool: ItemPool) -> int:
        """Items a model ranks and samples from under ``pool``: indices 1..pool_size."""
        if pool == "rated":
            return self.num_items
        if pool == "catalog":
            return self.num_catalog_items
        raise ValueError(f"unknown item pool {pool!r}; expected one of {', '.join(ITEM_POOLS)}")

    def pool_item_ids(self, pool: ItemPool) -> list[str]:
        """Raw ids of items 1..pool_size(pool), in index order."""
        return self.item_ids if pool == "rated" else [*self.item_ids, *self.catalog_ids]

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
        return {raw: index for index, raw in enumerate(self.pool_item_ids("catalog"), start=1)}

    def __repr__(self) -> str:
        return (
            f"InteractionData(name={self.name!r}, users={self.num_users}, "
            f"items={self.num_items}, catalog={self.num_catalog_items}, events={self.num_events})"
        )
