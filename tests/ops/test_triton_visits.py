"""The kernels walk exactly the blocks a mask needs, for causal, window and SLA masks.

Two links, each checked: (1) the loop bounds of ``flexgr.ops.triton_hstu.visits`` equal the
blocks the dense mask needs (a block with any visible pair, walked in sub-tiles; the unmasked
loop exactly on blocks where every pair is visible); (2) the forward, dq and dk/dv kernels run
exactly those iterations, counted in Triton's interpreter. A kernel that scanned every block up
to the diagonal, or from the sequence start for the global prefix, fails (2); tables that
listed blocks nothing sees, or masked fully visible ones, fail (1).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from flexgr.masks import build_hstu_mask, build_semi_local_mask
from flexgr.masks.block import HSTUMask
from flexgr.ops.attention import hstu_attention
from flexgr.ops.kernel_options import kernel_options_set
from flexgr.ops.triton_hstu import tuning
from flexgr.ops.triton_hstu.visits import LoopTrips, key_tile_trips, query_tile_trips
from tests.conftest import make_offsets
from tests.ops.loop_counter import LoopCounter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 64  # mask block: two of the interpreter's 32-row tiles, so sub-tiles are counted
JAGGED = [203, 1, 330]  # a length-1 sequence, none a multiple of the block or the tile
ONE = [517]


def build(kind: str, lengths: list[int], band: bool) -> HSTUMask:
    offsets = make_offsets(lengths)
    max_len = max(lengths) if band else None
    if kind == "causal":
        return build_hstu_mask(offsets, block_size=BLOCK, max_len=max_len)
    if kind == "window":
        return build_hstu_mask(offsets, block_size=BLOCK, max_attn_len=40, max_len=max_len)
    mode = kind.removeprefix("sla_")
    return build_semi_local_mask(offsets, 40, 70, mode=mode, block_size=BLOCK, max_len=max_len)


def needed_blocks(mask: HSTUMask) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks with a visible pair, blocks with every pair visible), [NQ, NKV], from the
    mask's own rule evaluated densely."""
    P = mask.padded_len
    dense = create_mask(mask.mask_mod, 1, 1, P, P, device="cpu")[0, 0]
    blocks = dense.view(P // BLOCK, BLOCK, P // BLOCK, BLOCK).transpose(1, 2)
    return blocks.any(-1).any(-1), blocks.all(-1).all(-1)


def expected_trips(any_: torch.Tensor, all_: torch.Tensor, tile: int) -> LoopTrips:
    """Programs of ``tile`` rows over the rows of [rows, cols] block sets, each needed block
    walked in BLOCK // tile sub-tiles: the full ones unmasked, the rest masked."""
    sub = share = BLOCK // tile  # sub-tiles per block; also programs per block (square tiles)
    full = all_.sum(1) * sub
    partial = (any_ & ~all_).sum(1) * sub
    return LoopTrips(partial.repeat_interleave(share), full.repeat_interleave(share))


def assert_trips(got: LoopTrips, want: LoopTrips, what: str) -> None:
    assert torch.equal(got.partial, want.partial), f"{what}: masked-loop trips"
    assert torch.equal(got.full, want.full), f"{what}: unmasked-loop trips"


CASES = [
    ("causal", JAGGED, False),
    ("window", JAGGED, False),
    ("sla_global_keys", JAGGED, False),
    ("sla_tail_rows", JAGGED, False),
    ("causal", ONE, True),
    ("window", ONE, True),
    ("sla_global_keys", ONE, True),
    ("sla_tail_rows", ONE, True),
]


@pytest.mark.parametrize(
    ("kind", "lengths", "band"),
    CASES,
    ids=[f"{k}-{'one' if L is ONE else 'jagged'}-{'band' if b else 'exact'}" for k, L, b in CASES],
)
def test_loop_bounds_are_the_blocks_the_mask_needs(
    kind: str, lengths: list[int], band: bool
) -> None:
    mask = build(kind, lengths, band)
    any_, all_ = needed_blocks(mask)
    for tile in (32, 64):
        assert_trips(
            query_tile_trips(mask.block_mask, tile, tile),
            expected_trips(any_, all_, tile),
            f"query tiles of {tile}",
        )
        assert_trips(
            key_tile_trips(mask.block_mask, tile, tile),
            expected_trips(any_.T, all_.T, tile),
            f"key tiles of {tile}",
        )


def test_sla_visits_are_linear_in_the_sequence_length() -> None:
    """SLA global_keys at K1 = K2 = 128 on 2048 tokens in 64-blocks: a query tile walks at most
    5 blocks (3 of the window, 2 of the prefix), so the forward walks 150 blocks to causal's
    528; the prefix's key tiles are the exception, as every query sees them."""
    offsets = make_offsets([2048])
    sla = build_semi_local_mask(offsets, 128, 128, block_size=BLOCK, max_len=2048)
    causal = build_hstu_mask(offsets, block_size=BLOCK, max_len=2048)
    rows = query_tile_trips(sla.block_mask, BLOCK, BLOCK).total
    cols = key_tile_trips(sla.block_mask, BLOCK, BLOCK).total
    assert int(rows.max()) == 5 and int(rows.sum()) == 150 == int(cols.sum())
    assert cols[:2].tolist() == [32, 31] and int(cols[2:].max()) == 3
    assert int(query_tile_trips(causal.block_mask, BLOCK, BLOCK).total.sum()) == 528


@pytest.mark.skipif(not INTERPRETED, reason="counts iterations in Triton's interpreter")
@pytest.mark.parametrize("kind", ["causal", "window", "sla_global_keys", "sla_tail_rows"])
def test_kernels_iterate_exactly_the_loop_bounds(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One forward (it does not depend on the backward mode), then its backward in each mode."""
    mask = build(kind, JAGGED, band=True)
    T, P = mask.total_len, mask.padded_len
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(T, 1, 16, generator=g).requires_grad_() for _ in range(3)]
    counter = LoopCounter(monkeypatch)
    out = hstu_attention(
        *leaves, mask.offsets, mask=mask, backend="triton", max_seq_len=max(JAGGED), alpha=0.3
    )
    tile = tuning.INTERPRET.block_m
    assert tile == tuning.INTERPRET.block_n < BLOCK  # so sub-tiles are part of the count
    bm = mask.block_mask
    assert_trips(counter.trips("fwd", tile, P // tile), query_tile_trips(bm, tile, tile), "fwd")
    for mode in ("split", "merged", "fused"):
        counter.reset()
        with kernel_options_set(backward=mode):
            torch.autograd.grad(out, leaves, torch.ones_like(out), retain_graph=True)
        assert "fwd" not in counter.counts, mode
        if mode != "fused":  # fused computes dq inside the dk/dv programs
            dq = counter.trips("dq", tile, P // tile)
            assert_trips(dq, query_tile_trips(bm, tile, tile), f"{mode} dq")
        dkdv = counter.trips("dkdv", tile, P // tile)
        assert_trips(dkdv, key_tile_trips(bm, tile, tile), f"{mode} dk/dv")
