"""QLA's Triton kernels (run in Triton's interpreter on CPU) against the eager cumulative sums."""

from __future__ import annotations

import pytest
import torch

from flexgr.vista import qla_triton
from flexgr.vista.qla import qla
from flexgr.vista.qla_triton import BLOCK, DV_BLOCK_MAX

# Lengths 1, 0 and ones that are not BLOCK multiples; 40 walks three chunks. Candidates include
# a sequence that is only candidates and one that has more candidates than a chunk holds.
CASES = [
    ([1], None),
    ([1, 17, 5, 40], None),
    ([BLOCK, 0, 3, 2 * BLOCK + 1], None),
    ([1, 17, 5, 40], [1, 3, 0, 20]),
    ([2, 9, BLOCK], [2, 9, 1]),
]


def jagged(lengths, H=2, dk=3, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    T = int(offsets[-1])
    q, k, v = (torch.randn(T, H, d, generator=g, dtype=torch.float64) for d in (dk, dk, dv))
    cot = torch.randn(T, H, dv, generator=g, dtype=torch.float64)
    return q, k, v, offsets, cot


def run(q, k, v, offsets, cot, nt, state, impl, dtype):
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    out = qla(*leaves, offsets, divisor=11.0, num_targets=nt, state_activation=state, impl=impl)
    (out * cot.to(dtype)).sum().backward()
    return [out.detach().double()] + [t.grad.double() for t in leaves]


@pytest.fixture
def nan_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel outputs, gradients and saved states start as NaN: an unwritten element shows."""
    monkeypatch.setattr(
        qla_triton, "_alloc", lambda like, shape: torch.full(shape, float("nan"), dtype=like.dtype)
    )


@pytest.mark.parametrize("state", ["silu", "identity"])
@pytest.mark.parametrize("lengths,nt", CASES)
def test_fp64_matches_eager(lengths, nt, state, nan_outputs):
    q, k, v, offsets, cot = jagged(lengths, seed=len(lengths))
    num_targets = torch.tensor(nt) if nt is not None else None
    want = run(q, k, v, offsets, cot, num_targets, state, "eager", torch.float64)
    got = run(q, k, v, offsets, cot, num_targets, state, "triton", torch.float64)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12, msg=name)
        assert w.abs().max() > 1e-3, name  # not trivially zero


@pytest.mark.parametrize("state", ["silu", "identity"])
@pytest.mark.parametrize("nt", [None, [4, 0, 1, 7]])
def test_fp32_error_within_eager_fp32_error(state, nt, nan_outputs):
    """The tolerance rule: fp32 kernel error <= 2x (forward) / 5x (backward) eager fp32's error,
    both against the fp64 eager result."""
    q, k, v, offsets, cot = jagged([37, 1, 16, 50], H=2, dk=8, dv=6, seed=3)
    num_targets = torch.tensor(nt) if nt is not None else None
    ref = run(q, k, v, offsets, cot, num_targets, state, "eager", torch.float64)
    eager = run(q, k, v, offsets, cot, num_targets, state, "eager", torch.float32)
    kernel = run(q, k, v, offsets, cot, num_targets, state, "triton", torch.float32)
    for name, factor, r, e, t in zip(("out", "dq", "dk", "dv"), (2, 5, 5, 5), ref, eager, kernel):
        assert torch.isfinite(t).all(), name
        floor = torch.finfo(torch.float32).eps * r.abs().max()  # eager may be exact by chance
        eager_err = max(float((e - r).abs().max()), float(floor))
        kernel_err = float((t - r).abs().max())
        assert kernel_err <= factor * eager_err, (name, kernel_err, eager_err)


@pytest.mark.parametrize("state", ["silu", "identity"])
def test_several_chunks_and_dv_blocks(state, nan_outputs):
    """Sequences spanning several chunks (the scan over chunks, the backward's sub-blocks),
    candidates crossing a chunk boundary, and d_k, d_v that are not powers of two with d_v over
    two d_v blocks, the second partial (dq, dk summed over blocks), in fp64 and fp32. SiLU's
    row walks are slow in the interpreter, so only identity adds the 4-chunk sequence."""
    lengths, nt = [2 * BLOCK + 2, 3, 4 * BLOCK + 1], [BLOCK + 5, 1, 0]
    n = 3 if state == "identity" else 2
    lengths, nt = lengths[:n], torch.tensor(nt[:n])
    q, k, v, offsets, cot = jagged(lengths, H=1, dk=20, dv=DV_BLOCK_MAX + 8, seed=7)
    ref = run(q, k, v, offsets, cot, nt, state, "eager", torch.float64)
    got = run(q, k, v, offsets, cot, nt, state, "triton", torch.float64)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12, msg=name)
    eager = run(q, k, v, offsets, cot, nt, state, "eager", torch.float32)
    kernel = run(q, k, v, offsets, cot, nt, state, "triton", torch.float32)
    for name, factor, r, e, t in zip(("out", "dq", "dk", "dv"), (2, 5, 5, 5), ref, eager, kernel):
        floor = torch.finfo(torch.float32).eps * r.abs().max()
        eager_err = max(float((e - r).abs().max()), float(floor))
        assert float((t - r).abs().max()) <= factor * eager_err, name


def test_forward_without_grad_and_strided_inputs(nan_outputs):
    """No saved states when nothing needs a gradient; strided (sliced) inputs and the identity
    feature map go through the same core."""
    q, k, v, offsets, _ = jagged([3, 20], H=3, dk=4, dv=4, seed=5)
    num_targets = torch.tensor([1, 2])
    qkv = torch.cat([q, k, v], dim=-1)  # slices of one [T, H, 12] tensor are not contiguous
    qs, ks, vs = qkv[..., :4], qkv[..., 4:8], qkv[..., 8:]
    kw = {"divisor": 5.0, "num_targets": num_targets, "feature_map": "identity"}
    got = qla(qs, ks, vs, offsets, impl="triton", **kw)
    want = qla(qs, ks, vs, offsets, impl="eager", **kw)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_auto_is_eager_on_cpu_and_bad_impl_is_one_line_error(monkeypatch):
    q, k, v, offsets, _ = jagged([4])

    def refuse(*args, **kwargs):
        raise AssertionError("auto on CPU must not launch the kernel")

    monkeypatch.setattr(qla_triton, "qla_core_triton", refuse)
    qla(q, k, v, offsets, divisor=4.0)
    with pytest.raises(ValueError, match="impl must be"):
        qla(q, k, v, offsets, divisor=4.0, impl="cuda")  # type: ignore[arg-type]
