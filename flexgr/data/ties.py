"""The order of events that share a timestamp: a seeded hash of their content, not file order.

Why: in MovieLens most ratings share their second with another rating of the same user, and
the source files list those tied rows in a fixed order over items. A stable sort keeps that
order, so the last of several tied events (often the test target) becomes predictable from
item identity alone, a leak that inflates every metric (docs/evaluation.md). Ordering ties by
a hash of (seed, user id, item id) makes the prepared dataset a function of the *set* of rows:
any permutation of the input file gives the same events, byte for byte.

The user id is part of the hash on purpose: a hash of the item alone would be one fixed order
over items again, just as learnable as the file's.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TieOrder = Literal["hash", "file"]
TIE_ORDERS: tuple[str, ...] = ("hash", "file")
DEFAULT_TIE_SEED = 0

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 with full avalanche (wraps, never warns)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _id_hashes(ids: pa.Array, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of every entry's raw id, computed once per distinct id."""
    encoded = pc.dictionary_encode(ids)
    key = int(seed).to_bytes(8, "little", signed=True)
    distinct = np.array(
        [
            int.from_bytes(
                hashlib.blake2b(value.encode("utf-8"), digest_size=8, key=key).digest(), "little"
            )
            for value in encoded.dictionary.to_pylist()
        ],
        dtype=np.uint64,
    )
    return distinct[encoded.indices.to_numpy(zero_copy_only=False)]


def tie_keys(users: pa.Array, items: pa.Array, seed: int = DEFAULT_TIE_SEED) -> np.ndarray:
    """uint64 [E]: the key that orders events of one user with the same timestamp.

    A function of (seed, raw user id, raw item id) only, so it does not depend on row order,
    file format or the dense indices; for one user, the order it gives over items is
    unrelated to the order it gives another user.
    """
    with np.errstate(over="ignore"):
        return _mix64(_id_hashes(users, seed) ^ _mix64(_id_hashes(items, seed) + _GOLDEN))


def event_order(
    user_codes: np.ndarray,
    timestamps: np.ndarray,
    item_codes: np.ndarray,
    ratings: np.ndarray,
    keys: np.ndarray | None,
) -> np.ndarray:
    """Permutation that sorts events by user, then time, then (ties) ``keys``.

    ``keys=None`` keeps tied events in their input order (``ties="file"``). With keys, events
    that tie on the key too (the same user, item and time) are ordered by item and rating, so
    the result is total over the rows' content and any two orders of equal rows are the same.
    """
    if keys is None:
        order = np.argsort(timestamps, kind="stable")
        return order[np.argsort(user_codes[order], kind="stable")]
    # np.lexsort sorts by the last key first.
    return np.lexsort((ratings, item_codes, keys, timestamps, user_codes))
