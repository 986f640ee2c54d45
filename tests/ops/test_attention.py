"""hstu_attention: flex vs the dense reference, relative bias, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgr.masks import and_masks, build_custom_mask, build_hstu_mask, jagged, semi_local
from flexgr.ops import RelativeBias, hstu_attention, next_timestamps, time_bucket
from flexgr.ops.flex import hstu_attention_flex
from flexgr.ops.rab import dense_bias
from tests.conftest import make_offsets
from tests.ops.helpers import cast, random_problem


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN never passes"
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


problem_st = st.fixed_dictionaries(
    {
        "lengths": st.lists(st.integers(1, 140), min_size=1, max_size=4),
        "heads": st.integers(1, 3),
        "dqk": st.sampled_from([8, 16, 24]),
        "dv": st.sampled_from([8, 12, 16]),
        "contextual_len": st.integers(0, 2),
        "targets": st.booleans(),
        "max_attn_len": st.sampled_from([0, 4, 33]),
        "full_attn_tail": st.sampled_from([0, 3]),
        "use_rab": st.booleans(),
        "seed": st.integers(0, 1000),
    }
)


@settings(max_examples=25, deadline=None)
@given(problem_st, st.sampled_from(["split", "shift"]))
def test_flex_forward_matches_reference(spec, method):
    p = random_problem(**spec)
    ref = hstu_attention(p.q, p.k, p.v, p.offsets, backend="reference", **p.kwargs())
    mask = build_hstu_mask(
        p.offsets, num_targets=p.num_targets, contextual_len=p.contextual_len,
        max_attn_len=p.max_attn_len, full_attn_tail=p.full_attn_tail,
    )
    out = hstu_attention_flex(
        p.q, p.k, p.v, mask, max_seq_len=p.max_seq_len, alpha=p.alpha, rab=p.rab, method=method
    )
    # FlexAttention returns its LSE in fp32, so even fp64 inputs rebuild to ~1e-7.
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("method", ["split", "shift"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(targets=True, use_rab=True),
        dict(contextual_len=2, targets=True, max_attn_len=5, full_attn_tail=2, use_rab=True),
    ],
)
def test_flex_backward_matches_reference(cpu_flex_backward, method, opts):
    """The transform's gradients (q, k, v and both bias tables) through flex's math backward."""
    p = random_problem([37, 1, 130, 9], requires_grad=True, **opts)
    ref = hstu_attention(p.q, p.k, p.v, p.offsets, backend="reference", **p.kwargs())
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, p.leaves(), g)
    mask = build_hstu_mask(
        p.offsets, num_targets=p.num_targets, contextual_len=p.contextual_len,
        max_attn_len=p.max_attn_len, full_attn_tail=p.full_attn_tail,
    )
    out = hstu_attention_flex(
        p.q, p.k, p.v, mask, max_seq_len=p.max_seq_len, alpha=p.alpha, rab=p.rab, method=method
    )
    assert rel_err(out, ref) < 1e-6
    grads = torch.autograd.grad(out, p.leaves(), g)
    for name, a, b in zip(["q", "k", "v", "pos_w", "ts_w"], grads, grads_ref):
        assert rel_err(a, b) < 1e-6, name


def test_cpu_flex_with_grad_falls_back_to_reference():
    p = random_problem([5, 7], requires_grad=True, dtype=torch.float32)
    with pytest.warns(UserWarning, match="no backward on CPU"):
        out = hstu_attention(p.q, p.k, p.v, p.offsets, backend="flex", **p.kwargs())
    ref = hstu_attention(p.q, p.k, p.v, p.offsets, backend="reference", **p.kwargs())
    assert torch.allclose(out, ref)
    out.sum().backward()
    assert p.q.grad is not None


def test_custom_mask_flex_vs_dense_oracle():
    offsets = make_offsets([50, 3, 70])
    p = random_problem([50, 3, 70], use_rab=True)
    mod = and_masks(jagged(offsets), semi_local(offsets, 6, 2))
    mask = build_custom_mask(mod, offsets)
    ref = hstu_attention(p.q, p.k, p.v, offsets, backend="reference", mask=mask, **p.kwargs())
    out = hstu_attention(p.q, p.k, p.v, offsets, backend="flex", mask=mask, **p.kwargs())
    assert rel_err(out, ref) < 1e-6
    # the dense oracle itself: semi-local keeps strictly fewer pairs than full causal
    full = hstu_attention(p.q, p.k, p.v, offsets, backend="reference", **p.kwargs())
    assert rel_err(full, ref) > 1e-3


# ---------------------------------------------------------------- relative bias


def test_dense_bias_matches_definition():
    p = random_problem([6, 1, 9], use_rab=True)
    rab = p.rab
    bias = dense_bias(rab, p.offsets, 9)
    N = rab.max_len
    off = p.offsets.tolist()
    for b in range(3):
        s, L = off[b], off[b + 1] - off[b]
        for i in range(L):
            nxt = rab.timestamps[s + i + 1] if i + 1 < L else rab.next_timestamps[s + L - 1]
            for j in range(L):
                dt = abs(int(nxt) - int(rab.timestamps[s + j]))
                bucket = min(max(int(torch.log(torch.tensor(float(max(dt, 1)))) / 0.301), 0), 128)
                want = rab.pos_w[N - 1 + j - i] + rab.ts_w[bucket]
                assert torch.isclose(bias[b, i, j], want), (b, i, j)


def test_next_timestamps_uses_query_time():
    ts = torch.tensor([10, 20, 30, 5, 6])
    offsets = make_offsets([3, 2])
    assert next_timestamps(ts, offsets).tolist() == [20, 30, 30, 6, 6]
    assert next_timestamps(ts, offsets, torch.tensor([99, 77])).tolist() == [20, 30, 99, 6, 77]


def test_time_bucket_edges():
    dt = torch.tensor([0, 1, -1, 2, 1_000_000_000, -(10**17)])
    got = time_bucket(dt, 128).tolist()
    assert got[:3] == [0, 0, 0]
    assert got[3] == int(torch.log(torch.tensor(2.0)) / 0.301)
    assert got[-1] == 128


def test_rab_gradients_reach_both_tables():
    """Table gradients of the dense reference equal those of an explicit per-pair computation."""
    p = random_problem([7, 4], use_rab=True, requires_grad=True, targets=True)
    out = hstu_attention(p.q, p.k, p.v, p.offsets, backend="reference", **p.kwargs())
    g = torch.randn_like(out)
    d_pos, d_ts = torch.autograd.grad(out, [p.rab.pos_w, p.rab.ts_w], g)
    # explicit: d out_i / d bias_ij = silu'(s_ij) * m_ij * v_j / N, summed per table entry
    from flexgr.masks import dense_hstu_mask

    lengths = (p.offsets[1:] - p.offsets[:-1])
    mask = dense_hstu_mask(lengths, 7, num_targets=p.num_targets)
    want_pos = torch.zeros_like(p.rab.pos_w)
    want_ts = torch.zeros_like(p.rab.ts_w)
    N = p.rab.max_len
    bias = dense_bias(p.rab, p.offsets, 7)
    with torch.no_grad():
        for b, (s, L) in enumerate([(0, 7), (7, 4)]):
            for i in range(L):
                for j in range(L):
                    if not mask[b, i, j]:
                        continue
                    x = p.alpha * (p.q[s + i] * p.k[s + j]).sum(-1) + bias[b, i, j]  # [H]
                    sig = torch.sigmoid(x)
                    dsilu = sig * (1 + x * (1 - sig))
                    contrib = (dsilu * (g[s + i] * p.v[s + j]).sum(-1)).sum() / p.max_seq_len
                    want_pos[N - 1 + j - i] += contrib
                    nxt = p.rab.next_timestamps[s + i]
                    bucket = time_bucket(nxt - p.rab.timestamps[s + j], 128)
                    want_ts[bucket] += contrib
    assert torch.allclose(d_pos, want_pos, atol=1e-12)
    assert torch.allclose(d_ts, want_ts, atol=1e-12)


# ---------------------------------------------------------------- bad input


def _good(**over):
    T, H = 10, 2
    args = dict(
        q=torch.randn(T, H, 8), k=torch.randn(T, H, 8), v=torch.randn(T, H, 4),
        offsets=make_offsets([4, 6]), max_seq_len=8, alpha=1.0,
    )
    args.update(over)
    return args


def _call(args):
    q, k, v, offsets = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("offsets")
    return hstu_attention(q, k, v, offsets, backend="reference", **args)


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(k=torch.randn(10, 2, 7)), "q and k must have the same shape"),
        (dict(v=torch.randn(9, 2, 4)), "v must be"),
        (dict(q=torch.randn(10, 8)), "q must be"),
        (dict(v=torch.randn(10, 2, 4, dtype=torch.float64)), "share a dtype"),
        (dict(offsets=torch.tensor([1, 4, 10])), "offsets must start at 0"),
        (dict(offsets=torch.tensor([0, 6, 4, 10])), "non-decreasing"),
        (dict(offsets=torch.tensor([0, 4, 9])), "offsets must end at T"),
        (dict(offsets=torch.tensor([0.0, 4.0, 10.0])), "offsets must be an integer"),
        (dict(max_seq_len=5), "max_seq_len = 5 is smaller than the longest sequence"),
        (dict(num_targets=torch.tensor([1, 7])), "num_targets is longer than its sequence"),
        (dict(num_targets=torch.tensor([1, 2, 3])), "num_targets must be"),
        (dict(num_targets=torch.tensor([-1, 2])), "num_targets must be >= 0"),
        (dict(contextual_len=-1), "contextual_len"),
        (dict(max_attn_len=-2), "max_attn_len"),
    ],
)
def test_bad_input_names_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        _call(_good(**over))


def test_bad_backend_and_rab():
    with pytest.raises(ValueError, match="backend must be one of"):
        hstu_attention(**{**_good(), "backend": "cuda"})
    offsets = make_offsets([4, 6])
    rab = RelativeBias.from_timestamps(torch.zeros(5), torch.zeros(129), torch.arange(10), offsets)
    with pytest.raises(ValueError, match="rab.pos_w covers sequences up to 3"):
        _call(_good(rab=rab))
    rab = RelativeBias(torch.zeros(15), torch.zeros(129), torch.arange(9), torch.arange(9))
    with pytest.raises(ValueError, match="rab.timestamps must be"):
        _call(_good(rab=rab))


# ---------------------------------------------------------------- GPU


def _fa_rule_errors(p, backend):
    """Max-abs errors of (backend in bf16) and (eager reference in bf16), both against fp32."""
    ref32 = cast(p, torch.float32)
    out32 = hstu_attention(ref32.q, ref32.k, ref32.v, ref32.offsets, backend="reference", **ref32.kwargs())
    g = torch.randn_like(out32)
    grads32 = torch.autograd.grad(out32, ref32.leaves(), g)
    res = {}
    for name, bk in (("eager_bf16", "reference"), ("test", backend)):
        pb = cast(p, torch.bfloat16)
        out = hstu_attention(pb.q, pb.k, pb.v, pb.offsets, backend=bk, **pb.kwargs())
        grads = torch.autograd.grad(out, pb.leaves(), g.to(out.dtype))
        res[name] = [float((out.float() - out32).abs().max())] + [
            float((a.float() - b).abs().max()) for a, b in zip(grads, grads32)
        ]
        assert not torch.isnan(out).any()
    return res


@pytest.mark.gpu
@pytest.mark.parametrize(
    "opts",
    [dict(), dict(targets=True, use_rab=True), dict(contextual_len=3, targets=True, max_attn_len=64, full_attn_tail=8, use_rab=True)],
)
def test_gpu_flex_bf16_flashattention_rule(opts):
    p = random_problem([1, 77, 300, 513, 129], heads=2, dqk=64, dv=64, device="cuda", dtype=torch.float32, **opts)
    res = _fa_rule_errors(p, "flex")
    eager, got = res["eager_bf16"], res["test"]
    assert got[0] <= 2 * eager[0] + 1e-6, (got, eager)
    for a, b in zip(got[1:], eager[1:]):
        assert a <= 5 * b + 1e-6, (got, eager)


@pytest.mark.gpu
def test_gpu_flex_fp32_matches_reference():
    p = random_problem([1, 200, 129, 64], heads=2, dqk=32, dv=32, device="cuda", dtype=torch.float32,
                       targets=True, use_rab=True, requires_grad=True)
    ref = hstu_attention(p.q, p.k, p.v, p.offsets, backend="reference", **p.kwargs())
    out = hstu_attention(p.q, p.k, p.v, p.offsets, backend="flex", **p.kwargs())
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, p.leaves(), g), torch.autograd.grad(ref, p.leaves(), g)):
        assert rel_err(a, b) < 1e-4
    assert rel_err(out, ref) < 1e-4


def test_flex_custom_mask_backward_with_bias(cpu_flex_backward):
    """Bias-table gradients under an arbitrary mask_mod (semi-local) through the flex backend."""
    lengths = [40, 3, 66]
    offsets = make_offsets(lengths)
    p = random_problem(lengths, use_rab=True, requires_grad=True)
    mask = build_custom_mask(and_masks(jagged(offsets), semi_local(offsets, 5, 2, mode="tail_rows")), offsets)
    kw = dict(max_seq_len=p.max_seq_len, alpha=p.alpha, rab=p.rab, mask=mask)
    ref = hstu_attention(p.q, p.k, p.v, offsets, backend="reference", **kw)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, p.leaves(), g)
    out = hstu_attention_flex(p.q, p.k, p.v, mask, max_seq_len=p.max_seq_len, alpha=p.alpha, rab=p.rab)
    got = torch.autograd.grad(out, p.leaves(), g)
    for name, a, b in zip(["q", "k", "v", "pos_w", "ts_w"], got, want):
        assert rel_err(a, b) < 1e-6, name


def test_flex_bias_grads_with_row_blocks(cpu_flex_backward, monkeypatch):
    """A sequence longer than the bridge's memory budget is walked in blocks of query rows."""
    import flexgr.ops.rab_grad as rab_grad

    monkeypatch.setattr(rab_grad, "_PAIR_BUDGET", 2 * 150 * 7)  # a few rows per block
    p = random_problem([150, 4, 33], use_rab=True, requires_grad=True, targets=True, max_attn_len=20)
    ref = hstu_attention(p.q, p.k, p.v, p.offsets, backend="reference", **p.kwargs())
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, p.leaves(), g)
    mask = build_hstu_mask(p.offsets, num_targets=p.num_targets, max_attn_len=p.max_attn_len)
    out = hstu_attention_flex(p.q, p.k, p.v, mask, max_seq_len=p.max_seq_len, alpha=p.alpha, rab=p.rab)
    got = torch.autograd.grad(out, p.leaves(), g)
    for name, a, b in zip(["q", "k", "v", "pos_w", "ts_w"], got, want):
        assert rel_err(a, b) < 1e-6, name
