"""The relative bias as tiles (``kernel.rab_tiles``, flexgr/ops/triton_hstu/rab_tiles.py).

Checked here: the slot tables (every visited block pair has exactly one slot; the transposed
lists' slots are the kv lists' slots of the same pair); the fill kernel's bias values, bit for
bit, against pos_w[rel] + ts_w[bucket] with rel and bucket by the reference's formulas (which
on real tokens are checked against the dense [T, T] grid); the reduce kernel's dpos_w / dts_w
against a float64 scatter-add of a random per-pair gradient, rel clamped at both ends and
buckets at 0 and at the clamp; an index off by one in the kernels' helper fails both; and the
attention kernels with the option on against the fp64 oracle under the existing bias tests'
rules (fp32 vs fp64 at 2e-6 / 1e-5 of the scale for the HSTU masks, the 2x / 5x rule of
``test_triton_sla`` for semi-local), in every backward mode, on poisoned outputs, with 128-, 32-
and 16-token mask blocks. A slot off by one in either list fails them. Without CUDA the kernels
run in Triton's interpreter on small shapes.

Buckets: in the interpreter rab_index takes numpy's float32 log times the fp32 reciprocal of the
divisor, torch on CPU divides; the two floors differ at a few time differences (7 of the first
2e7, the smallest 309279). The fill and reduce checks stay below it (gaps of < 40 units, time
differences < 12000); the attention tests' longer gaps could meet one with another seed, which
would then fail on one bucket for the platform's rounding, not the kernels'.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flexgr.masks import build_hstu_mask, build_semi_local_mask  # noqa: E402
from flexgr.masks.block import HSTUMask  # noqa: E402
from flexgr.ops import triton_ops  # noqa: E402
from flexgr.ops.attention import hstu_attention  # noqa: E402
from flexgr.ops.kernel_options import KernelOptions, kernel_options_set  # noqa: E402
from flexgr.ops.rab import RelativeBias, time_bucket  # noqa: E402
from flexgr.ops.triton_backend import hstu_attention_triton  # noqa: E402
from flexgr.ops.triton_hstu import launch, rab_tile_kernels, rab_tiles, rules  # noqa: E402
from tests.conftest import make_offsets  # noqa: E402
from tests.ops import test_triton_sla as sla  # noqa: E402
from tests.ops.test_triton import CASES, Case, check_fp32_against_fp64, max_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRETED, reason="interpreter tests (no TRITON_INTERPRET)")
MODES = ("split", "fused", "merged")


def _bias(offsets: torch.Tensor, n: int, seed: int, buckets: int = 32) -> RelativeBias:
    g = torch.Generator().manual_seed(seed)
    T = int(offsets[-1])
    ts = torch.cumsum(torch.randint(0, 5000, (T,), generator=g), 0)
    return RelativeBias.from_timestamps(
        torch.randn(2 * n - 1, generator=g), torch.randn(buckets + 1, generator=g), ts, offsets
    )


# Masks whose lists have partial and full blocks, several rows and columns, empty rows past the
# last token (band tables with extra length), windows and semi-local bands.
def _masks(device: str = "cpu") -> dict[str, tuple[HSTUMask, torch.Tensor]]:
    off = make_offsets([1, 37, 140, 1, 9, 70], device)
    off_long = make_offsets([260, 3, 30], device)
    nt = torch.tensor([7, 0, 3], device=device)
    return {
        "causal_128": (build_hstu_mask(off), off),
        "causal_32": (build_hstu_mask(off, block_size=32), off),
        "full_blocks_32": (build_hstu_mask(off_long, block_size=32, num_targets=nt), off_long),
        "window_16": (build_hstu_mask(off, block_size=16, max_attn_len=20, max_len=150), off),
        "ctx_band_16": (build_hstu_mask(off_long, block_size=16, contextual_len=2,
                                        max_len=300), off_long),
        "semi_local_16": (build_semi_local_mask(off, 9, 4, mode="global_keys", block_size=16,
                                                max_len=150), off),
        "tail_rows_32": (build_semi_local_mask(off_long, 5, 9, mode="tail_rows", block_size=32),
                         off_long),
    }


MASKS = _masks()
# The fill and reduce kernels' checks launch them directly: on CUDA tensors where there is a GPU
# (Triton takes no CPU tensor outside its interpreter), compared on the CPU.
KERNEL_MASKS = _masks(DEVICE) if DEVICE == "cuda" else MASKS


def _pairs(num: torch.Tensor, idx: torch.Tensor) -> list[tuple[int, int, int]]:
    """(list row, entry, listed block) of every used entry."""
    return [(r, e, int(idx[r, e])) for r in range(num.numel()) for e in range(int(num[r]))]


@pytest.mark.parametrize("name", list(MASKS))
def test_slot_tables(name: str) -> None:
    mask, offsets = MASKS[name]
    tab = launch.mask_tables(mask, _bias(offsets, 300, 0))
    st = rab_tiles.slot_tables(
        tab.kv_num, tab.kv_idx, tab.full_kv_num, tab.full_kv_idx,
        tab.q_num, tab.q_idx, tab.full_q_num, tab.full_q_idx,
    )
    assert st.kv_slot.shape == tab.kv_idx.shape and st.full_kv_slot.shape == tab.full_kv_idx.shape
    assert st.q_slot.shape == tab.q_idx.shape and st.full_q_slot.shape == tab.full_q_idx.shape
    assert st.kv_slot.stride() == tab.kv_idx.stride() and st.q_slot.stride() == tab.q_idx.stride()
    n = st.slot_row.numel()
    assert n > 2 and n == int(tab.kv_num.sum() + tab.full_kv_num.sum())
    # Every visited (r, c) of the kv lists has one slot, its own, and slots are 0..S-1.
    by_pair: dict[tuple[int, int], tuple[int, bool]] = {}
    for full, num, idx, slots in ((False, tab.kv_num, tab.kv_idx, st.kv_slot),
                                  (True, tab.full_kv_num, tab.full_kv_idx, st.full_kv_slot)):
        for r, e, c in _pairs(num, idx):
            s = int(slots[r, e])
            assert (int(st.slot_row[s]), int(st.slot_col[s])) == (r, c)
            assert (r, c) not in by_pair, "a pair listed twice"
            by_pair[(r, c)] = (s, full)
    assert sorted(s for s, _ in by_pair.values()) == list(range(n))
    # The transposed lists hold the same pairs, with the kv lists' slot and the same kind.
    seen = set()
    for full, num, idx, slots in ((False, tab.q_num, tab.q_idx, st.q_slot),
                                  (True, tab.full_q_num, tab.full_q_idx, st.full_q_slot)):
        for c, e, r in _pairs(num, idx):
            assert by_pair[(r, c)] == (int(slots[c, e]), full), (r, c)
            seen.add((r, c))
    assert seen == set(by_pair)


def _tiled(mask: HSTUMask, rab: RelativeBias) -> tuple[launch.MaskTables, rab_tiles.RabTiles]:
    with kernel_options_set(rab_tiles=True):
        tab = launch.mask_tables(mask, rab)
    assert tab.rab_tiles is not None
    return tab, tab.rab_tiles


def _slot_tokens(
    tab: launch.MaskTables, tiles: rab_tiles.RabTiles
) -> tuple[torch.Tensor, torch.Tensor]:
    """([S, MBQ] query, [S, MBKV] key) token indices of every slot, on the CPU."""
    mbq, mbkv = tab.mask_block_q, tab.mask_block_kv
    i = tiles.slot_row.long().cpu()[:, None] * mbq + torch.arange(mbq)
    j = tiles.slot_col.long().cpu()[:, None] * mbkv + torch.arange(mbkv)
    return i, j


def _pair_indices(
    tab: launch.MaskTables, tiles: rab_tiles.RabTiles, rab: RelativeBias
) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, MBQ, MBKV] int64 rel and bucket of every slot's pairs by flexgr.ops.rab's functions
    (the pair indices the tiles stored before the fill kernel): padded tokens (>= T) with
    timestamp 0 and their padded position, as the inline kernels read them."""
    P, T, n = tab.padded_len, tab.total_len, tab.rab_n
    local = tab.local.long().cpu()
    ts = torch.nn.functional.pad(tab.ts[:T].long().cpu(), (0, P - T))
    nxt = torch.nn.functional.pad(tab.next_ts[:T].long().cpu(), (0, P - T))
    i, j = _slot_tokens(tab, tiles)  # [S, MBQ] queries, [S, MBKV] keys
    rel = (n - 1 + local[j][:, None, :] - local[i][:, :, None]).clamp(0, 2 * n - 2)
    dt = nxt[i][:, :, None] - ts[j][:, None, :]
    return rel, time_bucket(dt, tab.num_buckets, rab.bucket_divisor)


