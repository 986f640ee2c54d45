"""SASRec's ``reference`` layout against its definition: the reference trainer's block written
with ``nn.MultiheadAttention`` on padded batches, in fp64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flexgr.model import SASRec, SASRecConfig
from flexgr.model.sasrec import ReferenceSASRecLayer
from tests.model.test_models import batch, encode_batch


def reference_block(layer: ReferenceSASRecLayer, x_BND: torch.Tensor) -> torch.Tensor:
    """The reference's SASRec layer on a padded batch (its code, eval mode, with this layer's
    weights): Q = LN(x); MHA(query=Q, key=x, value=x, causal); z = LN(Q + mha); FFN(z) + z."""
    d, H = layer.cfg.d_model, layer.cfg.num_heads
    mha = nn.MultiheadAttention(d, H, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(layer.in_proj.weight)
        mha.in_proj_bias.copy_(layer.in_proj.bias)
        mha.out_proj.weight.copy_(layer.proj.weight)
        mha.out_proj.bias.copy_(layer.proj.bias)
    N = x_BND.shape[1]
    causal = torch.triu(torch.ones(N, N, dtype=torch.bool), diagonal=1)
    q = F.layer_norm(x_BND, (d,), eps=1e-8)
    attn, _ = mha(q, x_BND, x_BND, attn_mask=causal, need_weights=False)
    z = F.layer_norm(q + attn, (d,), eps=1e-8)
    return layer.ffn(z) + z


@pytest.mark.parametrize("heads", [1, 2])
def test_reference_layer_matches_the_reference_block(heads: int) -> None:
    torch.manual_seed(0)
    cfg = SASRecConfig(num_items=50, d_model=16, num_heads=heads, ffn_dim=24, layout="reference")
    layer = ReferenceSASRecLayer(cfg).double().eval()
    with torch.no_grad():  # non-zero biases, so their placement is checked too
        layer.in_proj.bias.normal_()
        layer.proj.bias.normal_()
    lengths = [5, 1, 13]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x_TD = torch.randn(sum(lengths), 16, dtype=torch.float64)
    out_TD = layer(x_TD, offsets, max(lengths))
    for b, L in enumerate(lengths):
        rows = slice(int(offsets[b]), int(offsets[b]) + L)
        expected = reference_block(layer, x_TD[rows][None])[0]
        torch.testing.assert_close(out_TD[rows], expected, rtol=1e-10, atol=1e-10)


def test_reference_init_and_model_wiring() -> None:
    torch.manual_seed(0)
    d = 50
    cfg = SASRecConfig(num_items=3000, d_model=d, ffn_dim=50, layout="reference")
    model = SASRec(cfg)
    layer = model.layers[0]
    assert isinstance(layer, ReferenceSASRecLayer) and isinstance(model.final_norm, nn.Identity)
    # xavier normal of the packed [3d, d] projection: std sqrt(2 / (d + 3d))
    assert layer.in_proj.weight.std().item() == pytest.approx(math.sqrt(2 / (4 * d)), rel=0.05)
    assert layer.proj.weight.std().item() == pytest.approx(math.sqrt(2 / (2 * d)), rel=0.05)
    assert not layer.in_proj.bias.any() and not layer.proj.bias.any()
    pos = model.input.pos
    std = math.sqrt(1 / d)
    assert pos.abs().max().item() <= 2 * std + 1e-6
    assert pos.std().item() == pytest.approx(0.88 * std, rel=0.1)  # a 2-std cut normal: 0.88 std
    assert not any(p for n, p in model.named_parameters() if "norm" in n)  # no affine norms
    ids, offsets, _ = batch([7, 1, 12])
    out = encode_batch(model.train(), ids, offsets)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(ids.numel()))
    (out @ model.item_embeddings().T).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="layout"):
        SASRec(SASRecConfig(num_items=5, d_model=8, layout="post_ln"))  # type: ignore[arg-type]
