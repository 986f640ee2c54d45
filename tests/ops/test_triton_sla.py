"""Semi-local attention (ULTRA-HSTU SLA) in the Triton kernel.

The kernel evaluates ``semi_local`` (both modes) inline and walks only the key blocks that the
local window, the global prefix keys or the tail rows reach. Checked here: the block tables (a
safe cover of the exact blocks; on one long sequence exactly the blocks the bands need, and the
same for plain windows with a tail or a contextual prefix; the Triton builder bit-identical to
eager), forward and every gradient against the fp64 oracle of the ``semi_local`` mask_mod, and
the dispatch (an HSTU with ``model.mask = "semi_local"`` runs the kernel). Without CUDA the
kernels run in Triton's interpreter on small shapes, in fp32.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from flexgr.masks import build_custom_mask, build_hstu_mask, build_semi_local_mask, registry
from flexgr.masks.band import BandTables, band_tables
from flexgr.masks.block import HSTUMask
from flexgr.masks.mods import and_masks, jagged, semi_local
from flexgr.ops.attention import hstu_attention
from flexgr.ops.backends import choose_backend
from flexgr.ops.rab import RelativeBias
from flexgr.ops.reference import hstu_attention_custom_mask
from flexgr.ops.triton_hstu import launch, prepare
from tests.conftest import make_offsets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRETED, reason="interpreter tests (no TRITON_INTERPRET)")
MODES = ("global_keys", "tail_rows")


def oracle_mask(offsets: torch.Tensor, local: int, global_: int, mode: str) -> HSTUMask:
    """The definition: flexgr.masks.mods.semi_local as a custom mask (no spec, no band)."""
    return build_custom_mask(
        and_masks(jagged(offsets), semi_local(offsets, local, global_, mode=mode)), offsets
    )


def block_sets(mask: HSTUMask) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) key blocks per query block as dense [NQ, NKV] booleans."""
    bm = mask.block_mask

    def dense(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        nq, nk = idx.shape[-2:]
        out = torch.zeros(nq, nk, dtype=torch.bool)
        for row in range(nq):
            out[row, idx[0, 0, row, : int(num[0, 0, row])].long().cpu()] = True
        return out

    return (
        dense(bm.kv_num_blocks, bm.kv_indices),
        dense(bm.full_kv_num_blocks, bm.full_kv_indices),
    )


def visited(mask: HSTUMask) -> torch.Tensor:
    """Key blocks each query block's programs walk (partial + full), [NQ]."""
    bm = mask.block_mask
    return (bm.kv_num_blocks + bm.full_kv_num_blocks)[0, 0].cpu()


# ------------------------------------------------------------------------------ block tables

# (local, global_): K2 = 0, K1 = 0, both 0, windows and prefixes wider than any sequence.
SIZES = [(5, 3), (0, 4), (7, 0), (0, 0), (40, 17), (300, 2), (3, 500)]


@pytest.mark.parametrize("mode", MODES)
def test_band_tables_are_a_safe_cover_of_the_exact_blocks(mode: str) -> None:
    rng = random.Random(MODES.index(mode))
    for trial in range(len(SIZES)):
        local, global_ = SIZES[trial]
        block = (16, 32, 128)[trial % 3]
        lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 5))]
        offsets = make_offsets(lengths)
        exact = build_semi_local_mask(offsets, local, global_, mode=mode, block_size=block)
        band = build_semi_local_mask(
            offsets, local, global_, mode=mode, block_size=block, max_len=max(lengths) + trial
        )
        e_part, e_full = block_sets(exact)
        b_part, b_full = block_sets(band)
        assert not (b_part & b_full).any()
        assert ((b_part | b_full) >= (e_part | e_full)).all(), "a visible block was dropped"
        assert (e_full >= b_full).all(), "a block called full is not full"
        # The transposed (dk/dv) tables list the same pairs.
        bm = band.block_mask
        assert int(bm.q_num_blocks.sum()) == int(bm.kv_num_blocks.sum())
        assert int(bm.full_q_num_blocks.sum()) == int(bm.full_kv_num_blocks.sum())
        # The exact builder's blocks are those of the definition's dense mask.
        P = exact.padded_len
        rule = and_masks(
            jagged(offsets, padded_len=P),
            semi_local(offsets, local, global_, mode=mode, padded_len=P),
        )
        dense = create_mask(rule, 1, 1, P, P, device="cpu")[0, 0]
        blocks = dense.view(P // block, block, P // block, block).transpose(1, 2)
        assert torch.equal(e_part | e_full, blocks.any(-1).any(-1))
        assert torch.equal(e_full, blocks.all(-1).all(-1))


def _union_count(qb: int, window_blocks: int, global_blocks: int) -> int:
    """|{qb - window_blocks, ..., qb} ∪ {0, ..., global_blocks - 1}|."""
    lo = max(0, qb - window_blocks)
    local = qb - lo + 1
    prefix = min(global_blocks, qb + 1)
    return local + prefix - max(0, min(prefix, qb + 1) - lo)


def test_visited_blocks_on_one_long_sequence() -> None:
    """One sequence of 1031 tokens (65 blocks of 16, the last one partial): each query block
    walks the blocks its window reaches plus the blocks holding global keys (or, in its tail
    rows, every earlier block), exactly as the exact builder lists them, and linear in L."""
    B, L = 16, 1031
    offsets = make_offsets([L])
    nb = -(-L // B)
    causal = sum(range(1, nb + 1))
    for mode, local, global_ in (
        ("global_keys", 40, 20),
        ("global_keys", 0, 0),
        ("global_keys", 2000, 5),
        ("tail_rows", 40, 100),
        ("tail_rows", 15, 0),
    ):
        band = build_semi_local_mask(offsets, local, global_, mode=mode, block_size=B, max_len=L)
        exact = build_semi_local_mask(offsets, local, global_, mode=mode, block_size=B)
        got = visited(band)
        assert torch.equal(got, visited(exact)), (mode, local, global_)
        reach = (local + B - 1) // B  # earlier blocks the window reaches
        if mode == "global_keys":
            want = [_union_count(qb, reach, -(-global_ // B)) for qb in range(nb)]
        else:
            tail_from = (L - global_) // B if global_ else nb  # first block with tail rows
            want = [qb + 1 if qb >= tail_from else min(qb, reach) + 1 for qb in range(nb)]
        assert got.tolist() == want, (mode, local, global_)
        if local < L and (mode == "global_keys" or global_ == 0):
            assert int(got.sum()) <= nb * (reach + 1 + -(-global_ // B))
            assert int(got.sum()) < causal / 4
    # SLA K1 = 256, K2 = 256 at 128-blocks on 16384 tokens (the benchmark): 5 blocks per row at
    # most (3 of the window, 2 of the prefix; 1-4 in the first four rows): 630 blocks, 7.6% of
    # the causal mask's 8256.
    big = build_semi_local_mask(make_offsets([16384]), 256, 256, max_len=16384)
    per_row = visited(big)
    assert per_row[:5].tolist() == [1, 2, 3, 4, 5] and int(per_row.sum()) == 10 + 5 * 124


@pytest.mark.parametrize(
    "options",
    [
        {"max_attn_len": 40},
        {"max_attn_len": 40, "full_attn_tail": 100},
        {"max_attn_len": 40, "contextual_len": 3},
        {"max_attn_len": 40, "full_attn_tail": 7, "num_targets": torch.tensor([5])},
    ],
    ids=["window", "window_tail", "window_ctx", "window_tail_targets"],
)
def test_plain_windows_visit_only_the_blocks_they_reach(options: dict) -> None:
    """The built-in rule's band tables walk no more blocks than the exact ones (before, a tail
    or a contextual prefix made every earlier block of the sequence a candidate)."""
    B, L = 16, 1031
    offsets = make_offsets([L])
    band = build_hstu_mask(offsets, block_size=B, max_len=L, **options)
    exact = build_hstu_mask(offsets, block_size=B, **options)
    assert torch.equal(visited(band), visited(exact))
    nb = -(-L // B)
    tail = options.get("full_attn_tail", 0) + 5 * ("num_targets" in options)
    tail_blocks = -(-(tail + 1) // B) + 1 if tail else 0
    ctx_blocks = 1 if "contextual_len" in options else 0
    plain = nb - tail_blocks - ctx_blocks
    assert int(visited(band).sum()) <= plain * 4 + (tail_blocks + ctx_blocks) * nb


@pytest.mark.parametrize("mode", MODES)
def test_triton_band_tables_equal_eager(mode: str) -> None:
    rng = random.Random(7 + MODES.index(mode))
    for trial, (local, global_) in enumerate([(5, 3), (0, 4), (7, 0), (300, 2)]):
        block = (16, 32)[trial % 2]
        lengths = [rng.randint(1, 150) for _ in range(rng.randint(1, 5))]
        offsets = make_offsets(lengths, DEVICE)
        T = sum(lengths)
        P = (-(-T // block) + trial % 2) * block
        tail, glob = (global_, 0) if mode == "tail_rows" else (0, global_)
        args = (offsets, None, T, P, 0, local, tail, max(lengths) + 3, block, glob, True)
        got, want = prepare.band_tables(*args), band_tables(*args)
        for name, g, w in zip(BandTables._fields, got, want, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w), (mode, local, global_, name)


# ----------------------------------------------------------------------- kernel against fp64


@dataclass(frozen=True)
class Case:
    mode: str
    local: int
    global_: int
    with_rab: bool
    block: int  # the BlockMask's block size (the interpreter's tiles are at most 32)
    band: bool  # block tables from the band statistics (max_len) or the exact builder


CASES = [
    Case("global_keys", 5, 3, True, 16, True),
    Case("global_keys", 0, 4, False, 32, False),  # global only (and the diagonal)
    Case("global_keys", 7, 0, True, 16, True),  # local only
    Case("global_keys", 300, 2, False, 32, True),  # window wider than every sequence
    Case("tail_rows", 5, 9, True, 16, True),
    Case("tail_rows", 0, 0, False, 16, False),  # the diagonal only
    Case("tail_rows", 3, 500, True, 32, True),  # every row a tail row: full causal
]


def random_lengths(seed: int, block: int, short_max: int) -> list[int]:
    """Random jagged lengths below ``short_max``, a length-1 sequence and one over four blocks,
    none a multiple of the block."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(2, short_max, (3,), generator=g)]
    lengths = [L + 1 if L % block == 0 else L for L in lengths]
    return [lengths[0], 1, 4 * block + 3, *lengths[1:]]


def run(
    mask: HSTUMask,
    parts: tuple,
    dtype: torch.dtype,
    grad_out: torch.Tensor,
    *,
    backend: str,
    **kw: object,
) -> list[torch.Tensor]:
    """[out, dq, dk, dv(, d pos_w, d ts_w)] on copies of the inputs in ``dtype``."""
    offsets, q, k, v, rab_parts = parts
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    rab = None
    if rab_parts is not None:
        pos_w, ts_w, ts = rab_parts
        table_dtype = torch.promote_types(dtype, torch.float32)  # fp32 tables under bf16
        tables = [w.to(DEVICE, table_dtype).requires_grad_() for w in (pos_w, ts_w)]
        rab = RelativeBias.from_timestamps(*tables, ts.to(DEVICE), offsets.to(DEVICE))
        leaves += tables
    q_, k_, v_ = leaves[:3]
    if backend == "oracle":
        out = hstu_attention_custom_mask(q_, k_, v_, mask, rab=rab, **kw)
    else:
        out = hstu_attention(
            q_, k_, v_, offsets.to(DEVICE), rab=rab, backend=backend, mask=mask, **kw
        )
    grads = torch.autograd.grad(out, leaves, grad_out.to(DEVICE, dtype))
    return [out.detach(), *(g.detach() for g in grads)]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_flash_rule(
    case: Case, seed: int, *, h: int, d: int, dtype: torch.dtype, short_max: int
) -> None:
    """Kernel error against the fp64 oracle at most 2x (forward) / 5x (gradients) the error of
    the eager oracle computed in the kernel's dtype."""
    lengths = random_lengths(seed, case.block, short_max)
    offsets = make_offsets(lengths)
    T = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    rab_parts = None
    if case.with_rab:
        n = max(lengths)
        ts = torch.cumsum(torch.randint(0, 5000, (T,), generator=g), 0)
        rab_parts = (
            torch.randn(2 * n - 1, generator=g, dtype=torch.float64) * 0.5,
            torch.randn(33, generator=g, dtype=torch.float64) * 0.5,
            ts,
        )
    parts = (offsets, q, k, v, rab_parts)
    grad_out = torch.randn(T, h, d, generator=g, dtype=torch.float64)
    kw = {"max_seq_len": max(lengths) + 3, "alpha": 0.4}
    mask = build_semi_local_mask(
        offsets.to(DEVICE),
        case.local,
        case.global_,
        mode=case.mode,
        block_size=case.block,
        max_len=max(lengths) if case.band else None,
    )
    assert mask.spec is not None and mask.spec.semi_local
    oracle = oracle_mask(offsets.to(DEVICE), case.local, case.global_, case.mode)
    got = run(mask, parts, dtype, grad_out, backend="triton", **kw)
    want = run(oracle, parts, torch.float64, grad_out, backend="oracle", **kw)
    eager = run(oracle, parts, dtype, grad_out, backend="oracle", **kw)
    # The public API's reference path takes the SLA mask's own rule (not the keyword options).
    via_api = run(mask, parts, torch.float64, grad_out, backend="reference", **kw)
    names = ["out", "dq", "dk", "dv", "d_pos_w", "d_ts_w"]
    for name, x, r, e, a in zip(names, got, want, eager, via_api):
        assert torch.isfinite(x).all(), f"{name}: unwritten or not finite"
        assert r.abs().max() > 0, f"{name}: the reference is all zero, the test proves nothing"
        assert max_err(a, r) <= 1e-12 * max(r.abs().max().item(), 1.0), name
        bound = (2 if name == "out" else 5) * max_err(e, r)
        assert max_err(x, r) <= bound, f"{name}: kernel {max_err(x, r):.3g}, eager {bound:.3g}"


@cpu_only
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: (
        f"{c.mode}-{c.local}-{c.global_}"
        f"-{'rab' if c.with_rab else 'norab'}-{c.block}-{'band' if c.band else 'exact'}"
    ),
)
def test_interpreter_matches_fp64(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "poison_outputs", True)
    check_flash_rule(case, CASES.index(case), h=1, d=16, dtype=torch.float32, short_max=25)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.block == 16], ids=lambda c: f"{c.mode}-{c.local}-{c.global_}"
)
def test_gpu_bf16_flash_rule(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 on a GPU, 128-blocks and long sequences: the FlashAttention rule."""
    monkeypatch.setattr(launch, "poison_outputs", True)
    long = Case(case.mode, case.local * 40, case.global_ * 30, case.with_rab, 128, case.band)
    check_flash_rule(long, 100 + CASES.index(case), h=2, d=64, dtype=torch.bfloat16, short_max=900)


# ------------------------------------------------------------------------------- dispatch


def test_semi_local_keeps_the_triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from flexgr.model import HSTUConfig
    from flexgr.model.hstu.inputs import backend_choice

    device = torch.device(DEVICE)
    cfg = HSTUConfig(num_items=10, mask="semi_local", backend="triton")
    choice = backend_choice(cfg, device, training=True, strict=True)
    assert choice.backend == "triton" and not choice.reason
    # A rule the kernel does not know still falls back (a user's factory under the name too).
    monkeypatch.setitem(registry._RULES, "semi_local", lambda layout, options: None)
    assert not registry.kernel_rule("semi_local")
    fallback = backend_choice(cfg, device, training=True)
    assert fallback.backend != "triton" and "semi_local" in fallback.reason
    assert choose_backend("triton", device, builtin_mask=False).backend != "triton"


@cpu_only
@pytest.mark.parametrize("mode", MODES)
def test_hstu_with_semi_local_runs_the_kernel(mode: str) -> None:
    """model.mask = "semi_local" on the Triton backend: the kernel's op (no flex or dense
    fallback) with SLA's spec, matching the dense reference backend with the relative bias."""
    from flexgr.batch import JaggedBatch
    from flexgr.model import HSTU, HSTUConfig, get_spec

    torch.manual_seed(0)
    cfg = HSTUConfig(
        num_items=50,
        d_model=16,
        num_layers=1,
        num_heads=2,
        dqk=16,
        dv=16,
        max_seq_len=40,
        backend="triton",
        dropout=0.0,
        input_dropout=0.0,
        mask="semi_local",
        sla_local=3,
        sla_global=4,
        sla_mode=mode,
    )
    model = HSTU(cfg)
    lengths = [1, 23, 9]
    offsets = make_offsets(lengths)
    ids = torch.randint(1, 51, (sum(lengths),))
    ts = torch.arange(sum(lengths)) * 13
    batch = JaggedBatch(ids, offsets, ts, ts[offsets[1:] - 1] + 1)
    prepare_inputs = get_spec("hstu").prepare
    inputs = prepare_inputs(model, batch)
    attention = inputs.attention
    assert attention.mask.spec.semi_local and attention.kernel_tables is not None
    got = model(ids, inputs)
    model.cfg.backend = "reference"
    want = model(ids, prepare_inputs(model, batch))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