def _one_sequence(tab: launch.MaskTables, tiles: rab_tiles.RabTiles) -> torch.Tensor:
    """[S, MBQ, MBKV] bool: the pairs of one (real) sequence, the only ones where the attention
    kernels leave a nonzero bias gradient (the mask never holds across sequences)."""
    i, j = _slot_tokens(tab, tiles)
    seq = tab.seq_id.long().cpu()
    return (seq[i][:, :, None] == seq[j][:, None, :]) & (seq[i] >= 0)[:, :, None]


def _off_diagonal(tab: launch.MaskTables, tiles: rab_tiles.RabTiles) -> torch.Tensor:
    """[S, MBQ, MBKV] bool: pairs of one sequence whose shifts local[t] - t differ (HSTU's shared
    target ids), where rel is not N - 1 + key - query: the reduce kernel's per-element path."""
    i, j = _slot_tokens(tab, tiles)
    local = tab.local.long().cpu()
    differ = (local[i] - i)[:, :, None] != (local[j] - j)[:, None, :]
    return _one_sequence(tab, tiles) & differ


# (mask, N of pos_w, buckets, HSTU position ids, timestamps out of order): small N clamps rel
# at both ends inside the visited blocks (keys up to a block past their query on the
# diagonal); 8 buckets and 5 (a power of two or not). Shuffled timestamps give the reduce
# kernel's runs of equal buckets along a row their shortest lengths (often one pair).
INDEX_CASES = {
    "window_16_clamped": ("window_16", 12, 8, False, False),
    "semi_local_16": ("semi_local_16", 0, 5, False, False),
    "targets_32_positions": ("full_blocks_32", 12, 8, True, False),
    "window_16_shuffled_times": ("window_16", 12, 8, False, True),
}


