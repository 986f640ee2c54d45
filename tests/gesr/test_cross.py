"""Cross attention, jagged (pairs) and padded, against a per-request dense reference, fp64,
forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexgr.gesr.cross import (
    CrossAttention,
    CrossAttentionConfig,
    jagged_cross_attention,
    padded_cross_attention,
)
from flexgr.gesr.cross_layout import cross_padding, cross_pairs
from flexgr.ranking.tokens import BatchSegments

IMPLS = ["pairs", "padded"]


def layout_of(impl, h_off, c_off, M, extra_slots=0):
    """Either layout, bounded by the longest history plus ``extra_slots`` padding slots."""
    longest = int((h_off[1:] - h_off[:-1]).max()) + extra_slots
    layout = cross_pairs if impl == "pairs" else cross_padding
    return layout(h_off, segments_of(h_off, c_off), max_history=longest)


def segments_of(h_off, c_off):
    return BatchSegments.of_offsets(h_off, c_off, int(h_off[-1]), int(c_off[-1]))


def attend(impl, q, k, v, h_off, c_off, activation="softmax", divisor=1.0, extra_slots=0):
    fn = jagged_cross_attention if impl == "pairs" else padded_cross_attention
    layout = layout_of(impl, h_off, c_off, q.shape[0], extra_slots)
    return fn(q, k, v, layout, activation, divisor)


def _offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())


def random_inputs(seed, H=2, D=3, Dv=4):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 5, (1,), generator=g))
    h_len = torch.randint(0, 7, (B,), generator=g).tolist()
    c_len = torch.randint(0, 4, (B,), generator=g).tolist()
    h_len[0], c_len[0] = 0, max(c_len[0], 1)  # candidates with an empty history, every time
    L, M = sum(h_len), sum(c_len)
    kw = {"dtype": torch.float64, "generator": g}
    q = torch.randn(M, H, D, **kw).requires_grad_()
    k = torch.randn(L, H, D, **kw).requires_grad_()
    v = torch.randn(L, H, Dv, **kw).requires_grad_()
    return q, k, v, _offsets(h_len), _offsets(c_len)


def naive(q, k, v, h_off, c_off, activation, divisor):
    """Request by request, candidate by candidate: a dense score row over that request's history."""
    rows = []
    for b in range(len(h_off) - 1):
        kb, vb = k[h_off[b] : h_off[b + 1]], v[h_off[b] : h_off[b + 1]]
        for c in range(int(c_off[b]), int(c_off[b + 1])):
            scores = torch.einsum("hd,lhd->hl", q[c], kb)
            if activation == "silu":
                w = F.silu(scores) / divisor
            elif kb.shape[0] == 0:
                w = scores  # [H, 0]: an empty sum
            else:
                w = torch.softmax(scores / q.shape[-1] ** 0.5, dim=-1)
            rows.append(torch.einsum("hl,lhe->he", w, vb))
    return torch.stack(rows) if rows else v.new_zeros(0, v.shape[1], v.shape[2])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_forward_and_backward_match_the_reference(impl, seed, activation):
    q, k, v, h_off, c_off = random_inputs(seed)
    # Odd seeds bound the histories above the longest (slots that are padding everywhere).
    got = attend(impl, q, k, v, h_off, c_off, activation, divisor=3.0, extra_slots=seed % 2 * 3)
    want = naive(q, k, v, h_off, c_off, activation, 3.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (q, k, v), grad, allow_unused=True)
    g_want = torch.autograd.grad(want, (q, k, v), grad, allow_unused=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_empty_history_gives_zero_and_finite_grads(impl, activation):
    q, k, v, h_off, c_off = random_inputs(0)
    out = attend(impl, q, k, v, h_off, c_off, activation)
    assert bool((out[: int(c_off[1])] == 0).all())
    out.sum().backward()
    for grad in (q.grad, k.grad, v.grad):
        assert grad is None or bool(torch.isfinite(grad).all())
    assert q.grad is not None and bool((q.grad[: int(c_off[1])] == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("extra_slots", [0, 2])
def test_every_history_empty_or_no_candidates(impl, extra_slots):
    q = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    k, v = torch.zeros(0, 2, 3, dtype=torch.float64), torch.zeros(0, 2, 4, dtype=torch.float64)
    out = attend(impl, q, k, v, _offsets([0, 0]), _offsets([2, 1]), extra_slots=extra_slots)
    assert out.shape == (3, 2, 4) and bool((out == 0).all())
    q0, k1, v1 = q[:0], torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, 4)
    out = attend(
        impl, q0, k1, v1.double(), _offsets([1, 3]), _offsets([0, 0]), extra_slots=extra_slots
    )
    assert out.shape == (0, 2, 4)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_history_longer_than_the_bound_fails(impl):
    q, k, v, h_off, c_off = random_inputs(1)
    longest = int((h_off[1:] - h_off[:-1]).max())
    layout = cross_pairs if impl == "pairs" else cross_padding
    with pytest.raises(RuntimeError, match="longer than max_history"):
        layout(h_off, segments_of(h_off, c_off), max_history=longest - 1)


def test_tiles_hold_every_candidate_once_with_little_padding():
    for counts in ([8] * 16, [512] * 16, [1, 0, 700, 3, 64], [0, 0], [5]):
        h_off, c_off = _offsets([2] * len(counts)), _offsets(counts)
        M = sum(counts)
        layout = cross_padding(h_off, segments_of(h_off, c_off), max_history=2)
        N, T = layout.history_rows.shape[0], layout.tile_size
        assert T <= max(M // len(counts), 1) and N * T <= M + len(counts) * (T - 1)
        slot = layout.candidate_tile * T + layout.candidate_slot
        assert slot.unique().numel() == M and bool((layout.candidate_tile < N).all())
        # Each candidate's tile reads its own request's history.
        seq = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        rows = layout.history_rows[layout.candidate_tile, 0]
        assert torch.equal(rows, h_off[:-1][seq])


@pytest.mark.parametrize("impl", IMPLS)
def test_softmax_is_stable_for_large_scores(impl):
    q, k, v, h_off, c_off = random_inputs(3)
    with torch.no_grad():
        got = attend(impl, q * 1e3, k, v, h_off, c_off)
        want = naive(q * 1e3, k, v, h_off, c_off, "softmax", 1.0)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_module_gradcheck_and_shapes(impl):
    cfg = CrossAttentionConfig(d_model=4, num_heads=2, head_dim=2)
    torch.manual_seed(0)
    module = CrossAttention(cfg).double()
    h_off, c_off = _offsets([3, 0, 2]), _offsets([2, 1, 2])
    cand = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    hist = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    layout = layout_of(impl, h_off, c_off, 5)
    assert module(cand, hist, layout).shape == (5, 4)
    assert torch.autograd.gradcheck(lambda c, h: module(c, h, layout), (cand, hist))


def test_bad_config():
    with pytest.raises(ValueError, match="activation"):
        CrossAttentionConfig(activation="relu")  # type: ignore[arg-type]


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_slots_spread_over_the_history_rows(impl):
    """Padding slots read rows spread over the batch, not all row 0: on CUDA the gather's
    backward sums each row's duplicates serially, and with every padding slot on row 0 that one
    row took 89 ms of a 97 ms GESR training step on an H200."""
    # Fewer history rows than slots, then more (the usual case: max_history bounds one history,
    # the batch holds many).
    for h_len, c_len, extra in (([3, 1, 4, 2], [4, 2, 8, 1], 60), ([30, 25, 40, 35], [8] * 4, 24)):
        h_off, c_off = _offsets(h_len), _offsets(c_len)
        layout = layout_of(impl, h_off, c_off, sum(c_len), extra_slots=extra)
        rows = layout.history if impl == "pairs" else layout.history_rows
        reads = torch.bincount(rows.flatten(), minlength=sum(h_len))
        assert reads.numel() == sum(h_len)
        # At most a few times the mean (the padded layout's unused tiles read the last
        # request's rows too); all padding on one row would be most of the slots.
        assert int(reads.max()) <= 3 * rows.numel() / sum(h_len)
