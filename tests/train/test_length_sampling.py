"""Stochastic Length in the batch builder: the rule, determinism, and replica token counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flexgr.data import RawEvents, build_interactions, make_split
from flexgr.train import fit
from flexgr.train.batches import BatchRows, EpochBatches, ReplicaBatches, TrainSequences
from flexgr.train.length_sampling import LengthSampler
from flexgr.train.stochastic_length import keep_full_probability, select_events, sl_threshold
from tests.conftest import tiny_config


def dataset(users: int = 400, seed: int = 0):
    """Each event its own item (item index = event index + 1), strictly increasing times."""
    rng = np.random.default_rng(seed)
    u, i, t = [], [], []
    event = 0
    for user in range(users):
        for k in range(int(rng.integers(3, 40))):
            u.append(f"{user:04d}")
            i.append(f"{event:06d}")
            t.append(1000 * user + k)
            event += 1
    return build_interactions("sl", RawEvents.from_lists(u, i, t))


def sequences(alpha: float = 1.5, selection: str = "recent", max_len: int = 20):
    data = dataset()
    sampler = LengthSampler(alpha, max_len, selection, seed=7)
    return data, TrainSequences(data, make_split(data, "loo-val"), max_len, sampler)


@pytest.mark.parametrize("selection", ["recent", "random", "weighted"])
def test_kept_events_are_an_ordered_subsequence_ending_at_the_last_target(selection) -> None:
    data, seqs = sequences(selection=selection)
    threshold = sl_threshold(20, 1.5)
    rows = list(range(len(seqs)))
    batch = seqs[BatchRows(rows, epoch=3)]
    off = batch.offsets.numpy()
    for b, row in enumerate(rows):
        lo, hi = off[b], off[b + 1]
        inputs, targets = batch.item_ids[lo:hi].numpy() - 1, batch.targets[lo:hi].numpy() - 1
        full = seqs.lengths[row]
        assert hi - lo in (full, threshold)
        kept = np.concatenate([inputs[:1], targets])  # item = event + 1
        assert (np.diff(kept) > 0).all()  # time order, no repeats
        assert (inputs[1:] == targets[:-1]).all()  # position t predicts the next kept event
        assert kept[0] >= seqs.window_start[row] and kept[-1] == seqs.window_end[row] - 1
        if selection == "recent":
            assert (np.diff(kept) == 1).all()  # the most recent events, contiguous
        assert int(batch.query_time[b]) == int(data.timestamps[kept[-1]])


def events_one_by_one(
    sampler: LengthSampler, seqs: TrainSequences, rows: np.ndarray, epoch: int
) -> list[np.ndarray]:
    """The kept events of each sequence on its own, written out from the rule: the last k
    events of the window, or (random / weighted, cut windows only) select_events' draw from the
    sequence's own (seed, epoch, row) stream."""
    out = []
    for row in rows:
        start, end = int(seqs.window_start[row]), int(seqs.window_end[row])
        k = int(sampler.input_lengths(np.array([row]), np.array([end - start - 1]), epoch)[0]) + 1
        if k == end - start or sampler.selection == "recent":
            out.append(np.arange(end - k, end))
            continue
        rng = np.random.default_rng([sampler.seed, epoch, int(row), 1])
        local = select_events(
            np.array([0, end - start]),
            seqs.timestamps[start:end],
            np.array([k]),
            sampler.selection,
            rng,
            keep_last=True,
        )
        out.append(start + local)
    return out


@pytest.mark.parametrize("selection", ["recent", "random", "weighted"])
def test_batched_events_equal_the_rule_sequence_by_sequence(selection: str) -> None:
    _, seqs = sequences(selection=selection)
    sampler = seqs.sampler
    assert sampler is not None
    rows = np.random.default_rng(1).permutation(len(seqs))[:150]
    for epoch in (1, 2, 9):
        index, offsets = sampler.events(
            rows, seqs.window_start[rows], seqs.window_end[rows], seqs.timestamps, epoch
        )
        expected = events_one_by_one(sampler, seqs, rows, epoch)
        assert offsets.tolist() == np.cumsum([0] + [len(e) for e in expected]).tolist()
        assert index.dtype == np.int64
        assert np.array_equal(index, np.concatenate(expected))
    assert any(len(e) < seqs.window_end[r] - seqs.window_start[r] for r, e in zip(rows, expected))


def test_draws_depend_on_seed_epoch_and_sequence_only() -> None:
    _, seqs = sequences(selection="random")
    rows = list(range(60))
    together = seqs[BatchRows(rows, epoch=5)]
    alone = [seqs[BatchRows([r], epoch=5)] for r in reversed(rows)][::-1]
    joined = np.concatenate([a.item_ids.numpy() for a in alone])
    assert (joined == together.item_ids.numpy()).all()
    other_epoch = seqs[BatchRows(rows, epoch=6)]
    assert not np.array_equal(other_epoch.item_ids.numpy(), together.item_ids.numpy())


def test_cut_rate_follows_the_rule() -> None:
    _, seqs = sequences()
    rows = np.arange(len(seqs))
    full = seqs.lengths
    threshold = sl_threshold(20, 1.5)
    long = full > threshold
    expected = (1 - keep_full_probability(full, 20, 1.5))[long].mean()
    cuts = [(seqs.lengths_in(rows, e) < full)[long].mean() for e in range(40)]
    sd = np.sqrt(expected * (1 - expected) / (long.sum() * 40))
    assert abs(np.mean(cuts) - expected) < 5 * sd, (np.mean(cuts), expected)
    assert ((seqs.lengths_in(rows, 0) == full) | (seqs.lengths_in(rows, 0) == threshold)).all()


@pytest.mark.parametrize("dp", [1, 3])
def test_replica_token_counts_match_the_built_batches(dp: int) -> None:
    _, seqs = sequences()
    batches = EpochBatches(len(seqs), 16, seed=2)
    batches.set_epoch(4)
    parts = [list(ReplicaBatches(batches, seqs.lengths_in, dp, r)) for r in range(dp)]
    for step in range(len(parts[0])):
        pieces = [seqs[p[step]] for p in parts]
        total = sum(piece.num_tokens for piece in pieces)
        assert all(piece.row_total == total for piece in pieces)
        assert [p.row_offset for p in pieces] == np.cumsum(
            [0] + [p.num_tokens for p in pieces[:-1]]
        ).tolist()


def test_training_with_stochastic_length_runs_and_changes_the_loss(
    tiny_home: Path, tmp_path: Path
) -> None:
    import json

    def losses(*overrides: str) -> list[float]:
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        cfg = tiny_config(tiny_home, "train.max_steps=4", "train.log_every=1", *overrides)
        fit(cfg, run, show_progress=False)
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in records if r["kind"] == "train"]

    plain = losses()
    assert losses("train.sl_alpha=1.3") != plain
    with pytest.raises(Exception, match="train.sl_alpha must be 0"):
        tiny_config(tiny_home, "train.sl_alpha=2.5")