def _index_case(key: str, seed: int) -> tuple[launch.MaskTables, rab_tiles.RabTiles, RelativeBias]:
    name, n, buckets, use_positions, shuffled = INDEX_CASES[key]
    mask, offsets = KERNEL_MASKS[name]
    n = n or int((offsets[1:] - offsets[:-1]).max()) + 2
    g = torch.Generator().manual_seed(seed)
    T = int(offsets[-1])
    # Gaps of 0..40 units: neighbours in bucket 0 (|dt| <= 1), far pairs past the last bucket.
    ts = torch.cumsum(torch.randint(0, 40, (T,), generator=g), 0)
    if shuffled:
        ts = ts[torch.randperm(T, generator=g)]
    positions = mask.layout.pos_id[:T].long() if use_positions else None
    pos_w, ts_w = torch.randn(2 * n - 1, generator=g), torch.randn(buckets + 1, generator=g)
    rab = RelativeBias.from_timestamps(
        pos_w.to(DEVICE), ts_w.to(DEVICE), ts.to(DEVICE), offsets, positions=positions
    )
    tab, tiles = _tiled(mask, rab)
    return tab, tiles, rab


def _cpu(rab: RelativeBias) -> RelativeBias:
    return dataclasses.replace(
        rab, pos_w=rab.pos_w.cpu(), ts_w=rab.ts_w.cpu(), timestamps=rab.timestamps.cpu(),
        next_timestamps=rab.next_timestamps.cpu(),
        positions=None if rab.positions is None else rab.positions.cpu(),
    )


