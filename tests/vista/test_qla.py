"""QLA's cumulative-sum implementation against its row-by-row definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexgr.vista.qla import qla


def naive_qla(q, k, v, offsets, *, divisor, num_targets=None, state_activation="silu"):
    """Row by row from the definition: O(L^2) sums, no cumulative sums, no shared code."""
    psi = F.silu if state_activation == "silu" else (lambda s: s)
    out = torch.zeros_like(v)
    bounds = offsets.tolist()
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        nt = int(num_targets[b]) if num_targets is not None else 0
        first_cand = hi - nt
        for i in range(lo, hi):
            last = min(i, first_cand - 1)  # history rows 0..last feed row i's state
            state = torch.zeros(q.shape[1], q.shape[2], v.shape[2], dtype=v.dtype)
            for j in range(lo, last + 1):
                state = state + torch.einsum("hk,hv->hkv", F.silu(k[j]), v[j]) / divisor
            o = torch.einsum("hk,hkv->hv", F.silu(q[i]), psi(state))
            if i >= first_cand:
                o = o + (F.silu(q[i]) * F.silu(k[i])).sum(-1, keepdim=True) * v[i] / divisor
            out[i] = o
    return out


def jagged(lengths, H=2, dk=3, dv=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    T = int(offsets[-1])
    q, k, v = (torch.randn(T, H, d, generator=g, dtype=dtype) for d in (dk, dk, dv))
    return q, k, v, offsets


CASES = [
    ([1], None),
    ([5, 1, 7], None),
    ([3, 0, 6, 1], None),  # an empty sequence
    ([5, 4, 7], [2, 1, 3]),
    ([1, 3, 2], [1, 3, 0]),  # a sequence that is only a candidate, one only candidates
]


@pytest.mark.parametrize("state_activation", ["silu", "identity"])
@pytest.mark.parametrize("lengths,nt", CASES)
def test_forward_matches_definition(lengths, nt, state_activation):
    q, k, v, offsets = jagged(lengths, seed=len(lengths))
    num_targets = torch.tensor(nt) if nt is not None else None
    got = qla(
        q, k, v, offsets, divisor=7.0, num_targets=num_targets, state_activation=state_activation
    )
    want = naive_qla(
        q, k, v, offsets, divisor=7.0, num_targets=num_targets, state_activation=state_activation
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("state_activation", ["silu", "identity"])
def test_gradcheck(state_activation):
    q, k, v, offsets = jagged([3, 1, 2], H=1, dk=2, dv=2, seed=3)
    num_targets = torch.tensor([1, 0, 2])
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return qla(
            q,
            k,
            v,
            offsets,
            divisor=3.0,
            num_targets=num_targets,
            state_activation=state_activation,
        )

    assert torch.autograd.gradcheck(f, inputs)


def test_backward_matches_definition():
    q, k, v, offsets = jagged([4, 1, 5], seed=5)
    num_targets = torch.tensor([2, 0, 1])
    cot = torch.randn(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    grads = []
    for fn in (qla, naive_qla):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves, offsets, divisor=5.0, num_targets=num_targets) * cot).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_candidates_do_not_see_each_other():
    q, k, v, offsets = jagged([6, 5], seed=7)
    num_targets = torch.tensor([3, 2])
    base = qla(q, k, v, offsets, divisor=6.0, num_targets=num_targets)
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    for t in (k2, v2, q2):
        t[4] += 3.0  # the middle candidate of sequence 0
    moved = qla(q2, k2, v2, offsets, divisor=6.0, num_targets=num_targets)
    changed = (moved - base).abs().amax(dim=(1, 2)) > 0
    assert changed.tolist() == [i == 4 for i in range(11)]


def test_history_row_ignores_later_rows():
    q, k, v, offsets = jagged([7], seed=9)
    base = qla(q, k, v, offsets, divisor=7.0)
    k2 = k.clone()
    k2[4] += 2.0
    moved = qla(q, k2, v, offsets, divisor=7.0)
    torch.testing.assert_close(moved[:4], base[:4], rtol=0, atol=0)
    assert (moved[4:] - base[4:]).abs().amax() > 0


def test_float32_close_to_float64():
    q, k, v, offsets = jagged([40, 13, 1, 29], seed=11)
    num_targets = torch.tensor([5, 0, 1, 3])
    want = qla(q, k, v, offsets, divisor=50.0, num_targets=num_targets)
    got = qla(q.float(), k.float(), v.float(), offsets, divisor=50.0, num_targets=num_targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_one_line_errors():
    q, k, v, offsets = jagged([3])
    with pytest.raises(ValueError, match="q, k must be"):
        qla(q, k[:, :, :2], v, offsets, divisor=1.0)
    with pytest.raises(ValueError, match="num_targets must be"):
        qla(q, k, v, offsets, divisor=1.0, num_targets=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="state_activation"):
        qla(q, k, v, offsets, divisor=1.0, state_activation="relu")  # type: ignore[arg-type]


def test_identity_feature_map_takes_mapped_inputs():
    """feature_map="identity" on silu(q), silu(k) is the default on q, k (the HSTU-layer form)."""
    q, k, v, offsets = jagged([5, 3], seed=13)
    num_targets = torch.tensor([2, 1])
    want = qla(q, k, v, offsets, divisor=4.0, num_targets=num_targets)
    got = qla(
        F.silu(q), F.silu(k), v, offsets, divisor=4.0, num_targets=num_targets,
        feature_map="identity",
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    differs = qla(q, k, v, offsets, divisor=4.0, num_targets=num_targets, feature_map="identity")
    assert (differs - want).abs().max() > 1e-3
    with pytest.raises(ValueError, match="feature_map"):
        qla(q, k, v, offsets, divisor=1.0, feature_map="relu")  # type: ignore[arg-type]
