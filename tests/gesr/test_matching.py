"""Hard matching counts (sort + searchsorted join) against a per-candidate Python loop."""

from __future__ import annotations

import math

import pytest
import torch

from flexgr.gesr.matching import (
    HardMatchConfig,
    HardMatchEmbedding,
    bucketise,
    hard_match_features,
    match_counts,
)


def _offsets(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out)


def random_batch(seed, num_features=2, low=-3, high=6):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 6, (1,), generator=g))
    h_len = torch.randint(0, 9, (B,), generator=g)
    c_len = torch.randint(0, 5, (B,), generator=g)
    h_len[0] = 0  # an empty history every time
    L, M = int(h_len.sum()), int(c_len.sum())
    hist = torch.randint(low, high, (L, num_features), generator=g)  # small range: repeats
    # Some candidate values (high + 5) never occur in any history.
    cand = torch.randint(low, high + 6, (M, num_features), generator=g)
    ts = torch.randint(0, 1000, (L,), generator=g)
    query = torch.randint(500, 1500, (B,), generator=g)
    return hist, _offsets(h_len.tolist()), cand, _offsets(c_len.tolist()), ts, query


def naive_counts(hist, h_off, cand, c_off, ts=None, query=None, half_life=None, ignore=None):
    M, F = cand.shape
    out = torch.zeros(M, F, dtype=torch.float64)
    for b in range(len(h_off) - 1):
        for c in range(int(c_off[b]), int(c_off[b + 1])):
            for f in range(F):
                total = 0.0
                for j in range(int(h_off[b]), int(h_off[b + 1])):
                    value = int(hist[j, f])
                    if value != int(cand[c, f]) or (ignore is not None and value == ignore):
                        continue
                    if half_life is None:
                        total += 1.0
                    else:
                        age = max(int(query[b]) - int(ts[j]), 0)
                        total += 0.5 ** (age / half_life)
                out[c, f] = total
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("half_life", [None, 250.0])
def test_counts_match_the_loop(seed, half_life):
    hist, h_off, cand, c_off, ts, query = random_batch(seed)
    cfg = HardMatchConfig(half_life=half_life)
    got = hard_match_features(cfg, hist, h_off, cand, c_off, ts, query)
    want = torch.log1p(naive_counts(hist, h_off, cand, c_off, ts, query, half_life))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_repeats_empty_history_and_unseen_values():
    # seq 0: no history; seq 1: history [7, 7, 3]; candidates 7 (x2), 3, 9 (never seen).
    hist = torch.tensor([[7], [7], [3]])
    h_off = torch.tensor([0, 0, 3])
    cand = torch.tensor([[7], [7], [7], [3], [9]])
    c_off = torch.tensor([0, 1, 5])
    got = match_counts(hist, h_off, cand, c_off)
    assert got[:, 0].tolist() == [0.0, 2.0, 2.0, 1.0, 0.0]


def test_matches_never_cross_sequences():
    hist = torch.tensor([[5], [5]])
    h_off = torch.tensor([0, 2, 2])
    cand = torch.tensor([[5], [5]])
    c_off = torch.tensor([0, 1, 2])
    assert match_counts(hist, h_off, cand, c_off)[:, 0].tolist() == [2.0, 0.0]


@pytest.mark.parametrize("seed", range(4))
def test_ignore_value_never_matches(seed):
    hist, h_off, cand, c_off, _, _ = random_batch(seed, low=0, high=3)
    got = match_counts(hist, h_off, cand, c_off, ignore_value=0)
    want = naive_counts(hist, h_off, cand, c_off, ignore=0)
    torch.testing.assert_close(got, want)
    assert bool((got[cand == 0] == 0).all())


def test_buckets_and_embedding():
    counts = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 100.0], [0.5, 7.9]], dtype=torch.float64)
    buckets = bucketise(counts, num_buckets=4)
    assert buckets.tolist() == [[0, 1], [1, 2], [2, 3], [0, 3]]
    for value, bucket in zip(counts.flatten().tolist(), buckets.flatten().tolist()):
        assert bucket == min(math.floor(math.log2(1 + value)), 3)
    emb = HardMatchEmbedding(num_features=2, dim=3, num_buckets=4)
    out = emb(buckets)
    assert out.shape == (4, 6)
    torch.testing.assert_close(out[2, 3:], emb.table[1, 3])
    scalar = HardMatchEmbedding(num_features=2, dim=3)
    feats = torch.log1p(counts).float()
    torch.testing.assert_close(scalar(feats)[1, :3], feats[1, 0] * scalar.table[0, 0])


def test_bad_shapes_and_config():
    with pytest.raises(ValueError, match="feature columns"):
        match_counts(
            torch.zeros(2, 2), torch.tensor([0, 2]), torch.zeros(1, 3), torch.tensor([0, 1])
        )
    with pytest.raises(ValueError, match="half_life"):
        HardMatchConfig(half_life=0.0)
    with pytest.raises(ValueError, match="needs history_timestamps"):
        hard_match_features(
            HardMatchConfig(half_life=1.0),
            torch.zeros(1, 1),
            torch.tensor([0, 1]),
            torch.zeros(1, 1),
            torch.tensor([0, 1]),
        )


def test_large_ids_and_key_overflow():
    hist = torch.tensor([[10**12], [5], [10**12]])
    h_off, c_off = torch.tensor([0, 3]), torch.tensor([0, 2])
    got = match_counts(hist, h_off, torch.tensor([[10**12], [6]]), c_off)
    assert got[:, 0].tolist() == [2.0, 0.0]
    # Without a value range the keys are ranks: any int64 values join.
    wide = torch.tensor([[-(2**61)], [2**61], [2**61]])
    offsets = torch.tensor([0, 1, 3])
    assert match_counts(wide, offsets, wide, offsets)[:, 0].tolist() == [1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="overflows the int64 join key"):
        match_counts(wide, offsets, wide, offsets, value_range=(-(2**61), 2**61))
    with pytest.raises(ValueError, match="value_range"):
        match_counts(wide, offsets, wide, offsets, value_range=(1, 0))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("half_life", [None, 250.0])
def test_a_value_range_gives_the_same_features(seed, half_life):
    hist, h_off, cand, c_off, ts, query = random_batch(seed, low=0, high=6)
    cfg = HardMatchConfig(half_life=half_life, ignore_value=0, num_buckets=4)
    ranks = hard_match_features(cfg, hist, h_off, cand, c_off, ts, query)
    bounded = hard_match_features(cfg, hist, h_off, cand, c_off, ts, query, value_range=(0, 11))
    assert torch.equal(ranks, bounded)
    counts = match_counts(hist, h_off, cand, c_off, value_range=(0, 11), ignore_value=0)
    torch.testing.assert_close(counts, naive_counts(hist, h_off, cand, c_off, ignore=0))
