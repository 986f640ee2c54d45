from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgr.data import (
    InteractionData,
    RawEvents,
    Split,
    build_interactions,
    history_for,
    make_split,
    target_for,
)


def data_with_lengths(lengths: list[int]) -> InteractionData:
    users = [f"u{u:03d}" for u, n in enumerate(lengths) for _ in range(n)]
    items = [str(i % 7) for i in range(len(users))]
    stamps = list(range(len(users)))
    return build_interactions("t", RawEvents.from_lists(users, items, stamps))


def test_loo_val_positions() -> None:
    data = data_with_lengths([5, 3, 2, 1])  # offsets 0, 5, 8, 10, 11
    split = make_split(data)
    assert split.protocol == "loo-val"
    assert split.train_end.tolist() == [3, 6, 9, 11]
    assert split.val_pos.tolist() == [3, 6, -1, -1]
    assert split.test_pos.tolist() == [4, 7, 9, -1]
    for array in (split.train_end, split.val_pos, split.test_pos):
        assert array.dtype == np.int64


def test_loo_val_histories() -> None:
    data = data_with_lengths([5, 2])
    split = make_split(data, "loo-val")
    assert history_for(data, split, 0, "train") == slice(0, 3)
    assert history_for(data, split, 0, "val") == slice(0, 3)
    assert history_for(data, split, 0, "test") == slice(0, 4)  # train + the validation event
    assert target_for(split, 0, "val") == 3 and target_for(split, 0, "test") == 4
    assert history_for(data, split, 1, "train") == slice(5, 6)
    assert history_for(data, split, 1, "test") == slice(5, 6)
    with pytest.raises(ValueError, match="user 1 has no val target"):
        history_for(data, split, 1, "val")


def test_gr_compatible_positions() -> None:
    data = data_with_lengths([5, 2, 1])
    split = make_split(data, "gr-compatible")
    assert split.train_end.tolist() == [4, 6, 8]
    assert split.val_pos.tolist() == [-1, -1, -1]
    assert split.test_pos.tolist() == [4, 6, -1]
    assert history_for(data, split, 0, "test") == slice(0, 4)
    assert split.users_with("test").tolist() == [0, 1]
    assert split.users_with("val").tolist() == []


def test_users_with_and_unknown_protocol() -> None:
    data = data_with_lengths([3, 2, 1])
    split = make_split(data)
    assert split.users_with("val").tolist() == [0]
    assert split.users_with("test").tolist() == [0, 1]
    with pytest.raises(ValueError, match="unknown split protocol 'random'"):
        make_split(data, "random")
    with pytest.raises(ValueError, match="which must be"):
        split.users_with("train")  # type: ignore[arg-type]


# One random event table: users with 1..12 events, timestamps with many ties, shuffled rows.
event_tables = st.lists(
    st.tuples(st.integers(0, 9), st.integers(0, 20), st.integers(0, 5)),  # user, item, time
    min_size=1,
    max_size=80,
)


def assert_no_leakage(data: InteractionData, split: Split) -> None:
    for user in range(data.num_users):
        events = data.events_of(user)
        train = history_for(data, split, user, "train")
        assert train.start == events.start and events.start <= train.stop <= events.stop
        for which in ("val", "test"):
            target = int((split.val_pos if which == "val" else split.test_pos)[user])
            if target < 0:
                continue
            history = history_for(data, split, user, which)
            assert events.start <= target < events.stop  # the target is this user's event
            # neither the training sequence nor the history reaches the target or beyond it
            assert train.stop <= target
            assert history.stop == target
            assert (data.timestamps[history] <= data.timestamps[target]).all()
        if split.val_pos[user] >= 0:
            assert split.val_pos[user] < split.test_pos[user]
            # the test history holds the validation event, the training sequence does not
            test_history = history_for(data, split, user, "test")
            assert test_history.start <= split.val_pos[user] < test_history.stop
            assert split.train_end[user] <= split.val_pos[user]
        # every event is training, a target, or (test-only) history: nothing is dropped silently
        evaluated = {int(p) for p in (split.val_pos[user], split.test_pos[user]) if p >= 0}
        assert set(range(train.start, train.stop)) | evaluated == set(
            range(events.start, events.stop)
        )


@settings(max_examples=150, deadline=None)
@given(rows=event_tables, protocol=st.sampled_from(["loo-val", "gr-compatible"]))
def test_no_training_input_contains_the_target_or_later(
    rows: list[tuple[int, int, int]], protocol: str
) -> None:
    raw = RawEvents.from_lists(
        users=[str(u) for u, _, _ in rows],
        items=[str(i) for _, i, _ in rows],
        timestamps=[t for _, _, t in rows],
    )
    data = build_interactions("random", raw)
    split = make_split(data, protocol)
    assert_no_leakage(data, split)
    lengths = np.diff(data.user_offsets)
    has_test = split.test_pos >= 0
    assert (has_test == (lengths >= 2)).all()
    if protocol == "loo-val":
        assert ((split.val_pos >= 0) == (lengths >= 3)).all()
    else:
        assert (split.val_pos == -1).all()


@settings(max_examples=50, deadline=None)
@given(rows=event_tables)
def test_each_user_is_in_time_order_with_file_ties_in_row_order(
    rows: list[tuple[int, int, int]],
) -> None:
    raw = RawEvents.from_lists(
        users=[str(u) for u, _, _ in rows],
        items=[str(i) for _, i, _ in rows],
        timestamps=[t for _, _, t in rows],
    )
    data = build_interactions("random", raw, ties="file")
    for user in range(data.num_users):
        raw_id = data.user_ids[user]
        expected = sorted(
            ((t, row, str(i)) for row, (u, i, t) in enumerate(rows) if str(u) == raw_id)
        )
        got = data.items[data.events_of(user)]
        assert [data.item_ids[i - 1] for i in got] == [item for _, _, item in expected]
