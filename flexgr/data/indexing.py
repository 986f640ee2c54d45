"""Raw events to :class:`InteractionData`: dense indices and the per-user time order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flexgr.data.dataset import InteractionData
from flexgr.data.errors import DataError
from flexgr.data.events import RawEvents
from flexgr.data.ties import DEFAULT_TIE_SEED, TIE_ORDERS, event_order, tie_keys


def build_interactions(
    name: str,
    raw: RawEvents,
    *,
    ties: str = "hash",
    tie_seed: int = DEFAULT_TIE_SEED,
    catalog: pa.Array | None = None,
) -> InteractionData:
    """Index users (0..U-1) and items (1..I), then order events by user, time and tie key.

    Indices follow the natural order of the raw ids (numeric when every id is an integer, else
    by code point), so they do not depend on the row order of the file. Events of one user
    with the same timestamp are ordered by a seeded hash of (user id, item id) with
    ``ties="hash"`` (see :mod:`flexgr.data.ties`), or kept in file order with ``ties="file"``,
    which can leak the file's item order into evaluation.

    ``catalog`` lists the raw ids of every item that exists (an item file); the ones no event
    mentions get the indices after the rated items, I+1..C, in natural order.
    """
    if ties not in TIE_ORDERS:
        raise DataError(f"unknown tie order {ties!r}; expected one of {', '.join(TIE_ORDERS)}")
    user_codes, user_ids = index_ids(raw.users)
    item_codes, item_ids = index_ids(raw.items)
    keys = tie_keys(raw.users, raw.items, tie_seed) if ties == "hash" else None
    order = event_order(user_codes, raw.timestamps, item_codes, raw.ratings, keys)
    counts = np.bincount(user_codes, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return InteractionData(
        name=name,
        user_offsets=offsets,
        items=(item_codes[order] + 1).astype(np.int32),
        timestamps=np.ascontiguousarray(raw.timestamps[order], dtype=np.int64),
        ratings=np.ascontiguousarray(raw.ratings[order], dtype=np.float32),
        actions={
            name: np.ascontiguousarray(values[order], dtype=np.int64)
            for name, values in raw.actions.items()
        },
        num_items=len(item_ids),
        user_ids=user_ids,
        item_ids=item_ids,
        catalog_ids=unrated_catalog_ids(catalog, raw.items) if catalog is not None else [],
    )


def unrated_catalog_ids(catalog: pa.Array, rated: pa.Array) -> list[str]:
    """The distinct ids of ``catalog`` that are not in ``rated``, in natural order."""
    distinct = pc.unique(catalog)
    unrated = distinct.filter(pc.invert(pc.is_in(distinct, value_set=pc.unique(rated))))
    return unrated.take(pa.array(natural_order(unrated))).to_pylist() if len(unrated) else []


def index_ids(ids: pa.Array) -> tuple[np.ndarray, list[str]]:
    """(0-based code of each entry, the distinct ids in code order)."""
    encoded = pc.dictionary_encode(ids)
    distinct = encoded.dictionary
    rank = natural_order(distinct)  # rank[k] = dictionary position of the k-th smallest id
    code_of_position = np.empty(len(distinct), dtype=np.int64)
    code_of_position[rank] = np.arange(len(distinct), dtype=np.int64)
    codes = code_of_position[encoded.indices.to_numpy(zero_copy_only=False)]
    return codes, distinct.take(pa.array(rank)).to_pylist()


def natural_order(ids: pa.Array) -> np.ndarray:
    """Sort permutation of string ids: numerically if all are integers, else by code point."""
    try:
        as_int = pc.cast(ids, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pc.sort_indices(ids).to_numpy()
    # The string breaks ties such as "7" vs "007", keeping the order total.
    keyed = pa.table({"number": as_int, "text": ids})
    return pc.sort_indices(
        keyed, sort_keys=[("number", "ascending"), ("text", "ascending")]
    ).to_numpy()
