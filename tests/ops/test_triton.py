"""The Triton HSTU kernel against the dense reference.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported) on tiny shapes: fp32 against an fp64 oracle, forward and every gradient, on poisoned
buffers. The interpreter's time grows with the tile visits it runs, so most checks run on
64-row tiles (``coarse_tiles``: two sub-tiles per 128-token mask block, the GPU's own dq, dk/dv
and merged tile); the interpreter's default 32-row tiles (four sub-tiles) run in the split
backward's lane-copy test, the tile-shape, 64-block and compile tests (and in
tests/ops/test_triton_visits.py's loop counts, every mode). GPU tests (``-m gpu``) check bf16
under the FlashAttention rule on poisoned buffers.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from flexgr.masks import build_custom_mask, build_hstu_mask, build_layout, causal, jagged  # noqa: E402
from flexgr.masks.mods import and_masks  # noqa: E402
from flexgr.ops import triton_backend  # noqa: E402
from flexgr.ops.attention import hstu_attention  # noqa: E402
from flexgr.ops.kernel_options import KernelOptions, kernel_options_set  # noqa: E402
from flexgr.ops.rab import RelativeBias  # noqa: E402
from flexgr.ops.triton_hstu import launch, tuning  # noqa: E402
from flexgr.ops.triton_hstu.tuning import TileConfig  # noqa: E402
from tests.conftest import make_offsets  # noqa: E402
from tests.ops.tiles import coarse_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRETED, reason="interpreter tests (no TRITON_INTERPRET)")


@dataclass(frozen=True)
class Case:
    lengths: tuple[int, ...]
    num_targets: tuple[int, ...] | None = None
    contextual_len: int = 0
    max_attn_len: int = 0
    full_attn_tail: int = 0

    def mask_kwargs(self, device: str) -> dict[str, object]:
        nt = None if self.num_targets is None else torch.tensor(self.num_targets, device=device)
        return dict(
            num_targets=nt, contextual_len=self.contextual_len, max_attn_len=self.max_attn_len,
            full_attn_tail=self.full_attn_tail,
        )


# Lengths are not multiples of any tile, include length-1 sequences (where the options allow)
# and cross the 128-token mask blocks, so partial, full and empty blocks all occur.
CASES = {
    "causal": Case((1, 37, 140, 1, 9)),
    "targets": Case((1, 37, 140, 9), num_targets=(0, 5, 20, 9)),
    "contextual": Case((3, 37, 140, 9), contextual_len=3),
    "window": Case((1, 37, 140, 9), max_attn_len=16),
    "window_tail": Case((1, 37, 140, 9), max_attn_len=16, full_attn_tail=5),
    "all": Case((4, 37, 140, 9), num_targets=(1, 5, 20, 2), contextual_len=2, max_attn_len=16,
                full_attn_tail=5),
    "ctx_targets": Case((4, 37, 140, 9), num_targets=(1, 5, 20, 2), contextual_len=2),
    # Sequences shorter than contextual_len (max_id <= 0: the 1st, 3rd and 5th): position-id
    # causality lets each of their tokens see only itself, as the reference's rule does.
    "short_ctx": Case((2, 37, 1, 140, 3), contextual_len=4),
}


def make_inputs(
    case: Case, h: int, dqk: int, dv: int, dtype: torch.dtype, with_rab: bool, seed: int,
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    offsets = make_offsets(list(case.lengths))
    T = int(offsets[-1])
    q, k = (torch.randn(T, h, dqk, generator=g) for _ in range(2))
    v = torch.randn(T, h, dv, generator=g)
    if not with_rab:
        return offsets, q, k, v, None
    n = max(case.lengths)
    ts = torch.cumsum(torch.randint(0, 5000, (T,), generator=g), 0)
    pos_w = torch.randn(2 * n - 1, generator=g)
    ts_w = torch.randn(33, generator=g)
    return offsets, q, k, v, (pos_w, ts_w, ts)


def run(
    case: Case, tensors: tuple, dtype: torch.dtype, *, backend: str, max_seq_len: int,
    alpha: float, grad_out: torch.Tensor | None = None, use_positions: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Forward (and backward with ``grad_out``) on copies of ``tensors`` in ``dtype``."""
    offsets, q, k, v, rab_parts = tensors
    offsets = offsets.to(DEVICE)
    q, k, v = (x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v))
    leaves = [q, k, v]
    rab = None
    if rab_parts is not None:
        pos_w, ts_w, ts = rab_parts
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        pos_w = pos_w.to(DEVICE, table_dtype).requires_grad_()
        ts_w = ts_w.to(DEVICE, table_dtype).requires_grad_()
        kw = case.mask_kwargs(DEVICE)
        positions = None
        if use_positions:  # HSTU position ids, as the model passes them: candidates share one
            lay = build_layout(offsets, num_targets=kw["num_targets"], contextual_len=case.contextual_len)
            positions = lay.pos_id.long()
        rab = RelativeBias.from_timestamps(pos_w, ts_w, ts.to(DEVICE), offsets, positions=positions)
        leaves += [pos_w, ts_w]
    kw = case.mask_kwargs(DEVICE)
    mask = build_hstu_mask(offsets, **kw) if backend == "triton" else None
    out = hstu_attention(
        q, k, v, offsets, max_seq_len=max_seq_len, alpha=alpha, rab=rab, backend=backend,
        mask=mask, **kw,
    )
    if grad_out is None:
        return out.detach(), []
    grads = torch.autograd.grad(out, leaves, grad_out.to(DEVICE, out.dtype))
    return out.detach(), [g.detach() for g in grads]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_flash_rule(
    out: torch.Tensor, grads: list[torch.Tensor | None], ref: torch.Tensor,
    ref_grads: list[torch.Tensor | None], eager: torch.Tensor,
    eager_grads: list[torch.Tensor | None],
) -> None:
    """The FlashAttention rule: the kernel's error against ``ref`` at most 2x (forward) and 5x
    (every gradient) the same-dtype eager reference's; nothing unwritten or NaN."""
    assert torch.isfinite(out).all(), "unwritten or NaN output"
    assert max_err(out, ref) <= 2 * max_err(eager, ref), (max_err(out, ref), max_err(eager, ref))
    for gname, g, r, e in zip(["dq", "dk", "dv", "d_pos_w", "d_ts_w"], grads, ref_grads,
                              eager_grads):
        assert torch.isfinite(g).all(), f"{gname}: unwritten or NaN"
        assert max_err(g, r) <= 5 * max_err(e, r), (gname, max_err(g, r), max_err(e, r))