def check_fill(key: str, seed: int = 1) -> None:
    tab, tiles, rab_dev = _index_case(key, seed)
    rab = _cpu(rab_dev)
    rel, bucket = _pair_indices(tab, tiles, rab)
    # The pair indices are the reference's formulas on every pair of real tokens.
    offsets = MASKS[INDEX_CASES[key][0]][1]
    T, n, mbq, mbkv = tab.total_len, tab.rab_n, tab.mask_block_q, tab.mask_block_kv
    pos = rab.token_positions(offsets)
    want_rel = (n - 1 + pos[None, :] - pos[:, None]).clamp(0, 2 * n - 2)
    want_bucket = time_bucket(rab.next_timestamps[:, None] - rab.timestamps[None, :],
                              rab.num_buckets, rab.bucket_divisor)
    i, j = _slot_tokens(tab, tiles)
    real = (i < T)[:, :, None] & (j < T)[:, None, :]
    ii, jj = i[:, :, None].expand_as(real)[real], j[:, None, :].expand_as(real)[real]
    assert real.any() and (~real).any()  # padded pairs too
    assert torch.equal(rel[real], want_rel[ii, jj])
    assert torch.equal(bucket[real], want_bucket[ii, jj])
    # The fill kernel, on a NaN-filled buffer: every pair written, bit for bit pos_w[rel] +
    # ts_w[bucket] in fp32 (what the torch gather gave), padded pairs included.
    out = torch.full((tiles.n_slots, mbq, mbkv), float("nan"), device=DEVICE)
    got = rab_tiles.fill_bias(tiles, tab, rab_dev.pos_w, rab_dev.ts_w, out=out)
    assert got is out
    assert torch.equal(got.cpu(), rab.pos_w[rel] + rab.ts_w[bucket])


def check_reduce(key: str, seed: int = 2, loud_clamp: bool = False) -> None:
    tab, tiles, rab = _index_case(key, seed)
    rel, bucket = _pair_indices(tab, tiles, _cpu(rab))
    n, nb = tab.rab_n, tab.num_buckets
    if INDEX_CASES[key][1]:  # the clamped cases reach every end
        assert (rel == 0).any() and (rel == 2 * n - 2).any()
    assert (bucket == 0).any() and (bucket == nb).any()
    g = torch.Generator().manual_seed(seed)
    # Zero across sequences and on padding, as the attention kernels leave it.
    dbias = torch.randn(rel.shape, generator=g) * _one_sequence(tab, tiles)
    if loud_clamp:  # the far keys (a row's first run) a million times the near ones
        dbias = torch.where(bucket == nb, dbias * 1e6, dbias)
    dpos, dts = rab_tiles.table_grads(tiles, tab, dbias.to(DEVICE), 2 * n - 1, nb + 1)
    assert dpos.dtype == dts.dtype == torch.float32
    for got, index, size in ((dpos.cpu(), rel, 2 * n - 1), (dts.cpu(), bucket, nb + 1)):
        flat, values = index.reshape(-1), dbias.double().view(-1)
        want = torch.zeros(size, dtype=torch.float64).index_add_(0, flat, values)
        # fp32 sums of up to thousands of terms: rounding grows with the sum of magnitudes.
        scale = torch.zeros(size, dtype=torch.float64).index_add_(0, flat, values.abs())
        err = (got.double() - want).abs()
        assert (err <= 1e-6 * scale + 1e-9).all(), f"max err {err.max():.3g} of {size} bins"


@pytest.fixture
def chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the interpreter the kernels take a tile in one iteration (the attention tests run
    that way); here in two, as a GPU's loops over row chunks do."""
    monkeypatch.setattr(rab_tiles, "interpreter_iterations", 2)


@pytest.mark.parametrize("key", list(INDEX_CASES))
def test_fill_kernel_equals_the_reference_bias(key: str, chunked: None) -> None:
    check_fill(key)


@pytest.mark.parametrize("key", list(INDEX_CASES))
def test_reduce_kernel_equals_a_float64_scatter_add(key: str, chunked: None) -> None:
    tab, tiles, _ = _index_case(key, 2)
    off = _off_diagonal(tab, tiles)  # the per-element path where target ids are shared
    assert off.any() == INDEX_CASES[key][3]
    assert (_one_sequence(tab, tiles) & ~off).any()
    check_reduce(key)


def test_reduce_keeps_small_buckets_beside_a_large_one(chunked: None) -> None:
    """A row's running sum holds its far keys' large values when its near buckets' runs end,
    so their sums are differences of large numbers: exact in float64, not in fp32 (an fp32
    running sum or table fails this by orders of magnitude)."""
    check_reduce("window_16_clamped", loud_clamp=True)


