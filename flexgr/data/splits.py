"""Leave-one-out train / validation / test splits over each user's time-ordered events.

Protocols
---------
``loo-val`` (default), per user with ``n`` events:
    n >= 3: the last event is the test target, the one before it the validation target, the
            rest (n - 2 events) is training.
    n == 2: first event training, last event test target; no validation target (a user is
            never spent on validation when it would leave nothing to test).
    n == 1: training only; never evaluated (there is no history to predict from).
``gr-compatible``, the protocol of the reference HSTU README:
    n >= 2: all but the last event is training, the last one is the test target.
    n == 1: training only. There is no validation target for anybody.

Histories: the validation target is predicted from the events before it (the training events);
the test target from every event before it (training plus the validation event).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from flexgr.data.dataset import InteractionData

PROTOCOLS = ("loo-val", "gr-compatible")
Which = Literal["train", "val", "test"]


@dataclass(frozen=True, eq=False)
class Split:
    """Per-user split positions, as global event indices into :class:`InteractionData`.

    Training events of user ``u`` are ``[user_offsets[u], train_end[u])``; ``val_pos[u]`` and
    ``test_pos[u]`` are the targets' event indices, -1 where the user has none.
    """

    protocol: str
    train_end: np.ndarray  # int64 [U]
    val_pos: np.ndarray  # int64 [U]
    test_pos: np.ndarray  # int64 [U]

    def users_with(self, which: Literal["val", "test"]) -> np.ndarray:
        """Indices of the users that have a ``which`` target, ascending."""
        return np.flatnonzero(self._targets(which) >= 0)

    def _targets(self, which: str) -> np.ndarray:
        if which == "val":
            return self.val_pos
        if which == "test":
            return self.test_pos
        raise ValueError(f"which must be 'val' or 'test', got {which!r}")


def make_split(data: InteractionData, protocol: str = "loo-val") -> Split:
    """Split every user's events by ``protocol``: ``"loo-val"`` or ``"gr-compatible"``.

    Short users (see the module docstring for the full rules): with 2 events, the first trains
    and the second is the test target (no validation target); with 1 event, training only.
    """
    starts = data.user_offsets[:-1].astype(np.int64)
    ends = data.user_offsets[1:].astype(np.int64)
    lengths = ends - starts
    none = np.full(len(starts), -1, dtype=np.int64)
    if protocol == "loo-val":
        test_pos = np.where(lengths >= 2, ends - 1, -1)
        val_pos = np.where(lengths >= 3, ends - 2, -1)
        train_end = np.where(lengths >= 3, ends - 2, np.where(lengths == 2, ends - 1, ends))
        return Split(
            protocol,
            train_end.astype(np.int64),
            val_pos.astype(np.int64),
            test_pos.astype(np.int64),
        )
    if protocol == "gr-compatible":
        test_pos = np.where(lengths >= 2, ends - 1, -1)
        train_end = np.where(lengths >= 2, ends - 1, ends)
        return Split(protocol, train_end.astype(np.int64), none, test_pos.astype(np.int64))
    raise ValueError(f"unknown split protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")


def history_for(data: InteractionData, split: Split, user: int, which: Which) -> slice:
    """Global event range a model may see for ``user``: its training sequence for ``"train"``,
    or everything strictly before the ``"val"`` / ``"test"`` target. ValueError if the user
    has no such target."""
    start = int(data.user_offsets[user])
    if which == "train":
        return slice(start, int(split.train_end[user]))
    target = int(split._targets(which)[user])
    if target < 0:
        raise ValueError(f"user {user} has no {which} target under {split.protocol!r}")
    return slice(start, target)


def target_for(split: Split, user: int, which: Literal["val", "test"]) -> int:
    """Global event index of ``user``'s ``which`` target; ValueError if there is none."""
    target = int(split._targets(which)[user])
    if target < 0:
        raise ValueError(f"user {user} has no {which} target under {split.protocol!r}")
    return target