def check_fp32_against_fp64(case: Case, *, with_rab: bool, dqk: int = 16, dv: int = 16,
                            seed: int = 0, use_positions: bool = False, heads: int = 2) -> None:
    tensors = make_inputs(case, heads, dqk, dv, torch.float32, with_rab, seed)
    max_seq_len = max(case.lengths) + 3
    alpha = 0.4
    T = tensors[1].shape[0]
    grad_out = torch.randn(T, heads, dv, generator=torch.Generator().manual_seed(seed + 1))
    out, grads = run(case, tensors, torch.float32, backend="triton", max_seq_len=max_seq_len,
                     alpha=alpha, grad_out=grad_out, use_positions=use_positions)
    ref, ref_grads = run(case, tensors, torch.float64, backend="reference",
                         max_seq_len=max_seq_len, alpha=alpha, grad_out=grad_out,
                         use_positions=use_positions)
    assert torch.isfinite(out).all()
    scale = ref.abs().max().item()
    err = max_err(out, ref)
    assert err <= 2e-6 * max(scale, 1.0), f"out: max err {err:.3g}, ref max {scale:.3g}"
    names = ["dq", "dk", "dv", "d_pos_w", "d_ts_w"]
    for name, g, r in zip(names, grads, ref_grads):
        assert torch.isfinite(g).all(), name
        scale = r.abs().max().item()
        assert scale > 0, f"{name}: reference gradient is all zero, the test would prove nothing"
        err = max_err(g, r)
        assert err <= 1e-5 * max(scale, 1.0), f"{name}: max err {err:.3g}, ref max {scale:.3g}"


# Every mask option with and without the relative bias; the three backward modes take turns,
# so each mode meets every option set with or without the bias (and the default 16 bias lanes).
# One head: the mask tables are shared by all heads, and every other check here runs two (the
# head strides, and two heads' atomics into the same bias-table gradients).
SWEEP = [
    (name, with_rab, launch.BWD_MODES[(2 * i + with_rab) % 3])
    for i, name in enumerate(CASES) for with_rab in (False, True)
]


@cpu_only
@pytest.mark.parametrize(
    "name, with_rab, mode", SWEEP,
    ids=[f"{n}-{'rab' if r else 'norab'}-{m}" for n, r, m in SWEEP],
)
def test_interpreter_matches_fp64(
    name: str, with_rab: bool, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "poison_outputs", True)  # every output element is written
    with coarse_tiles(), kernel_options_set(backward=mode):
        check_fp32_against_fp64(CASES[name], with_rab=with_rab, heads=1)


