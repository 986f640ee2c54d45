"""The seam distributed code uses to run HSTU's layers: token tables + an attention callable."""

from __future__ import annotations

import torch

from flexgr.model import HSTU, HSTUConfig
from flexgr.ops import hstu_attention
from tests.conftest import make_offsets


def test_model_attention_seam_is_the_only_change():
    """HSTU.encode with an attention callable uses it in every layer; with hstu_attention it is
    the model's forward."""
    torch.manual_seed(0)
    model = HSTU(
        HSTUConfig(
            num_items=30,
            d_model=16,
            num_layers=3,
            num_heads=2,
            dqk=8,
            dv=8,
            max_seq_len=20,
            backend="reference",
        )
    ).eval()
    offsets = make_offsets([5, 1, 12])
    ids = torch.randint(1, 31, (18,))
    ts = torch.arange(18) * 1000
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["max_seq_len"])
        return hstu_attention(*args, **kwargs)

    with torch.no_grad():
        tokens = model.token_tables(ids, offsets, ts)
        out = model.encode(ids, tokens, attention=spy)
        plain = model(ids, offsets, ts)
    assert calls == [model.cfg.attn_len] * 3
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
