"""Raw events to :class:`InteractionData`: dense indices and the per-user time order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flexgr.data.dataset import InteractionData
from flexgr.data.events import RawEvents


def build_interactions(name: str, raw: RawEvents) -> InteractionData:
    """Index users (0..U-1) and items (1..I), then order events by user, time, source row.

    Indices follow the natural order of the raw ids (numeric when every id is an integer, else
    by code point), so they do not depend on the row order of the file.
    """
    user_codes, user_ids = index_ids(raw.users)
    item_codes, item_ids = index_ids(raw.items)
    # Two stable passes rather than one lexsort: ties in time (common in MovieLens, where many
    # ratings share a second) must keep the file's order, and stability here is explicit.
    order = np.argsort(raw.timestamps, kind="stable")
    order = order[np.argsort(user_codes[order], kind="stable")]
    counts = np.bincount(user_codes, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return InteractionData(
        name=name,
        user_offsets=offsets,
        items=(item_codes[order] + 1).astype(np.int32),
        timestamps=np.ascontiguousarray(raw.timestamps[order], dtype=np.int64),
        ratings=np.ascontiguousarray(raw.ratings[order], dtype=np.float32),
        num_items=len(item_ids),
        user_ids=user_ids,
        item_ids=item_ids,
    )


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
