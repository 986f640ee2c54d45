"""64-bit hashes: user buckets, the order of tied events, and the history checksum.

Everything here is a pure function of event *content*, never of file or arrival order, so the
online logger, the compaction job, the fat-row baseline and the loader agree on it without
sharing state.

The history checksum is ``sum_j h(ts_j, item_j, j) mod 2**64`` where ``j`` counts positions
from the *end* of the history (the newest event has ``j = 0``). Counting from the end makes the
checksum of the last ``L`` events a prefix of the same sum, so an example can carry the checksums
of a few tail lengths and a tenant that reads only its last ``max_len`` events still verifies
exactly what it read (see :func:`checkpoint_lengths`). It is a checksum against bugs and torn
data, not a cryptographic hash.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Tail checksums are kept at 256, 512, 1024, ... events: a tenant whose max_len is a power of two
# from 256 on reads exactly its window; any other max_len reads at most twice its window.
TAIL_CHECKPOINT_BASE = 256

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ITEM = np.uint64(0xD6E8FEB86659FD93)
_POS = np.uint64(0xA0761D6478BD642F)
_USER_SALT = np.uint64(0x243F6A8885A308D3)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 (a bijection with full avalanche; wraps silently)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        return x ^ (x >> np.uint64(31))


def as_u64(values: np.ndarray) -> np.ndarray:
    """The bits of an integer or float column as uint64 (floats by their bit pattern)."""
    values = np.ascontiguousarray(values)
    if values.dtype.kind == "f":
        width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[values.dtype.itemsize]
        return values.view(width).astype(np.uint64)
    if values.dtype.kind == "b":
        return values.astype(np.uint64)
    return values.astype(np.int64, copy=False).view(np.uint64)


def user_hash(users: np.ndarray) -> np.ndarray:
    """uint64 hash of user ids: buckets the tier and shards the loader with the same key."""
    return mix64(as_u64(users) ^ _USER_SALT)


def bucket_of(users: np.ndarray, num_buckets: int) -> np.ndarray:
    return (user_hash(users) % np.uint64(num_buckets)).astype(np.int64)


def tie_keys(
    users: np.ndarray, items: np.ndarray, actions: np.ndarray, side: Sequence[np.ndarray] = ()
) -> np.ndarray:
    """uint64 key ordering a user's events that share a timestamp: a hash of their content.

    Not item-id order (flexgr.data.ties explains why that leaks), not file order (compaction
    and the converters see the same events in different orders).
    """
    with np.errstate(over="ignore"):
        key = mix64(as_u64(items) * _ITEM + as_u64(actions))
        for column in side:
            key = mix64(key ^ as_u64(column))
        return mix64(key ^ mix64(as_u64(users) + _GOLDEN))


def canonical_order(
    users: np.ndarray, timestamps: np.ndarray, ties: np.ndarray, versions: np.ndarray
) -> np.ndarray:
    """Permutation sorting events by user, time, tie key, then compaction version.

    Events equal in all four are equal in content, so their relative order cannot matter.
    """
    return np.lexsort((versions, ties, timestamps, users))


def event_hashes(timestamps: np.ndarray, items: np.ndarray, from_end: np.ndarray) -> np.ndarray:
    """uint64 per-event terms of the history checksum; ``from_end`` is 0 for the newest event."""
    with np.errstate(over="ignore"):
        return mix64(
            mix64(as_u64(timestamps) ^ _GOLDEN)
            + as_u64(items) * _ITEM
            + (as_u64(from_end) + np.uint64(1)) * _POS
        )


def checkpoint_lengths(history_len: int) -> list[int]:
    """Tail lengths (shorter than the history) whose checksums an example carries."""
    lengths, length = [], TAIL_CHECKPOINT_BASE
    while length < history_len:
        lengths.append(length)
        length *= 2
    return lengths


def read_length(history_len: int, max_len: int) -> tuple[int, int]:
    """(events to read from the end, tail checkpoint index or -1 for the full history).

    The shortest verifiable tail that covers ``max_len``: a tenant never reads more than twice
    its window (from 256 on), and never trusts events it could not check.
    """
    if max_len >= history_len:
        return history_len, -1
    for index, length in enumerate(checkpoint_lengths(history_len)):
        if length >= max_len:
            return length, index
    return history_len, -1


def history_checksum(timestamps: np.ndarray, items: np.ndarray) -> tuple[int, list[int]]:
    """(checksum of the whole history, checksums of its checkpoint tails) for one sequence."""
    n = len(timestamps)
    if n == 0:
        return 0, []
    terms = event_hashes(timestamps, items, np.arange(n - 1, -1, -1, dtype=np.int64))
    from_end = np.cumsum(terms[::-1])  # uint64 wraps, which is the modular sum wanted
    return int(from_end[-1]), [int(from_end[length - 1]) for length in checkpoint_lengths(n)]
