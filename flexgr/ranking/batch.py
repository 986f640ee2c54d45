"""Ranking batches: B histories (with their actions) and each one's candidates, packed jagged.

Two example layouts build the same kind of batch from the same requests:

- ``request`` (ROO): one sequence per request, its k impressions the candidates of that one
  sequence, so the history is stored and encoded once for k impressions;
- ``impression``: one sequence per impression, the request's history repeated for each.

A model sees each candidate after its own sequence's history only (target-aware), so the two
give the same prediction for every impression (tests/ranking/test_layouts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from flexgr.data import InteractionData
from flexgr.ranking.requests import Requests
from flexgr.ranking.tasks import Task, action_codes, event_labels


@dataclass(frozen=True)
class RankingBatch:
    """History events ``[history_offsets[b], history_offsets[b + 1])`` and candidates
    ``[candidate_offsets[b], candidate_offsets[b + 1])`` of sequence b. ``query_time`` [B] is the
    request time (candidates are scored at it). Labels, where present, are per candidate."""

    history_items: Tensor  # [H] int64, 1..num_items
    history_actions: Tensor  # [H, A] int64 action codes
    history_timestamps: Tensor  # [H] int64
    history_offsets: Tensor  # [B + 1] int64
    candidates: Tensor  # [C] int64 item ids
    candidate_offsets: Tensor  # [B + 1] int64
    query_time: Tensor  # [B] int64
    labels: Tensor | None = None  # [C, K] float32
    known: Tensor | None = None  # [C, K] bool: the label exists
    users: Tensor | None = None  # [C] int64: the impression's user (GAUC groups)

    @property
    def num_sequences(self) -> int:
        return self.history_offsets.shape[0] - 1

    @property
    def num_candidates(self) -> int:
        return self.candidates.shape[0]

    @property
    def num_history(self) -> int:
        return self.history_items.shape[0]

    @property
    def device(self) -> torch.device:
        return self.candidates.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RankingBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }
        return replace(self, **moved)

    def nbytes(self) -> int:
        """Bytes of the batch's tensors: what an example store holds for these examples."""
        return sum(
            getattr(self, f.name).nbytes for f in fields(self) if getattr(self, f.name) is not None
        )


@dataclass(frozen=True, eq=False)
class RankingEvents:
    """Per-event arrays a batch is cut from: items, timestamps, action codes, labels."""

    items: np.ndarray  # int64 [E]
    timestamps: np.ndarray  # int64 [E]
    actions: np.ndarray  # int64 [E, A]
    labels: np.ndarray  # float32 [E, K]
    known: np.ndarray  # bool [E, K]
    users: np.ndarray  # int64 [E]

    @staticmethod
    def of(data: InteractionData, action_inputs: list[str], tasks: list[Task]) -> RankingEvents:
        labels, known = event_labels(tasks, data)
        users = np.repeat(np.arange(data.num_users, dtype=np.int64), np.diff(data.user_offsets))
        return RankingEvents(
            items=data.items.astype(np.int64),
            timestamps=data.timestamps.astype(np.int64),
            actions=action_codes(action_inputs, data),
            labels=labels,
            known=known,
            users=users,
        )


def ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(starts[i], ends[i])`` over i, without a Python loop."""
    lengths = (ends - starts).astype(np.int64)
    total = int(lengths.sum())
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return (shift + np.arange(total, dtype=np.int64)).astype(np.int64)


def pack(
    events: RankingEvents,
    history_start: np.ndarray,
    history_end: np.ndarray,
    candidates: np.ndarray,
    candidate_counts: np.ndarray,
    query_time: np.ndarray,
) -> RankingBatch:
    """B sequences: history events ``[history_start[b], history_end[b])`` and the
    ``candidate_counts[b]`` next entries of ``candidates`` (event indices), scored at
    ``query_time[b]``."""
    history = ranges(history_start, history_end)
    return RankingBatch(
        history_items=torch.from_numpy(events.items[history]),
        history_actions=torch.from_numpy(events.actions[history]),
        history_timestamps=torch.from_numpy(events.timestamps[history]),
        history_offsets=_offsets(history_end - history_start),
        candidates=torch.from_numpy(events.items[candidates]),
        candidate_offsets=_offsets(candidate_counts),
        query_time=torch.from_numpy(np.ascontiguousarray(query_time, dtype=np.int64)),
        labels=torch.from_numpy(events.labels[candidates]),
        known=torch.from_numpy(events.known[candidates]),
        users=torch.from_numpy(events.users[candidates]),
    )


def request_batch(events: RankingEvents, requests: Requests, rows: np.ndarray) -> RankingBatch:
    """ROO: one sequence per request of ``rows``, its impressions the candidates."""
    chosen = requests.take(rows)
    return pack(
        events,
        chosen.history_start,
        chosen.start,
        ranges(chosen.start, chosen.end),
        chosen.sizes,
        events.timestamps[chosen.start],
    )


def impression_batch(
    events: RankingEvents, requests: Requests, rows: np.ndarray, impressions: np.ndarray
) -> RankingBatch:
    """Impression level: one sequence per (request row, impression event) pair, the request's
    history repeated in each, scored at the request time."""
    chosen = requests.take(rows)
    return pack(
        events,
        chosen.history_start,
        chosen.start,
        impressions,
        np.ones(len(rows), dtype=np.int64),
        events.timestamps[chosen.start],
    )


def _offsets(lengths: np.ndarray) -> Tensor:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return torch.from_numpy(out)
