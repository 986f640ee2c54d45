"""Single-process parts: settings, head-tail sharding, the balance report, the model seam."""

from __future__ import annotations

import warnings

import pytest
import torch

from flexgr.distributed import (
    ParallelConfig,
    ParallelConfigError,
    balance_report,
    cp_attention,
    pairs_per_query,
    resolve_cp_backend,
    shard_tokens,
)
from flexgr.masks import build_layout, dense_hstu_mask
from tests.conftest import make_offsets


@pytest.mark.parametrize(
    "cfg, world, want",
    [
        (ParallelConfig(), 4, (4, 1)),
        (ParallelConfig(cp=2), 4, (2, 2)),
        (ParallelConfig(cp=4), 4, (1, 4)),
        (ParallelConfig(dp=2, cp=2), 4, (2, 2)),
        (ParallelConfig(cp=2), 16, (8, 2)),
    ],
)
def test_resolve(cfg, world, want):
    got = cfg.resolve(world)
    assert (got.dp, got.cp) == want


@pytest.mark.parametrize(
    "cfg, world, words",
    [
        (ParallelConfig(cp=3), 4, "does not divide the world size 4"),
        (ParallelConfig(cp=8), 4, "does not divide"),
        (ParallelConfig(dp=3, cp=2), 4, "conflicting parallel settings"),
        (ParallelConfig(dp=4, cp=2), 4, "conflicting"),
        (ParallelConfig(cp=0), 4, "parallel.cp must be >= 1"),
        (ParallelConfig(dp=-1), 4, "parallel.dp must be >= 1"),
    ],
)
def test_resolve_rejects(cfg, world, words):
    with pytest.raises(ParallelConfigError, match=words):
        cfg.resolve(world)


def _chunk_owner_by_loops(lengths: list[int], C: int) -> list[int]:
    """The head-tail rule written out plainly: rank r holds chunks r and 2C-1-r of 2C."""
    owner = []
    for L in lengths:
        bounds = [k * L // (2 * C) for k in range(2 * C + 1)]
        for i in range(L):
            k = max(c for c in range(2 * C) if bounds[c] <= i)
            owner.append(k if k < C else 2 * C - 1 - k)
    return owner


@pytest.mark.parametrize("C", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_shards_partition_the_batch(C, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(0, 40, (6,), generator=g)] + [
        0,
        1,
        2,
        3,
    ]  # short and empty
    offsets = make_offsets(lengths)
    T = sum(lengths)
    owner = torch.tensor(_chunk_owner_by_loops(lengths, C), dtype=torch.int64)
    shards = [shard_tokens(offsets, C, r) for r in range(C)]
    assert len({s.shard_len for s in shards}) == 1
    seen = torch.cat([s.local_index for s in shards])
    assert torch.equal(seen.sort().values, torch.arange(T))
    for r, s in enumerate(shards):
        assert torch.equal(s.local_index, torch.nonzero(owner == r).flatten())
        assert s.local_len == s.local_index.numel() <= s.shard_len
        seq = torch.searchsorted(offsets[1:], s.local_index, right=True)
        assert torch.equal(
            s.local_offsets[1:] - s.local_offsets[:-1], torch.bincount(seq, minlength=len(lengths))
        )
        # The gathered buffer: rank-major slots, padding marked -1, and its inverse.
        rows = s.slot_index.view(C, s.shard_len)
        assert torch.equal(rows[r, : s.local_len], s.local_index)
        assert (rows[r, s.local_len :] == -1).all()
        assert torch.equal(s.slot_index[s.slot_of_token], torch.arange(T))


def test_balance_known_case():
    """One sequence of 8 on 2 ranks: chunks of 2; rank 0 holds tokens 0, 1, 6, 7 (1+2+7+8 = 18
    causal pairs), rank 1 tokens 2..5 (3+4+5+6 = 18). Contiguous halves give 10 and 26."""
    offsets = torch.tensor([0, 8])
    zz = balance_report(offsets, 2)
    assert zz.pairs_per_rank == (18, 18) and zz.tokens_per_rank == (4, 4) and zz.imbalance == 1.0
    naive = balance_report(offsets, 2, scheme="contiguous")
    assert naive.pairs_per_rank == (10, 26)
    assert naive.imbalance == pytest.approx(26 / 18)


def test_balance_long_sequences():
    offsets = make_offsets([8192, 3000, 1000])
    for C in (2, 4, 8):
        zz = balance_report(offsets, C)
        naive = balance_report(offsets, C, scheme="contiguous")
        assert zz.imbalance < 1.001, str(zz)
        assert naive.imbalance >= 1.49, str(
            naive
        )  # 1.5 for C = 2 (L^2/8 vs 3L^2/8), more for larger C
        assert (
            sum(zz.pairs_per_rank)
            == sum(naive.pairs_per_rank)
            == sum(L * (L + 1) // 2 for L in (8192, 3000, 1000))
        )


@pytest.mark.parametrize("seed", range(40))
def test_pairs_per_query_counts_the_mask(seed):
    """The O(T) closed form equals row sums of the dense oracle mask, for every option."""
    g = torch.Generator().manual_seed(seed)
    c = seed % 3
    lengths = [int(x) for x in torch.randint(c + 1, 30, (4,), generator=g)]
    nt = (
        torch.tensor([int(torch.randint(0, L - c + 1, (1,), generator=g)) for L in lengths])
        if seed % 2
        else None
    )
    w, f = [0, 1, 3, 7][seed % 4], [0, 2][(seed // 4) % 2]
    offsets = make_offsets(lengths)
    layout = build_layout(offsets, num_targets=nt, contextual_len=c)
    got = pairs_per_query(layout, max_attn_len=w, full_attn_tail=f)
    dense = dense_hstu_mask(
        offsets[1:] - offsets[:-1],
        max(lengths),
        num_targets=nt,
        contextual_len=c,
        max_attn_len=w,
        full_attn_tail=f,
    )
    want = torch.cat([dense[b, :L].sum(-1) for b, L in enumerate(lengths)])
    assert torch.equal(got, want)


def test_cp_backend_choice_on_cpu():
    x = torch.zeros(1, requires_grad=True)
    assert resolve_cp_backend("auto", torch.device("cpu"), x) == "reference"
    cp_attention._warn_once.cache_clear()  # warned once per process: make this the first time
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_cp_backend("flex", torch.device("cpu"), x) == "reference"
    assert any("no backward on CPU" in str(w.message) for w in caught)
    assert resolve_cp_backend("flex", torch.device("cpu"), x.detach()) == "flex"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_cp_backend("cuda", torch.device("cpu"))
