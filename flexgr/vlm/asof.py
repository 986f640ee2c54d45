"""Which events each request saw: the one definition both converters and the baseline share.

**Requests.** A user's events at or after ``start_ts`` are grouped into requests (same
timestamp, a session gap, fixed counts, or ``last``: only the events at the user's newest
timestamp, one request per user, the generative-training example); a request's events are its candidates (the
impressions) and their action bits its labels. Its ``request_ts`` is the timestamp of its first
event.

**The leak rule.** The history of a request at ``request_ts = R`` is every event ``e`` of the
user with ``e.timestamp < R`` *and* ``e.arrival_ts < R``, strictly: an event at ``R`` is the
request itself or happens with it, and an event that had not arrived by ``R`` was not visible,
however old its timestamp. The history is in canonical order (time, then tie key; see
:mod:`flexgr.vlm.hashing`) and truncated to its newest ``log_max_len`` events, the longest any
tenant reads.

**Versions.** Compaction ``k`` absorbs the events that arrived before watermark ``W_k``
(``version = k``); a request at ``R`` saw version ``v = #{k : W_k <= R}``. The part of its
history with ``version <= v`` is immutable (rebuilt from the tier), the rest was in the recent
buffer (snapshotted into the example).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from flexgr.data.errors import DataError
from flexgr.vlm.hashing import canonical_order
from flexgr.vlm.schema import EventLog

GroupBy = Literal["timestamp", "session", "count", "last"]
GROUP_BY: tuple[str, ...] = ("timestamp", "session", "count", "last")


@dataclass(frozen=True)
class RequestSpec:
    group_by: GroupBy = "timestamp"
    session_gap: int = 1800  # group_by="session": a gap longer than this starts a request
    count: int = 1  # group_by="count": events per request
    start_ts: int | None = None  # earlier events are history only (None: every event)
    log_max_len: int = 16384

    def __post_init__(self) -> None:
        if self.group_by not in GROUP_BY:
            raise ValueError(
                f"group_by must be one of {', '.join(GROUP_BY)}, not {self.group_by!r}"
            )
        if self.count < 1 or self.session_gap < 0 or self.log_max_len < 1:
            raise ValueError("count and log_max_len must be positive, session_gap non-negative")


@dataclass(frozen=True, eq=False)
class AsOfPlan:
    """Requests as flat arrays; event indices point into ``events`` (canonical order)."""

    events: EventLog
    versions: np.ndarray  # [E] version absorbing each event (len(watermarks) + 1: not yet)
    request_user: np.ndarray  # [R], requests ordered by (request_ts, user, first candidate)
    request_ts: np.ndarray  # [R]
    request_version: np.ndarray  # [R]
    cand_offsets: np.ndarray  # [R + 1]
    cand_index: np.ndarray  # [C]
    hist_offsets: np.ndarray  # [R + 1]
    hist_index: np.ndarray  # [H], each request's history oldest first

    @property
    def num_requests(self) -> int:
        return len(self.request_ts)

    def hist_request(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_requests), np.diff(self.hist_offsets))


def event_versions(arrivals: np.ndarray, watermarks: np.ndarray) -> np.ndarray:
    return np.searchsorted(watermarks, arrivals, side="right").astype(np.int64) + 1


def check_watermarks(watermarks: Sequence[int]) -> np.ndarray:
    marks = np.asarray(watermarks, dtype=np.int64)
    if len(marks) > 1 and np.any(np.diff(marks) <= 0):
        raise DataError(f"compaction watermarks must increase strictly: {marks.tolist()}")
    return marks


def plan_requests(log: EventLog, spec: RequestSpec, watermarks: Sequence[int]) -> AsOfPlan:
    marks = check_watermarks(watermarks)
    versions = event_versions(log.arrivals, marks)
    order = canonical_order(log.users, log.timestamps, log.ties, versions)
    events, versions = log.take(order), versions[order]
    users, ts, arrivals = events.users, events.timestamps, events.arrivals
    starts = (
        np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, int)
    )
    ends = np.r_[starts[1:], len(users)].astype(int)
    request_user, request_ts, first_event, cands, hists = [], [], [], [], []
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        user_ts, user_arrivals = ts[a:b], arrivals[a:b]
        eligible = (
            np.arange(a, b)
            if spec.start_ts is None
            else a + np.flatnonzero(user_ts >= spec.start_ts)
        )
        if not len(eligible):
            continue
        for group in _groups(ts[eligible], spec):
            members = eligible[group]
            request = int(ts[members[0]])
            before = int(np.searchsorted(user_ts, request, side="left"))  # ts < request
            visible = np.flatnonzero(user_arrivals[:before] < request)[-spec.log_max_len :]
            request_user.append(int(users[a]))
            request_ts.append(request)
            first_event.append(int(members[0]))
            cands.append(members)
            hists.append(a + visible)
    by_time = (
        np.lexsort((first_event, request_user, request_ts)) if request_ts else np.zeros(0, int)
    )
    request_ts_array = np.asarray(request_ts, dtype=np.int64)[by_time]
    return AsOfPlan(
        events=events,
        versions=versions,
        request_user=np.asarray(request_user, dtype=np.int64)[by_time],
        request_ts=request_ts_array,
        request_version=np.searchsorted(marks, request_ts_array, side="right").astype(np.int64),
        cand_offsets=_offsets([len(cands[i]) for i in by_time]),
        cand_index=_concat([cands[i] for i in by_time]),
        hist_offsets=_offsets([len(hists[i]) for i in by_time]),
        hist_index=_concat([hists[i] for i in by_time]),
    )


def _groups(timestamps: np.ndarray, spec: RequestSpec) -> list[np.ndarray]:
    """Index ranges (into ``timestamps``, sorted) of the requests."""
    n = len(timestamps)
    if spec.group_by == "last":  # the events at the newest timestamp
        return [np.arange(int(np.searchsorted(timestamps, timestamps[-1])), n)]
    if spec.group_by == "timestamp":
        new = np.r_[True, timestamps[1:] != timestamps[:-1]]
    elif spec.group_by == "session":
        new = np.r_[True, np.diff(timestamps) > spec.session_gap]
    else:
        new = np.arange(n) % spec.count == 0
    heads = np.flatnonzero(new)
    return [np.arange(h, t) for h, t in zip(heads, np.r_[heads[1:], n], strict=True)]


def _offsets(lengths: list[int]) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
