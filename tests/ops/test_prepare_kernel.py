"""The Triton per-batch tables (flexgr/ops/triton_hstu/prepare.py) are bit-identical to eager.

Reference: :func:`flexgr.masks.band.band_tables` (layout and the band's block tables with
their transposes), :func:`flexgr.ops.rab.next_timestamps` and HSTU's eager bias tables. On CPU
the kernels run in Triton's interpreter, so every case here is a few hundred tokens.
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from flexgr.batch import JaggedBatch  # noqa: E402
from flexgr.masks import block  # noqa: E402
from flexgr.masks.band import BandTables, band_tables  # noqa: E402
from flexgr.model import HSTU, HSTUConfig, get_spec  # noqa: E402
from flexgr.ops.kernel_options import KernelOptions, kernel_options_set  # noqa: E402
from flexgr.ops.rab import BUCKET_DIVISOR, next_timestamps  # noqa: E402
from flexgr.ops.triton_hstu import launch, prepare  # noqa: E402
from tests.conftest import make_offsets  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_identical(got: tuple, want: tuple, fields: tuple[str, ...]) -> None:
    for name, g, w in zip(fields, got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape)
        assert torch.equal(g, w), name


def band_args(
    lengths: list[int], *, targets: bool, contextual_len: int, max_attn_len: int,
    full_attn_tail: int, block: int, pad_blocks: int = 0, extra_len: int = 0, seed: int = 0,
) -> tuple:
    rng = random.Random(seed)
    offsets = make_offsets(lengths, DEVICE)
    T = sum(lengths)
    P = (max(1, -(-T // block)) + pad_blocks) * block
    nt = None
    if targets:  # a few targets, or half or all of a sequence (targets over several blocks)
        nt = torch.tensor([rng.choice([0, 1, 3, L // 2, L]) for L in lengths], device=DEVICE)
    tail = full_attn_tail if max_attn_len > 0 else 0
    max_len = max(lengths) + extra_len
    return offsets, nt, T, P, contextual_len, max_attn_len, tail, max_len, block


# Every (contextual_len, max_attn_len, full_attn_tail), with and without targets, over the three
# block sizes in turn; random lengths not multiples of the block, some batches with padding
# blocks past the last token and a band wider than the longest sequence needs.
CASES = [
    (ctx, window, tail, targets)
    for ctx in (0, 2) for window in (0, 5, 40, 130) for tail in (0, 3) for targets in (False, True)
    if not (window == 0 and tail == 3 and targets)  # the tail means nothing without a window
]


@pytest.mark.parametrize(("ctx", "window", "tail", "targets"), CASES)
def test_band_tables_equal_eager(ctx: int, window: int, tail: int, targets: bool) -> None:
    index = CASES.index((ctx, window, tail, targets))
    rng = random.Random(index)
    block = (16, 32, 128)[index % 3]
    lengths = [rng.randint(1, 150) for _ in range(rng.randint(1, 5))]
    args = band_args(
        lengths, targets=targets, contextual_len=ctx, max_attn_len=window, full_attn_tail=tail,
        block=block, pad_blocks=index % 2, extra_len=(0, 7, 3 * block)[index % 3], seed=index,
    )
    assert_identical(prepare.band_tables(*args), band_tables(*args), BandTables._fields)


@pytest.mark.parametrize(
    ("lengths", "block", "pad_blocks"),
    [
        ([1], 16, 0),  # B = 1, one token
        ([1], 128, 2),  # and two all-padding blocks
        ([0, 17, 0, 0, 33, 0], 16, 1),  # empty sequences: the search skips them
        ([16, 16, 32], 16, 0),  # sequences ending on block boundaries, no padding
        ([200], 32, 3),
    ],
)
def test_edge_batches_equal_eager(lengths: list[int], block: int, pad_blocks: int) -> None:
    for ctx, targets in ((0, False), (2, True)):
        args = band_args(
            lengths, targets=targets, contextual_len=ctx, max_attn_len=5, full_attn_tail=0,
            block=block, pad_blocks=pad_blocks, seed=len(lengths),
        )
        assert_identical(prepare.band_tables(*args), band_tables(*args), BandTables._fields)


def test_int32_offsets_and_targets_equal_eager() -> None:
    args = band_args([40, 3, 77], targets=True, contextual_len=2, max_attn_len=40,
                     full_attn_tail=3, block=32)
    narrow = (args[0].int(), args[1].int(), *args[2:])
    assert_identical(prepare.band_tables(*narrow), band_tables(*args), BandTables._fields)


def eager_bias(offsets, timestamps, query_time, pos_id: torch.Tensor, T: int, P: int):
    positions = pos_id[:T].long()
    ts = timestamps if timestamps is not None else torch.zeros(T, dtype=torch.int64,
                                                                  device=offsets.device)
    nxt = next_timestamps(ts, offsets, query_time)
    padded = torch.nn.functional.pad(positions.to(torch.int32), (0, P - T))
    return positions, ts.to(torch.int64), nxt, padded


@pytest.mark.parametrize("ts_dtype", [torch.int64, torch.int32, None])
@pytest.mark.parametrize("with_query_time", [True, False])
def test_bias_inputs_equal_eager(ts_dtype: torch.dtype | None, with_query_time: bool) -> None:
    lengths = [9, 1, 30, 14]
    args = band_args(lengths, targets=True, contextual_len=2 if with_query_time else 0,
                     max_attn_len=0, full_attn_tail=0, block=16, pad_blocks=1)
    offsets, T, P = args[0], args[2], args[3]
    g = torch.Generator().manual_seed(1)
    ts = None
    if ts_dtype is not None:
        ts = torch.randint(0, 10**6, (T,), generator=g).cumsum(0).to(ts_dtype).to(DEVICE)
    qt = torch.randint(10**7, 10**8, (len(lengths),), generator=g).to(DEVICE)
    qt = qt if with_query_time else None
    band, bias = prepare.band_and_bias_tables(offsets, args[1], ts, qt, *args[2:])
    assert_identical(band, band_tables(*args), BandTables._fields)
    want = eager_bias(offsets, ts, qt, band.pos_id, T, P)
    assert_identical(bias, want, prepare.BiasInputs._fields)


def test_empty_batch_gives_empty_bias_inputs() -> None:
    offsets = make_offsets([0, 0], DEVICE)
    args = (offsets, None, 0, 16, 0, 0, 0, 4, 16)
    band, bias = prepare.band_and_bias_tables(offsets, None, None, None, *args[2:])
    assert_identical(band, band_tables(*args), BandTables._fields)
    assert [t.numel() for t in bias[:3]] == [0, 0, 0] and torch.equal(bias[3], torch.zeros_like(bias[3]))


def test_unsupported_block_sizes_are_refused_and_fall_back() -> None:
    args = band_args([5, 9], targets=False, contextual_len=0, max_attn_len=0,
                     full_attn_tail=0, block=16)
    with pytest.raises(ValueError, match="power of two"):
        prepare.band_tables(*args[:-1], 24)
    assert not prepare.supports_block_size(24) and prepare.supports_block_size(128)
    assert block.prepare_mode(torch.device("cpu")) == "eager"  # CPU: always eager
    with kernel_options_set(prepare="triton"):
        assert block.prepare_mode(torch.device("cuda"), 24) == "compiled"
    with pytest.raises(ValueError, match="kernel.prepare"):
        KernelOptions(prepare="fast")  # type: ignore[arg-type]


def tiny_batch(lengths: list[int], targets: bool) -> JaggedBatch:
    g = torch.Generator().manual_seed(sum(lengths))
    offsets = make_offsets(lengths)
    T = sum(lengths)
    ts = torch.randint(0, 1000, (T,), generator=g).cumsum(0)
    nt = torch.tensor([min(2, L - 1) for L in lengths]) if targets else None
    ids = torch.randint(1, 31, (T,), generator=g)
    return JaggedBatch(ids, offsets, ts, ts[offsets[1:] - 1] + 7, nt).to(DEVICE)


@pytest.mark.parametrize(
    ("rel_bias", "contextual_len", "max_attn_len", "targets"),
    [(True, 0, 0, True), (True, 2, 9, False), (False, 0, 9, True)],
)
def test_hstu_prepare_on_the_triton_tables_equals_eager(
    monkeypatch: pytest.MonkeyPatch, rel_bias: bool, contextual_len: int, max_attn_len: int,
    targets: bool,
) -> None:
    """HSTU's prepare with the fused tables (forced on CPU, where it runs eager otherwise)
    gives the same inputs as the eager path: positions, bias tables, mask, kernel tables."""
    cfg = HSTUConfig(num_items=30, d_model=16, num_layers=1, num_heads=2, dqk=8, dv=8,
                     max_seq_len=40, backend="triton", rel_bias=rel_bias,
                     contextual_len=contextual_len, max_attn_len=max_attn_len,
                     full_attn_tail=2 if max_attn_len else 0)
    model = HSTU(cfg).to(DEVICE).eval()
    batch = tiny_batch([13, 1, 40, 22], targets)
    from flexgr.model.hstu import inputs as hstu_inputs

    launched = []
    fused_tables = prepare.hstu_mask_and_bias
    monkeypatch.setattr(prepare, "hstu_mask_and_bias",
                        lambda *a, **k: launched.append(1) or fused_tables(*a, **k))
    modes = {}
    for mode in ("eager", "triton"):
        monkeypatch.setattr(block, "prepare_mode", lambda *a, m=mode, **k: m)
        monkeypatch.setattr(hstu_inputs, "prepare_mode", lambda *a, m=mode, **k: m)
        modes[mode] = get_spec("hstu").prepare(model, batch)
        assert len(launched) == (mode == "triton")  # the fused path ran, once
    eager, fused = modes["eager"], modes["triton"]
    assert torch.equal(eager.positions, fused.positions)
    ea, fa = eager.attention, fused.attention
    for name in ("timestamps", "next_timestamps", "positions"):
        e, f = getattr(ea.tables, name), getattr(fa.tables, name)
        assert e.dtype == f.dtype and torch.equal(e, f), name
    for name in ("seq_id", "local", "seq_len", "pos_id", "max_id", "is_target"):
        assert torch.equal(getattr(ea.mask.layout, name), getattr(fa.mask.layout, name)), name
    assert ea.mask.spec == fa.mask.spec and ea.mask.mask_mod.__name__ == fa.mask.mask_mod.__name__
    from flexgr.ops.triton_ops import TABLE_TENSORS, pack

    (e_tensors, e_ints, e_inv), (f_tensors, f_ints, f_inv) = (
        pack(ea.kernel_tables), pack(fa.kernel_tables)
    )
    assert e_ints == f_ints and e_inv == f_inv

    for name, e, f in zip(TABLE_TENSORS, e_tensors, f_tensors, strict=True):
        if name in ("ts", "next_ts") and not rel_bias:
            continue  # unread without a bias: eager passes a placeholder
        assert e.dtype == f.dtype and torch.equal(e, f), name
    with torch.no_grad():
        out_eager = model(batch.item_ids, eager)
        out_fused = model(batch.item_ids, fused)
    torch.testing.assert_close(out_fused, out_eager, rtol=0, atol=0)


def test_kernel_tables_equal_launch_bias_tables() -> None:
    """prepare.kernel_tables is launch.bias_tables without its conversions."""
    batch = tiny_batch([20, 5, 33], targets=True)
    mask, bias = prepare.hstu_mask_and_bias(
        batch.offsets, num_targets=batch.num_targets, timestamps=batch.timestamps,
        query_time=batch.query_time, contextual_len=0, max_attn_len=6, full_attn_tail=0,
        total_len=batch.num_tokens, max_len=40,
    )
    mine = prepare.kernel_tables(mask, bias, rel_bias=True, rab_n=40, num_buckets=128,
                                 bucket_divisor=BUCKET_DIVISOR)
    ref = launch.bias_tables(mask, positions=bias.positions, timestamps=bias.timestamps,
                             next_timestamps=bias.next_timestamps, rab_n=40, num_buckets=128,
                             bucket_divisor=BUCKET_DIVISOR)
    for f in dataclasses.fields(ref):
        a, b = getattr(mine, f.name), getattr(ref, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name