@triton.jit
def _rel_plus_one(q_local, q_next_ts, k_local, k_ts, rab_n, num_buckets, inv_bucket_div,
                  TRANSPOSED: tl.constexpr):
    rel, bucket = rules.rab_index(q_local, q_next_ts, k_local, k_ts, rab_n, num_buckets,
                                  inv_bucket_div, TRANSPOSED)
    return tl.minimum(rel + 1, 2 * rab_n - 2), bucket


@triton.jit
def _bucket_plus_one(q_local, q_next_ts, k_local, k_ts, rab_n, num_buckets, inv_bucket_div,
                     TRANSPOSED: tl.constexpr):
    rel, bucket = rules.rab_index(q_local, q_next_ts, k_local, k_ts, rab_n, num_buckets,
                                  inv_bucket_div, TRANSPOSED)
    return rel, tl.minimum(bucket + 1, num_buckets)


@cpu_only
@pytest.mark.parametrize("check", [check_fill, check_reduce], ids=["fill", "reduce"])
@pytest.mark.parametrize("shifted", [_rel_plus_one, _bucket_plus_one], ids=["rel", "bucket"])
def test_an_index_off_by_one_fails(
    check: Callable[[str], None], shifted: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernels' index helper shifted by one (clamped, in range; the interpreter looks the
    helper up at each run): the fill and reduce checks above must fail. In the reduce kernel
    the shifted rel reaches the per-element path's pairs (those of the shared target ids); the
    per-diagonal path's own rel is checked by the exact sums of
    ``test_reduce_kernel_equals_a_float64_scatter_add``."""
    monkeypatch.setattr(rab_tile_kernels, "rab_index", shifted)
    with pytest.raises(AssertionError):
        check("targets_32_positions")


def test_option_is_in_the_cache_key() -> None:
    assert KernelOptions(rab_tiles=True).cache_key() != KernelOptions().cache_key()


def test_tables_carry_tiles_only_with_the_option() -> None:
    mask, offsets = MASKS["causal_32"]
    rab = _bias(offsets, 150, 2)
    assert launch.mask_tables(mask, rab).rab_tiles is None
    with kernel_options_set(rab_tiles=True):
        tab = launch.mask_tables(mask, rab)
        assert tab.rab_tiles is not None
        assert launch.mask_tables(mask, rab).rab_tiles is tab.rab_tiles  # once per batch
        # The slot tables depend on the block lists only: another bias on the same mask (the
        # next step's timestamps, say) finds them too.
        assert launch.mask_tables(mask, _bias(offsets, 150, 3)).rab_tiles is tab.rab_tiles
        # The custom op's flattened tables carry them.
        again = triton_ops.unpack(*triton_ops.pack(tab))
        assert again.rab_tiles is not None
        for a, b in zip(again.rab_tiles.tensors(), tab.rab_tiles.tensors(), strict=True):
            assert a is b


def test_tiles_on_tables_built_without_them_is_an_error() -> None:
    mask, offsets = MASKS["causal_32"]
    rab = _bias(offsets, 150, 2)
    tab = launch.mask_tables(mask, rab)
    q = torch.zeros(mask.total_len, 1, 16)
    with kernel_options_set(rab_tiles=True), pytest.raises(ValueError, match="rab_tiles"):
        launch.forward(q, q, q, tab, alpha=1.0, max_seq_len=150, pos_w=rab.pos_w, ts_w=rab.ts_w)


@cpu_only
def test_prepare_kernel_tables_carry_the_same_tiles() -> None:
    """prepare.kernel_tables (the model's fused per-batch tables) builds the tiles as
    launch.bias_tables does."""
    from flexgr.ops.rab import BUCKET_DIVISOR
    from flexgr.ops.triton_hstu import prepare
    from tests.ops.test_prepare_kernel import tiny_batch

    batch = tiny_batch([20, 5, 33], targets=True)
    mask, bias = prepare.hstu_mask_and_bias(
        batch.offsets, num_targets=batch.num_targets, timestamps=batch.timestamps,
        query_time=batch.query_time, contextual_len=0, max_attn_len=6, full_attn_tail=0,
        total_len=batch.num_tokens, max_len=40,
    )
    sizes = {"rab_n": 40, "num_buckets": 128, "bucket_divisor": BUCKET_DIVISOR}
    with kernel_options_set(rab_tiles=True):
        mine = prepare.kernel_tables(mask, bias, rel_bias=True, **sizes).rab_tiles
        ref = launch.bias_tables(mask, positions=bias.positions, timestamps=bias.timestamps,
                                 next_timestamps=bias.next_timestamps, **sizes).rab_tiles
    assert mine is not None and ref is not None
    for a, b in zip(mine.tensors(), ref.tensors(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@cpu_only
def test_hstu_model_with_tiles_equals_inline() -> None:
    """A one-layer HSTU on the Triton backend (its prepare builds the tiles once per batch):
    the output and every parameter's gradient equal the inline bias path's."""
    from flexgr.batch import JaggedBatch
    from flexgr.model import HSTU, HSTUConfig, get_spec

    torch.manual_seed(0)
    model = HSTU(HSTUConfig(num_items=50, d_model=16, num_layers=1, num_heads=2, dqk=16, dv=16,
                            max_seq_len=60, backend="triton", rel_bias=True, dropout=0.0,
                            input_dropout=0.0))
    off = make_offsets([7, 40, 1, 23])
    ids = torch.randint(1, 51, (int(off[-1]),))
    ts = torch.cumsum(torch.randint(0, 90_000, (int(off[-1]),)), 0)
    batch = JaggedBatch(ids, off, ts, ts[off[1:] - 1] + 5)
    prepare_fn = get_spec("hstu").prepare
    results = []
    for tiles in (False, True):
        with kernel_options_set(rab_tiles=tiles, backward="merged"):
            inputs = prepare_fn(model, batch)
            assert inputs.attention.kernel_tables is not None
            assert (inputs.attention.kernel_tables.rab_tiles is not None) == tiles
            model.zero_grad()
            out = model(ids, inputs)
            out.square().sum().backward()
        results.append([out.detach(), *(p.grad.clone() for p in model.parameters()
                                         if p.grad is not None)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- kernels against fp64


def check_block_size(case: Case, block: int, seed: int) -> None:
    """``check_fp32_against_fp64`` on a mask of ``block``-token blocks (more slots per batch
    than the default 128: a wrong slot is read on more tiles)."""
    offsets = make_offsets(list(case.lengths))
    T = int(offsets[-1])
    g = torch.Generator().manual_seed(seed)
    n = max(case.lengths) + 3
    rab = _bias(offsets, n, seed)
    h, d = 2, 16
    q, k, v = (torch.randn(T, h, d, generator=g) for _ in range(3))
    grad_out = torch.randn(T, h, d, generator=g)
    kw = case.mask_kwargs("cpu")
    mask = build_hstu_mask(offsets, block_size=block, **kw)

    def go(dtype: torch.dtype, backend: str) -> list[torch.Tensor]:
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, rab.pos_w, rab.ts_w)]
        bias = RelativeBias(leaves[3], leaves[4], rab.timestamps, rab.next_timestamps)
        if backend == "triton":
            out = hstu_attention_triton(*leaves[:3], mask, max_seq_len=n, alpha=0.4, rab=bias)
        else:
            out = hstu_attention(*leaves[:3], offsets, max_seq_len=n, alpha=0.4, rab=bias,
                                 backend="reference", **kw)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dtype))]

    got, want = go(torch.float32, "triton"), go(torch.float64, "reference")
    for name, x, r in zip(["out", "dq", "dk", "dv", "d_pos_w", "d_ts_w"], got, want, strict=True):
        assert torch.isfinite(x).all(), f"{name}: unwritten or not finite"
        scale = r.abs().max().item()
        assert scale > 0, f"{name}: the reference is all zero, the test proves nothing"
        tol = (2e-6 if name == "out" else 1e-5) * max(scale, 1.0)
        assert max_err(x, r) <= tol, f"{name}: max err {max_err(x, r):.3g}, ref max {scale:.3g}"


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "poison_outputs", True)


@cpu_only
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["causal", "all"])
def test_interpreter_matches_fp64(name: str, mode: str, poisoned: None) -> None:
    with kernel_options_set(rab_tiles=True, backward=mode):
        check_fp32_against_fp64(CASES[name], with_rab=True, seed=3)


@cpu_only
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,block", [("window", 32), ("targets", 16)])
def test_interpreter_small_blocks(name: str, block: int, mode: str, poisoned: None) -> None:
    with kernel_options_set(rab_tiles=True, backward=mode):
        check_block_size(CASES[name], block, seed=4)


@cpu_only
def test_interpreter_full_blocks(poisoned: None) -> None:
    # 128-token full blocks (no element mask) walked in 32-token sub-tiles.
    case = Case((260, 1, 30), num_targets=(7, 0, 3))
    with kernel_options_set(rab_tiles=True, backward="merged"):
        check_fp32_against_fp64(case, with_rab=True, seed=17)


@cpu_only
def test_interpreter_hstu_position_ids(poisoned: None) -> None:
    with kernel_options_set(rab_tiles=True, backward="fused"):
        check_fp32_against_fp64(CASES["ctx_targets"], with_rab=True, seed=7, use_positions=True)


@cpu_only
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [sla.CASES[0], sla.CASES[4]], ids=["global_keys", "tail_rows"])
def test_interpreter_semi_local(case: sla.Case, mode: str, poisoned: None) -> None:
    with kernel_options_set(rab_tiles=True, backward=mode):
        sla.check_flash_rule(case, 20, h=2, d=16, dtype=torch.float32, short_max=25)


@cpu_only
@pytest.mark.parametrize("table", ["kv_slot", "full_kv_slot", "q_slot", "full_q_slot"])
def test_a_wrong_slot_fails(table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each slot table shifted by one slot: the checks above must fail."""
    build = rab_tiles.build

    def off_by_one(tab):  # noqa: ANN001, ANN202
        tiles = build(tab)
        wrong = (getattr(tiles, table) + 1) % tiles.n_slots
        return dataclasses.replace(tiles, **{table: wrong.to(torch.int32)})

    monkeypatch.setattr(rab_tiles, "build", off_by_one)
    monkeypatch.setattr(launch, "_tiles_cache", type(launch._tiles_cache)())
    # Full blocks exist with 16-token blocks and sequences over two blocks long.
    case = Case((1, 37, 70, 9), num_targets=(0, 5, 9, 2))
    with kernel_options_set(rab_tiles=True, backward="split"), pytest.raises(AssertionError):
        check_block_size(case, 16, seed=5)


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["all", "targets"])
def test_gpu_bf16_flash_rule(name: str, mode: str, poisoned: None) -> None:
    """bf16, 128-blocks, long jagged sequences: the FlashAttention rule (2x / 5x the eager bf16
    error against fp32), as ``test_triton.test_gpu_bf16_flash_rule`` with the tiles on."""
    from tests.ops.test_triton import _gpu_case, make_inputs, run

    case = _gpu_case(name, seed=7)
    tensors = make_inputs(case, 2, 64, 64, torch.float32, True, seed=3)
    T = tensors[1].shape[0]
    grad_out = torch.randn(T, 2, 64, generator=torch.Generator().manual_seed(1))
    kw = {"max_seq_len": 1000, "alpha": 0.125, "grad_out": grad_out}
    with kernel_options_set(rab_tiles=True, backward=mode, autotune=False):
        out, grads = run(case, tensors, torch.bfloat16, backend="triton", **kw)
    ref, ref_grads = run(case, tensors, torch.float32, backend="reference", **kw)
    eager, eager_grads = run(case, tensors, torch.bfloat16, backend="reference", **kw)
    assert torch.isfinite(out).all()
    assert max_err(out, ref) <= 2 * max_err(eager, ref)
    for gname, g, r, e in zip(["dq", "dk", "dv", "d_pos_w", "d_ts_w"], grads, ref_grads,
                              eager_grads, strict=True):
        assert torch.isfinite(g).all(), gname
        assert max_err(g, r) <= 5 * max_err(e, r), (gname, max_err(g, r), max_err(e, r))
