"""The sync-free band BlockMask of the built-in rule against the exact jagged one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgr.masks import build_hstu_mask
from flexgr.masks.block import BLOCK_SIZE
from flexgr.ops import hstu_attention
from tests.conftest import make_offsets


def block_sets(bm) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) as dense [NQ, NKV] booleans."""

    def dense(num, idx):
        nq, nk = idx.shape[-2:]
        out = torch.zeros(nq, nk, dtype=torch.bool)
        for row in range(nq):
            out[row, idx[0, 0, row, : int(num[0, 0, row])].long()] = True
        return out

    return dense(bm.kv_num_blocks, bm.kv_indices), dense(bm.full_kv_num_blocks, bm.full_kv_indices)


def options_strategy():
    return st.fixed_dictionaries(
        {
            "targets": st.booleans(),
            "contextual_len": st.sampled_from([0, 0, 2]),
            "max_attn_len": st.sampled_from([0, 0, 5, 40, 130]),
            "full_attn_tail": st.sampled_from([0, 3]),
        }
    )


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=6),
    options=options_strategy(),
    block=st.sampled_from([16, 32, BLOCK_SIZE]),
)
def test_band_blocks_are_a_safe_cover_of_the_exact_blocks(lengths, options, block) -> None:
    offsets = make_offsets(lengths)
    nt = None
    if options["targets"]:
        nt = torch.tensor([min(3, max(0, L - 1 - options["contextual_len"])) for L in lengths])
    tail = options["full_attn_tail"] if options["max_attn_len"] else 0
    kw = {
        "num_targets": nt,
        "contextual_len": options["contextual_len"],
        "max_attn_len": options["max_attn_len"],
        "full_attn_tail": tail,
        "block_size": block,
    }
    exact = build_hstu_mask(offsets, **kw)
    band = build_hstu_mask(offsets, max_len=max(lengths), **kw)
    e_part, e_full = block_sets(exact.block_mask)
    b_part, b_full = block_sets(band.block_mask)
    exact_any, band_any = e_part | e_full, b_part | b_full
    assert not (b_part & b_full).any()
    assert (band_any >= exact_any).all(), "a visible block was dropped"
    assert (e_full >= b_full).all(), "a block called full is not full"


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_attn_len": 7},
        {"max_attn_len": 7, "full_attn_tail": 2},
        {"contextual_len": 2},
    ],
)
def test_attention_with_the_band_mask_equals_the_reference(options) -> None:
    torch.manual_seed(0)
    lengths = [70, 3, 130, 33]
    offsets = make_offsets(lengths)
    nt = torch.tensor([2, 0, 5, 1])
    q, k, v = (torch.randn(sum(lengths), 2, 8, dtype=torch.float64) for _ in range(3))
    kw = dict(num_targets=nt, **options)
    mask = build_hstu_mask(offsets, max_len=130, block_size=32, **kw)
    with torch.no_grad():
        flex = hstu_attention(
            q, k, v, offsets, max_seq_len=140, alpha=0.7, backend="flex", mask=mask, **kw
        )
        ref = hstu_attention(
            q, k, v, offsets, max_seq_len=140, alpha=0.7, backend="reference", **kw
        )
    torch.testing.assert_close(flex, ref)
