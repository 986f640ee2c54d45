from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgr.data import RawEvents, build_interactions, make_split
from flexgr.train.batches import (
    EpochBatches,
    ReplicaBatches,
    TrainSequences,
    train_loader,
)


def dataset(lengths: list[int], seed: int = 0):
    """Every event has its own item (item index = global event index + 1), so an item in a batch
    names exactly one event of exactly one user."""
    users, items, times = [], [], []
    rng = np.random.default_rng(seed)
    event = 0
    for u, n in enumerate(lengths):
        ts = np.cumsum(rng.integers(0, 100, n)) + 10_000
        for t in ts:
            users.append(f"{u:05d}")
            items.append(f"{event:06d}")
            times.append(int(t))
            event += 1
    # File-order ties keep "item index = global event index + 1" where timestamps repeat.
    return build_interactions("unique", RawEvents.from_lists(users, items, times), ties="file")


def test_batch_is_jagged_next_item_supervision() -> None:
    data = dataset([5, 3, 2, 1])
    split = make_split(data, "loo-val")
    seqs = TrainSequences(data, split, max_seq_len=10)
    # user 0: 3 training events -> 2 inputs; user 1: 1 training event -> nothing to predict;
    # user 2 (2 events): 1 training event; user 3: 1 event, training only.
    assert seqs.users.tolist() == [0]
    batch = seqs[[0]]
    assert batch.offsets.tolist() == [0, 2]
    assert batch.item_ids.tolist() == [1, 2]
    assert batch.targets.tolist() == [2, 3]
    assert batch.timestamps.tolist() == data.timestamps[:2].tolist()
    assert batch.query_time.tolist() == [int(data.timestamps[2])]  # the last target's time


def test_sequences_keep_the_most_recent_events() -> None:
    data = dataset([30, 12])
    split = make_split(data, "gr-compatible")
    seqs = TrainSequences(data, split, max_seq_len=8)
    batch = seqs[[1, 0]]
    lengths = (batch.offsets[1:] - batch.offsets[:-1]).tolist()
    assert lengths == [8, 8]
    # user 0 trains on events 0..28 (29 is the test target): inputs 20..27, targets 21..28
    first = slice(int(batch.offsets[1]), int(batch.offsets[2]))
    assert batch.item_ids[first].tolist() == list(range(21, 29))
    assert batch.targets[first].tolist() == list(range(22, 30))
    assert batch.users.tolist() == [1, 0]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=12),
    max_seq_len=st.integers(1, 12),
    protocol=st.sampled_from(["loo-val", "gr-compatible"]),
    batch_size=st.integers(1, 5),
)
def test_no_batch_contains_an_evaluated_target_or_anything_after_it(
    lengths: list[int], max_seq_len: int, protocol: str, batch_size: int
) -> None:
    data = dataset(lengths)
    split = make_split(data, protocol)
    seqs = TrainSequences(data, split, max_seq_len)
    sampler = EpochBatches(len(seqs), batch_size, seed=1)
    seen = 0
    for rows in sampler:
        batch = seqs[rows]
        for b, user in enumerate(batch.users.tolist()):
            lo, hi = int(batch.offsets[b]), int(batch.offsets[b + 1])
            events = (
                np.concatenate([batch.item_ids[lo:hi].numpy(), batch.targets[lo:hi].numpy()]) - 1
            )
            start, end = data.user_offsets[user], data.user_offsets[user + 1]
            # Only this user's events, all strictly before the first evaluated event.
            first_eval = min(p for p in (split.val_pos[user], split.test_pos[user], end) if p >= 0)
            assert events.min() >= start and events.max() < first_eval
            assert events.max() < split.train_end[user]
            assert hi - lo <= max_seq_len
            # Timestamps the model reads (inputs and query time) are those of training events.
            assert int(batch.query_time[b]) == int(data.timestamps[events.max()])
            seen += 1
    assert seen == len(seqs)


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochBatches(23, 5, seed=3), EpochBatches(23, 5, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    flat = [i for batch in a for i in batch]
    assert sorted(flat) == list(range(23))
    b.set_epoch(3)
    assert list(a) != list(b)
    b.set_epoch(2, start_batch=3)
    assert list(b) == list(a)[3:] and len(b) == 2


def test_loader_with_workers_builds_the_same_batches() -> None:
    data = dataset([7, 9, 4, 12, 3, 8])
    seqs = TrainSequences(data, make_split(data, "loo-val"), max_seq_len=5)
    sampler = EpochBatches(len(seqs), 2, seed=0)
    serial = [
        b.item_ids.tolist() for b in train_loader(seqs, sampler, num_workers=0, pin_memory=False)
    ]
    loader = train_loader(seqs, sampler, num_workers=2, pin_memory=False)
    parallel = [b.item_ids.tolist() for b in loader]
    assert serial == parallel


def test_loader_leaves_the_global_torch_rng_alone() -> None:
    data = dataset([7, 9, 4])
    seqs = TrainSequences(data, make_split(data, "loo-val"), max_seq_len=5)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for _ in train_loader(
        seqs, EpochBatches(len(seqs), 2, seed=0), num_workers=0, pin_memory=False
    ):
        pass
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("protocol", ["loo-val", "gr-compatible"])
def test_users_without_two_training_events_are_skipped(protocol: str) -> None:
    data = dataset([1, 2, 3, 4])
    seqs = TrainSequences(data, make_split(data, protocol), max_seq_len=5)
    expected = [3] if protocol == "loo-val" else [2, 3]
    assert seqs.users.tolist() == expected


@pytest.mark.parametrize("dp", [1, 2, 3, 7])
def test_replica_parts_tile_the_global_batch_in_token_order(dp: int) -> None:
    data = dataset([5, 3, 2, 9, 4, 6, 2, 8, 3, 7, 5])
    sequences = TrainSequences(data, make_split(data, "loo-val"), max_seq_len=4)
    batches = EpochBatches(len(sequences), batch_size=4, seed=3)
    batches.set_epoch(2, start_batch=1)
    parts = [
        [sequences[p] for p in ReplicaBatches(batches, sequences.lengths, dp, r)]
        for r in range(dp)
    ]
    whole = [sequences[rows] for rows in batches]
    assert all(len(p) == len(whole) for p in parts)
    assert all(full.row_offset == 0 and full.row_total == full.num_tokens for full in whole)
    for b, full in enumerate(whole):
        pieces = [p[b] for p in parts]
        assert all(piece.row_total == full.num_tokens for piece in pieces)
        # Replica r's tokens are rows [row_offset, row_offset + T_r) of the global batch.
        assert [piece.row_offset for piece in pieces] == np.cumsum(
            [0] + [piece.num_tokens for piece in pieces[:-1]]
        ).tolist()
        joined = torch.cat([piece.item_ids for piece in pieces])
        assert torch.equal(joined, full.item_ids)
        assert torch.equal(torch.cat([piece.users for piece in pieces]), full.users)
        sizes = [piece.users.numel() for piece in pieces]
        assert max(sizes) - min(sizes) <= 1
    if dp == 7:  # batches of 4 (and a last one of 2) leave replicas with nothing
        empty = parts[6][0]
        assert empty.num_tokens == 0 and empty.offsets.tolist() == [0]
