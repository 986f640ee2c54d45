"""model.attention = "softmax" (the HSTU paper's "HSTU w/ softmax") against an eager definition:
per sequence, per head, a row softmax over the allowed keys of a plain loop."""

from __future__ import annotations

import math

import pytest
import torch

from flexgr.batch import JaggedBatch
from flexgr.masks.block import build_custom_mask, build_hstu_mask
from flexgr.masks.dense import dense_hstu_mask
from flexgr.masks.mods import and_masks, jagged, semi_local
from flexgr.model import HSTU, HSTUConfig, encode, get_spec
from flexgr.model.hstu.softmax import softmax_attention
from flexgr.ops.rab import RelativeBias
from flexgr.train import ConfigError
from tests.conftest import make_offsets, tiny_config


def eager_softmax(q, k, v, lengths, allowed, alpha, bias=None):
    """allowed(b, i, j) -> bool; bias(b, i, j) -> float. Loops, no masking tricks."""
    out = torch.zeros_like(v)
    start = 0
    for b, n in enumerate(lengths):
        for h in range(q.shape[1]):
            for i in range(n):
                cols = [j for j in range(n) if allowed(b, i, j)]
                if not cols:
                    continue
                s = torch.stack(
                    [
                        alpha * (q[start + i, h] @ k[start + j, h])
                        + (bias(b, i, j) if bias else 0.0)
                        for j in cols
                    ]
                )
                w = torch.exp(s - s.max())
                w = w / w.sum()
                out[start + i, h] = sum(w[c] * v[start + j, h] for c, j in enumerate(cols))
        start += n
    return out


def qkv(T, H=2, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (T, H, D)
    return [torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in "qkv"]


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"max_attn_len": 2},
        {"max_attn_len": 2, "full_attn_tail": 1},
        {"contextual_len": 2},
        {"targets": [2, 0, 1]},
    ],
)
def test_builtin_rule_matches_the_eager_definition(opts) -> None:
    lengths = [7, 3, 5]  # not tile multiples, one short sequence
    offsets = make_offsets(lengths)
    T = sum(lengths)
    q, k, v = qkv(T)
    nt = torch.tensor(opts["targets"]) if "targets" in opts else None
    rule = {key: val for key, val in opts.items() if key != "targets"}
    dense = dense_hstu_mask(torch.tensor(lengths), max(lengths), num_targets=nt, **rule)
    out = softmax_attention(q, k, v, offsets, alpha=0.7, mask=None, num_targets=nt, **rule)
    ref = eager_softmax(q, k, v, lengths, lambda b, i, j: bool(dense[b, i, j]), 0.7)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    # backward against the eager definition
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # the block-mask path (what CUDA runs through flex) reads the same rule
    mask = build_hstu_mask(offsets, num_targets=nt, total_len=T, **rule)
    torch.testing.assert_close(
        softmax_attention(q, k, v, offsets, alpha=0.7, mask=mask, num_targets=nt, **rule),
        ref, atol=1e-12, rtol=1e-12,
    )


def test_custom_mask_and_relative_bias_match_the_eager_definition() -> None:
    lengths = [6, 4]
    offsets = make_offsets(lengths)
    T = sum(lengths)
    q, k, v = qkv(T, seed=1)
    mod = and_masks(jagged(offsets), semi_local(offsets, 1, 2))
    mask = build_custom_mask(mod, offsets, total_len=T)
    g = torch.Generator().manual_seed(2)
    pos_w = torch.randn(2 * 8 - 1, generator=g, dtype=torch.float64)
    ts_w = torch.randn(5, generator=g, dtype=torch.float64)
    ts = torch.cumsum(torch.randint(1, 50, (T,), generator=g), 0)
    rab = RelativeBias.from_timestamps(pos_w, ts_w, ts, offsets)
    start = [0, 6]

    def bias(b, i, j):
        a, c = start[b] + i, start[b] + j
        dt = abs(int(rab.next_timestamps[a]) - int(ts[c]))
        bucket = min(max(int(math.log(max(dt, 1)) / 0.301), 0), 4)
        return pos_w[8 - 1 + j - i] + ts_w[bucket]

    def allowed(b, i, j):
        return j <= i and (i - j <= 1 or j < 2)

    out = softmax_attention(q, k, v, offsets, alpha=0.5, mask=mask, rab=rab)
    ref = eager_softmax(q, k, v, lengths, allowed, 0.5, bias)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_the_model_option_switches_the_layer_to_softmax() -> None:
    torch.manual_seed(0)
    cfg = HSTUConfig(
        num_items=40, d_model=12, num_layers=2, num_heads=2, dqk=6, dv=6, max_seq_len=20,
        backend="reference", dropout=0.0, input_dropout=0.0, attention="softmax",
    )
    assert cfg.score_scale == pytest.approx(6**-0.5)
    m = HSTU(cfg).double().eval()
    offsets = make_offsets([9, 4])
    batch = JaggedBatch(torch.randint(1, 41, (13,)), offsets, torch.arange(13), None)
    out = encode(m, batch)
    silu = HSTU(HSTUConfig(**{**cfg.__dict__, "attention": "silu"})).double().eval()
    silu.load_state_dict(m.state_dict())  # same parameters, different attention
    assert not torch.allclose(out, encode(silu, batch))
    # the layer's attention is exactly the softmax op on its q, k, v
    inputs = get_spec("hstu").prepare(m, batch)
    assert inputs.attention.softmax


def test_softmax_is_refused_where_it_cannot_run(tiny_home) -> None:
    with pytest.raises(ConfigError, match="softmax.*triton"):
        tiny_config(tiny_home, "model.attention=softmax", "model.backend=triton")


def test_the_flex_path_matches_the_dense_path_forward() -> None:
    """CUDA runs flex's softmax over the BlockMask; eager flex runs forward-only on CPU."""
    from flexgr.model.hstu.softmax import softmax_attention_dense, softmax_attention_flex

    lengths = [130, 7, 64]  # crosses a 128 block
    offsets = make_offsets(lengths)
    T = sum(lengths)
    q, k, v = (x.detach() for x in qkv(T, D=8, seed=3))
    mask = build_hstu_mask(offsets, max_attn_len=20, total_len=T)
    with torch.no_grad():
        flex = softmax_attention_flex(q, k, v, mask, alpha=0.4)
        dense = softmax_attention_dense(q, k, v, offsets, alpha=0.4, mask=None, max_attn_len=20)
    torch.testing.assert_close(flex, dense, atol=1e-9, rtol=1e-9)