@cpu_only
@pytest.mark.parametrize("mode,lanes,tile", [("split", 1, 32), ("merged", 4, 64), ("fused", 2, 64)])
def test_interpreter_backward_modes_and_bias_gradient_copies(
    mode: str, lanes: int, tile: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each backward mode on the richest option set with the bias, two heads and poisoned
    buffers: split on the interpreter's default 32-row tiles, merged and fused on 64-row ones.
    The table-gradient atomics go into lane copies (the sweep above runs the default, 16); the
    sum over the copies must match fp64 for any layout."""
    monkeypatch.setattr(launch, "poison_outputs", True)
    tiles = coarse_tiles(tile) if tile != tuning.INTERPRET.block_m else contextlib.nullcontext()
    with tiles, kernel_options_set(backward=mode, rab_lanes=lanes):
        assert launch.rab_lanes() == lanes
        check_fp32_against_fp64(CASES["all"], with_rab=True, seed=5)


def test_kernel_settings_are_checked() -> None:
    for bad in (6, 0, 128):
        with pytest.raises(ValueError, match="kernel.rab_lanes must be a power of two"):
            KernelOptions(rab_lanes=bad)
    with pytest.raises(ValueError, match="kernel.backward"):
        KernelOptions(backward="both")  # type: ignore[arg-type]


@cpu_only
@pytest.mark.parametrize("name", ["targets", "all"])
def test_interpreter_bias_on_hstu_position_ids(name: str) -> None:
    with coarse_tiles():
        check_fp32_against_fp64(CASES[name], with_rab=True, seed=7, use_positions=True)


@cpu_only
def test_interpreter_uneven_head_dims() -> None:
    # Dqk = 20 and Dv = 12 are padded to 32 and 16 inside the kernel.
    with coarse_tiles():
        check_fp32_against_fp64(CASES["targets"], with_rab=True, dqk=20, dv=12, seed=5)


@cpu_only
@pytest.mark.parametrize(
    "fwd, dkdv",
    [(TileConfig(64, 16, 4, 1), TileConfig(16, 64, 4, 1)),
     (TileConfig(128, 128, 4, 1), TileConfig(128, 128, 4, 1))],
    ids=["subtiles", "whole_blocks"],
)
def test_interpreter_tile_shapes(fwd: TileConfig, dkdv: TileConfig) -> None:
    tuning.force("fwd", fwd)
    tuning.force("dq", fwd)
    tuning.force("dkdv", dkdv)
    try:
        check_fp32_against_fp64(CASES["window_tail"], with_rab=False, seed=7)
    finally:
        for kind in ("fwd", "dq", "dkdv"):
            tuning.force(kind, None)


@cpu_only
def test_interpreter_mask_block_64() -> None:
    """A BlockMask built with BLOCK_SIZE 64 is walked with the same kernels."""
    case = CASES["ctx_targets"]
    tensors = make_inputs(case, 2, 16, 16, torch.float32, False, 11)
    offsets, q, k, v, _ = tensors
    kw = case.mask_kwargs("cpu")
    mask = build_hstu_mask(offsets, block_size=64, **kw)
    assert mask.block_mask.BLOCK_SIZE == (64, 64)
    out = triton_backend.hstu_attention_triton(q, k, v, mask, max_seq_len=150, alpha=0.3)
    ref = hstu_attention(q.double(), k.double(), v.double(), offsets, max_seq_len=150, alpha=0.3,
                         backend="reference", **kw)
    assert max_err(out, ref) <= 2e-6 * max(ref.abs().max().item(), 1.0)


@cpu_only
@pytest.mark.parametrize("name", ["causal", "targets"])
def test_interpreter_full_blocks(name: str) -> None:
    """A 260-token sequence makes full 128-blocks, which skip the element mask."""
    case = Case((260, 1, 30), num_targets=None if name == "causal" else (7, 0, 3))
    mask = build_hstu_mask(make_offsets(list(case.lengths)), **case.mask_kwargs("cpu"))
    assert int(mask.block_mask.full_kv_num_blocks.sum()) > 0
    assert int(mask.block_mask.full_q_num_blocks.sum()) > 0
    with coarse_tiles():
        check_fp32_against_fp64(case, with_rab=True, seed=17)


def test_custom_mask_falls_back_with_warning() -> None:
    offsets = make_offsets([5, 30, 1]).to(DEVICE)
    T = int(offsets[-1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, 2, 16, generator=g).to(DEVICE) for _ in range(3))
    mask = build_custom_mask(and_masks(jagged(offsets), causal()), offsets)
    triton_backend._warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = triton_backend.hstu_attention_triton(q, k, v, mask, max_seq_len=40, alpha=0.5)
    assert any("falls back" in str(w.message) for w in caught)
    ref = hstu_attention(q.double(), k.double(), v.double(), offsets, max_seq_len=40, alpha=0.5,
                         backend="reference")
    assert max_err(out, ref) <= 1e-4


def test_available_follows_device() -> None:
    if INTERPRETED:
        assert triton_backend.available(torch.device("cpu"))
    else:
        assert not triton_backend.available(torch.device("cpu"))
        assert triton_backend.available(torch.device("cuda"))


# ---------------------------------------------------------------------------------------------
# GPU: bf16 under the FlashAttention rule, with poisoned buffers.

# (mask options, Dqk, Dv, rab, backward mode): every case in the merged mode, the two richest in
# the other two modes as well.
GPU_CASES = [
    ("causal", 128, 128, False, "merged"),
    ("all", 128, 128, True, "merged"),
    ("all", 128, 128, True, "split"),
    ("all", 128, 128, True, "fused"),
    ("targets", 50, 25, True, "merged"),
    ("targets", 50, 25, True, "split"),
    ("targets", 50, 25, True, "fused"),
    ("window_tail", 64, 64, False, "merged"),
    ("ctx_targets", 50, 50, False, "merged"),
]


def _gpu_case(name: str, seed: int) -> Case:
    """The named options on longer random lengths (not multiples of 64 or 128, with 1s)."""
    g = torch.Generator().manual_seed(seed)
    base = CASES[name]
    lengths = [int(x) for x in torch.randint(2, 900, (12,), generator=g)]
    lengths[3] = 1 if base.contextual_len == 0 and base.num_targets is None else 3
    lengths[7] = 513
    nt = None
    if base.num_targets is not None:
        nt = tuple(min(int(x), L - base.contextual_len) for x, L in
                   zip(torch.randint(0, 21, (12,), generator=g), lengths))
    return Case(tuple(lengths), nt, base.contextual_len, base.max_attn_len, base.full_attn_tail)


def _pin_backward(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """kernel.backward = mode for one test (these tests used to set FLEXGR_TRITON_BWD, which
    nothing has read since the kernel options moved to the config, so they ran "auto")."""
    import dataclasses

    from flexgr.ops import kernel_options as options

    monkeypatch.setattr(options, "_current", dataclasses.replace(options.kernel_options(),
                                                                 backward=mode))


@pytest.mark.gpu
@pytest.mark.parametrize("name, dqk, dv, with_rab, mode", GPU_CASES)
def test_gpu_bf16_flash_rule(
    name: str, dqk: int, dv: int, with_rab: bool, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pin_backward(monkeypatch, mode)
    monkeypatch.setattr(launch, "poison_outputs", True)
    case = _gpu_case(name, seed=dqk + dv)
    h = 2
    tensors = make_inputs(case, h, dqk, dv, torch.float32, with_rab, seed=dqk)
    T = tensors[1].shape[0]
    grad_out = torch.randn(T, h, dv, generator=torch.Generator().manual_seed(1))
    kw = dict(max_seq_len=1000, alpha=1.0 / dqk**0.5, grad_out=grad_out)
    out, grads = run(case, tensors, torch.bfloat16, backend="triton", **kw)
    ref, ref_grads = run(case, tensors, torch.float32, backend="reference", **kw)
    eager, eager_grads = run(case, tensors, torch.bfloat16, backend="reference", **kw)
    assert_flash_rule(out, grads, ref, ref_grads, eager, eager_grads)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["split", "fused", "merged"])
@pytest.mark.parametrize("name", ["all", "targets"])
def test_gpu_fp32_matches_fp64(name: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled kernels in fp32 (exact dots, exact silu) on the interpreter's small cases."""
    _pin_backward(monkeypatch, mode)
    monkeypatch.setattr(launch, "poison_outputs", True)
    check_fp32_against_fp64(CASES[name], with_rab=True, dqk=64, dv=32, seed=2)


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool):  # noqa: ANN202
    # torch's flag is a module property that monkeypatch cannot set: restore it by hand.
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_fp32_dots_follow_the_tf32_matmul_flag() -> None:
    """fp32 inputs take tensor-core (TF32) products exactly when torch's fp32 matmuls do, in
    what the kernels are launched with: a tf32 run paid scalar-FMA products before (its
    validation pass 4.5x slower on an H100, BENCHMARKS.md 2026-12-05)."""
    q32, v32 = torch.zeros(4, 1, 16), torch.zeros(4, 1, 16)
    with _tf32_matmuls(False):
        assert launch._dims(q32, v32)["DOT_PRECISION"] == "ieee"
        assert launch.dot_precision(torch.bfloat16) == "tf32"  # ignored by 16-bit dots
    with _tf32_matmuls(True):
        assert launch._dims(q32, v32)["DOT_PRECISION"] == "tf32"
        # the tuned tile of one precision is not reused for the other
        assert "tf32" in launch._key("fwd", _Tables(), q32, v32, {}, 8)
    with _tf32_matmuls(False):
        assert "ieee" in launch._key("fwd", _Tables(), q32, v32, {}, 8)
    saved = torch.backends.cuda.matmul.fp32_precision
    try:  # the newer setting, after which the legacy flag cannot be read
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert launch.dot_precision(torch.float32) == "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert launch.dot_precision(torch.float32) == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


