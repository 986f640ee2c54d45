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


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=6),
    options=options_strategy(),
)
def test_band_transposed_tables_equal_blockmask_transposes(lengths, options) -> None:
    """The band builder computes the q_* tables itself (BlockMask's own transpose would be a
    dozen more launches); they must equal what ``BlockMask.from_kv_blocks`` derives."""
    from torch.nn.attention.flex_attention import BlockMask

    nt = None
    if options["targets"]:
        nt = torch.tensor([min(3, max(0, L - 1 - options["contextual_len"])) for L in lengths])
    band = build_hstu_mask(
        make_offsets(lengths), num_targets=nt, contextual_len=options["contextual_len"],
        max_attn_len=options["max_attn_len"], block_size=32, max_len=max(lengths),
    ).block_mask
    derived = BlockMask.from_kv_blocks(
        band.kv_num_blocks, band.kv_indices, band.full_kv_num_blocks, band.full_kv_indices,
        BLOCK_SIZE=32,
    )
    for name in ("q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(band, name), getattr(derived, name).to(torch.int32)), name
    for num, name in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        counts = getattr(band, num)[0, 0]
        mine, ref = getattr(band, name)[0, 0], getattr(derived, name)[0, 0]
        for row, n in enumerate(counts.tolist()):
            assert torch.equal(mine[row, :n], ref[row, :n].to(torch.int32)), (name, row)


def test_compiled_band_tables_equal_eager_without_recompiles() -> None:
    """The compiled builder (used on CUDA) is the eager one, one graph for every length."""
    import torch._dynamo.testing

    from flexgr.masks.band import band_tables

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(band_tables, backend=counter, dynamic=True, fullgraph=True)
    for lengths in ([5, 130, 77], [300, 2, 41, 99], [64, 64, 1, 200, 17]):
        offsets = make_offsets(lengths)
        T = int(offsets[-1])
        P = -(-T // 32) * 32
        nt = torch.tensor([min(2, L - 1) for L in lengths])
        args = (offsets, nt, T, P, 0, 40, 3, 300, 32)
        for got, want in zip(compiled(*args), band_tables(*args), strict=True):
            assert torch.equal(got, want)
    assert counter.frame_count == 1


def test_build_hstu_mask_takes_the_band_builder_of_the_prepare_mode(monkeypatch) -> None:
    """kernel.prepare = "triton" (CPU runs eager; forced here) builds the tables with the
    Triton kernels (in the interpreter without CUDA): the same BlockMask as eager."""
    pytest.importorskip("triton")
    from flexgr.masks import block
    from flexgr.ops.triton_hstu import prepare

    device = "cuda" if torch.cuda.is_available() else "cpu"
    offsets = make_offsets([70, 3, 130, 33]).to(device)
    kw = dict(num_targets=torch.tensor([2, 0, 5, 1], device=device), max_attn_len=7,
              block_size=32, max_len=130)
    monkeypatch.setattr(block, "prepare_mode", lambda *a, **k: "eager")
    want = build_hstu_mask(offsets, **kw).block_mask
    calls = []

    def spy(*args):
        calls.append(args)
        return triton_band_tables(*args)

    triton_band_tables = prepare.band_tables
    monkeypatch.setattr(prepare, "band_tables", spy)
    monkeypatch.setattr(block, "prepare_mode", lambda *a, **k: "triton")
    got = build_hstu_mask(offsets, **kw).block_mask
    assert len(calls) == 1
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
