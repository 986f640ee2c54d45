"""The compile-free jagged BlockMask equals create_block_mask's, block for block."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from flexgr.masks import build_hstu_mask, build_layout, hstu_mask
from flexgr.masks.sparse import jagged_block_mask


def block_states(bm: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    """[nq, nkv] 0 = empty, 1 = partial, 2 = full, for the kv lists and the transposed q lists."""

    def dense(num: torch.Tensor, idx: torch.Tensor, full_num: torch.Tensor, full_idx: torch.Tensor):
        n_rows, n_cols = num.shape[-1], idx.shape[-1]
        out = torch.zeros(n_rows, n_cols, dtype=torch.int8)
        for r in range(n_rows):
            out[r, idx[0, 0, r, : num[0, 0, r]].long()] += 1
            out[r, full_idx[0, 0, r, : full_num[0, 0, r]].long()] += 2
        return out

    kv = dense(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)
    q = dense(bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)
    return kv, q


def random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 7, (1,), generator=g))
    lengths = torch.randint(0, 260, (B,), generator=g)
    lengths[int(torch.randint(0, B, (1,), generator=g))] = 1  # a sequence of length 1
    if B > 2:
        lengths[1] = 0  # an empty sequence
    lengths[0] = max(int(lengths[0]), 1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    num_targets = (
        torch.minimum(torch.randint(0, 6, (B,), generator=g), lengths) if seed % 2 else None
    )
    return offsets, num_targets


OPTIONS = [
    dict(),
    dict(contextual_len=3),
    dict(max_attn_len=9),
    dict(max_attn_len=9, full_attn_tail=4),
    dict(contextual_len=2, max_attn_len=5, full_attn_tail=3),
]


@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("seed", range(6))
def test_matches_create_block_mask(seed, block_size):
    offsets, num_targets = random_case(seed)
    T = int(offsets[-1])
    opts = OPTIONS[seed % len(OPTIONS)]
    # Extra padding blocks at the end, as the bucketed CUDA lengths have.
    P = -(-T // block_size) * block_size + block_size * (seed % 3)
    layout = build_layout(
        offsets, num_targets=num_targets, contextual_len=opts.get("contextual_len", 0),
        total_len=T, padded_len=P,
    )
    mod = hstu_mask(layout, max_attn_len=opts.get("max_attn_len", 0),
                    full_attn_tail=opts.get("full_attn_tail", 0))
    expected = create_block_mask(mod, 1, None, P, P, device="cpu", BLOCK_SIZE=block_size)
    causal = opts.get("contextual_len", 0) == 0
    got = jagged_block_mask(mod, layout.seq_id, block_size, causal=causal)
    exp_kv, exp_q = block_states(expected)
    got_kv, got_q = block_states(got)
    assert torch.equal(got_kv, exp_kv)
    assert torch.equal(got_q, exp_q)
    assert got.seq_lengths == (P, P)
    assert (got_kv > 0).any(), "a mask with real tokens has visible blocks"


def test_build_hstu_mask_uses_it_and_chunks(monkeypatch):
    # A tiny chunk forces several evaluation rounds; the result must not change.
    from flexgr.masks import sparse

    offsets, num_targets = random_case(11)
    whole = build_hstu_mask(offsets, num_targets=num_targets, max_attn_len=7, block_size=16)
    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 16 * 16 * 3)
    chunked = build_hstu_mask(offsets, num_targets=num_targets, max_attn_len=7, block_size=16)
    for a, b in zip(block_states(whole.block_mask), block_states(chunked.block_mask)):
        assert torch.equal(a, b)


def test_rejects_unaligned_length():
    with pytest.raises(ValueError, match="block_size"):
        jagged_block_mask(lambda b, h, q, kv: q >= kv, torch.zeros(100, dtype=torch.int32), 64)


@pytest.mark.parametrize("cp_size", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_context_parallel_mask_matches_create_block_mask(seed, cp_size):
    # Query slots are one rank's head-tail shard and key slots every rank's, so sequence ids are
    # not monotone across the key slots: the candidate search must still find every visible pair.
    from flexgr.distributed.cp_mask import build_cp_mask
    from flexgr.distributed.sharding import shard_tokens

    offsets, num_targets = random_case(100 + seed)
    offsets = torch.cat([offsets, offsets[-1:] + 700])  # one sequence longer than a block
    if num_targets is not None:
        num_targets = torch.cat([num_targets, torch.tensor([3])])
    opts = OPTIONS[seed % len(OPTIONS)]
    for rank in range(cp_size):
        shard = shard_tokens(offsets, cp_size, rank, scheme="zigzag" if seed % 2 else "contiguous")
        mask = build_cp_mask(shard, num_targets=num_targets, **opts)
        expected = create_block_mask(
            mask.mask_mod, 1, None, shard.shard_len, shard.gathered_len, device="cpu"
        )
        exp_kv, exp_q = block_states(expected)
        got_kv, got_q = block_states(mask.block_mask)
        assert torch.equal(got_kv, exp_kv)
        assert torch.equal(got_q, exp_q)
        assert mask.block_mask.seq_lengths == (shard.shard_len, shard.gathered_len)


def test_causal_hint_needs_one_token_axis():
    seq = torch.zeros(128, dtype=torch.int32)
    with pytest.raises(ValueError, match="one token axis"):
        jagged_block_mask(lambda b, h, q, kv: q >= kv, seq, 64, kv_seq=seq[:64], causal=True)


def test_hidden_query_rows_skip_their_blocks():
    """Query ids set negative where the mask shows nothing: same BlockMask, fewer pairs."""
    seq = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor([100, 150, 134]))
    shown = torch.rand(seq.numel(), generator=torch.Generator().manual_seed(0)) < 0.3
    shown[:64] = False  # a whole block hidden

    def mod(b, h, q, kv):  # noqa: ANN001, ANN202
        return (seq[q] == seq[kv]) & (q >= kv) & shown[q]

    want = create_block_mask(mod, 1, None, 384, 384, device="cpu", BLOCK_SIZE=64)
    got = jagged_block_mask(mod, torch.where(shown, seq, -1), 64, kv_seq=seq, causal=True)
    got_kv, got_q = block_states(got)
    want_kv, want_q = block_states(want)
    assert torch.equal(got_kv, want_kv) and torch.equal(got_q, want_q)
    assert (got_kv[0] == 0).all() and (got_kv > 0).any()