@dataclass
class _Tables:  # what _key reads of the mask tables
    padded_len: int = 64
    mask_block_q: int = 64
    mask_block_kv: int = 64


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, reason=(
    "known: on an H100 (2026-12-05) the TF32 forward's error against fp64 was 5.7x the eager "
    "TF32 reference's on every case here (targets: 1.36e-4 vs 2.37e-5), above the 2x rule; "
    "strict, so the fix that meets the rule turns this red until the mark goes"))
@pytest.mark.parametrize("name, dqk, dv, with_rab, mode", GPU_CASES[1:5])
def test_gpu_tf32_flash_rule(
    name: str, dqk: int, dv: int, with_rab: bool, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 with TF32 products (``train.precision = "tf32"``) against fp64, within 2x / 5x of
    the eager reference's error under the same flag (its matmuls are TF32 too)."""
    _pin_backward(monkeypatch, mode)
    monkeypatch.setattr(launch, "poison_outputs", True)
    case = _gpu_case(name, seed=dqk + dv + 1)
    h = 2
    tensors = make_inputs(case, h, dqk, dv, torch.float32, with_rab, seed=dqk + 1)
    T = tensors[1].shape[0]
    grad_out = torch.randn(T, h, dv, generator=torch.Generator().manual_seed(2))
    kw = dict(max_seq_len=1000, alpha=1.0 / dqk**0.5, grad_out=grad_out)
    with _tf32_matmuls(True):
        out, grads = run(case, tensors, torch.float32, backend="triton", **kw)
        eager, eager_grads = run(case, tensors, torch.float32, backend="reference", **kw)
    ref, ref_grads = run(case, tensors, torch.float64, backend="reference", **kw)
    assert_flash_rule(out, grads, ref, ref_grads, eager, eager_grads)


@cpu_only
def test_custom_op_registration_and_compile_without_recompiles() -> None:
    """The kernels are torch.library ops with fakes: opcheck passes, and a compiled HSTU with
    the Triton backend reuses its graphs for new packed lengths and matches eager."""
    from torch._dynamo.utils import counters

    from flexgr.batch import JaggedBatch
    from flexgr.model import HSTU, HSTUConfig, get_spec
    from flexgr.ops import triton_ops

    torch.manual_seed(0)
    offsets = make_offsets([5, 19])
    q, k, v = (torch.randn(24, 2, 16, requires_grad=True) for _ in range(3))
    mask = build_hstu_mask(offsets)
    rab = RelativeBias(torch.randn(63, requires_grad=True), torch.randn(9, requires_grad=True),
                       torch.arange(24) * 3, torch.arange(24) * 3 + 1)
    tensors, ints, inv = triton_ops.pack(launch.mask_tables(mask, rab))
    torch.library.opcheck(
        triton_ops.hstu_attention_fwd,
        (q, k, v, rab.pos_w, rab.ts_w, tensors, ints, inv, 0.5, 32),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    model = HSTU(HSTUConfig(num_items=50, d_model=16, num_layers=1, num_heads=1, dqk=16, dv=16,
                            max_seq_len=40, backend="triton", dropout=0.0, input_dropout=0.0))
    prepare = get_spec("hstu").prepare
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, backend="eager")
    graphs = []
    for lengths in ([7, 3], [12, 5, 2], [30], [4, 9, 11]):
        off = make_offsets(lengths)
        ids = torch.randint(1, 51, (sum(lengths),))
        ts = torch.arange(sum(lengths)) * 11
        batch = JaggedBatch(ids, off, ts, ts[off[1:] - 1] + 1)
        inputs = prepare(model, batch)
        assert inputs.attention.kernel_tables is not None  # the op path, not the per-call one
        got = compiled(ids, inputs)
        torch.testing.assert_close(got, model(ids, inputs))
        model.cfg.backend = "reference"
        torch.testing.assert_close(got, model(ids, prepare(model, batch)), rtol=1e-4, atol=1e-4)
        model.cfg.backend = "triton"
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1], graphs
