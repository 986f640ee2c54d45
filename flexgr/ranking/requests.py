"""Requests from event logs, and the leak-free split of a user's requests.

A request is (user, request time, the history strictly before it, its impressions): a run of
the user's consecutive events, grouped by ``ranking.requests``. Its impressions are the events
of the run; their labels are what the user did with them. The request time is the first
impression's timestamp, and the history is the ``max_seq_len`` events before the request's first
event, so no impression ever sees another one of its request or anything later.

The split follows the retrieval protocol on requests instead of events (``loo-val``): a user's
last request is its test request, the one before its validation request, the rest train
(two requests: train and test; one: train only). ``gr-compatible``: the last is test, no
validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from flexgr.data import InteractionData
from flexgr.ranking.config import RankingConfig

Which = Literal["train", "val", "test"]


@dataclass(frozen=True, eq=False)
class Requests:
    """Requests as global event ranges: impressions ``[start[r], end[r])``, history
    ``[history_start[r], start[r])`` (at most ``max_seq_len`` events), all of user ``user[r]``,
    in user and time order."""

    user: np.ndarray  # int64 [R]
    start: np.ndarray  # int64 [R]
    end: np.ndarray  # int64 [R]
    history_start: np.ndarray  # int64 [R]

    def __len__(self) -> int:
        return len(self.user)

    @property
    def sizes(self) -> np.ndarray:
        return self.end - self.start

    @property
    def history_lengths(self) -> np.ndarray:
        return self.start - self.history_start

    def take(self, rows: np.ndarray) -> Requests:
        return Requests(self.user[rows], self.start[rows], self.end[rows], self.history_start[rows])


def request_starts(data: InteractionData, cfg: RankingConfig) -> np.ndarray:
    """bool [E]: events that open a request under ``cfg.requests``."""
    E = data.num_events
    offsets = data.user_offsets.astype(np.int64)
    user_of = np.repeat(np.arange(data.num_users, dtype=np.int64), np.diff(offsets))
    first = np.zeros(E, dtype=bool)
    first[offsets[:-1][np.diff(offsets) > 0]] = True
    events = np.arange(E, dtype=np.int64)
    k = cfg.request_size
    if cfg.requests == "fixed":
        # Counted back from the user's last event, so the last request is always k events.
        from_end = offsets[1:][user_of] - 1 - events
        chunk = from_end // k
        opens = first.copy()
        opens[1:] |= chunk[1:] != chunk[:-1]
        return opens
    ts = data.timestamps
    opens = first.copy()
    if cfg.requests == "timestamp":
        opens[1:] |= ts[1:] != ts[:-1]
    elif cfg.requests == "session":
        opens[1:] |= (ts[1:] - ts[:-1]) > cfg.session_gap
    else:
        raise ValueError(f"unknown ranking.requests {cfg.requests!r}")
    # Cap runs at k events: inside a run, every k-th event opens a new request.
    run_start = np.maximum.accumulate(np.where(opens, events, 0))
    return opens | ((events - run_start) % k == 0)


def build_requests(data: InteractionData, cfg: RankingConfig, max_seq_len: int) -> Requests:
    """Every request of every user with at least ``cfg.min_history`` earlier events."""
    opens = request_starts(data, cfg)
    start = np.flatnonzero(opens).astype(np.int64)
    end = np.append(start[1:], data.num_events).astype(np.int64)
    offsets = data.user_offsets.astype(np.int64)
    user = np.searchsorted(offsets, start, side="right") - 1
    user_start = offsets[user]
    keep = start - user_start >= cfg.min_history
    start, end, user, user_start = start[keep], end[keep], user[keep], user_start[keep]
    history_start = np.maximum(user_start, start - max_seq_len)
    return Requests(user.astype(np.int64), start, end, history_start)


@dataclass(frozen=True, eq=False)
class RequestSplit:
    """Row indices into one :class:`Requests` for each split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def rows(self, which: Which) -> np.ndarray:
        return {"train": self.train, "val": self.val, "test": self.test}[which]


def split_requests(requests: Requests, protocol: str = "loo-val") -> RequestSplit:
    """Per user, the last request is test and (loo-val, 3+ requests) the one before it val."""
    R = len(requests)
    rows = np.arange(R, dtype=np.int64)
    # Requests are grouped by user: count each user's requests back from its last one (0).
    counts = np.bincount(requests.user) if R else np.zeros(0, dtype=np.int64)
    first_row = np.concatenate([[0], np.cumsum(counts)])[requests.user]
    per_user = counts[requests.user]
    from_end = first_row + per_user - 1 - rows
    if protocol == "loo-val":
        test = (from_end == 0) & (per_user >= 2)
        val = (from_end == 1) & (per_user >= 3)
    elif protocol == "gr-compatible":
        test = (from_end == 0) & (per_user >= 2)
        val = np.zeros(R, dtype=bool)
    else:
        raise ValueError(f"unknown split protocol {protocol!r}")
    train = ~(test | val)
    return RequestSplit(rows[train], rows[val], rows[test])


def impressions_of(requests: Requests) -> tuple[np.ndarray, np.ndarray]:
    """(request row [N], event index [N]) of every impression, in request order."""
    sizes = requests.sizes
    row = np.repeat(np.arange(len(requests), dtype=np.int64), sizes)
    first = np.repeat(requests.start - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
    return row, first + np.arange(int(sizes.sum()), dtype=np.int64)


def sample_per_user(users: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions into ``users`` (grouped by user): at most ``n`` per user, drawn without
    replacement, ascending."""
    if n <= 0 or len(users) == 0:
        return np.arange(len(users), dtype=np.int64)
    keys = rng.random(len(users))
    order = np.lexsort((keys, users))  # by user, then at random
    starts = np.flatnonzero(np.concatenate([[True], users[order][1:] != users[order][:-1]]))
    rank = np.arange(len(users)) - np.repeat(starts, np.diff(np.append(starts, len(users))))
    return np.sort(order[rank < n]).astype(np.int64)
