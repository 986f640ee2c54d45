"""The seam parallel code uses: a layer calls the prepared inputs' attention, nothing else."""

from __future__ import annotations

import dataclasses

import torch

from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, get_spec
from tests.conftest import make_offsets


def test_every_layer_calls_the_prepared_attention_and_nothing_else():
    """HSTU with inputs whose attention is a spy equals the plain forward; the spy saw every
    layer. So inputs restricted to one rank's tokens (CP) change the attention and nothing else."""
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
    batch = JaggedBatch(ids, offsets, torch.arange(18) * 1000)
    inputs = get_spec("hstu").prepare(model, batch)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["max_seq_len"])
        return inputs.attention(*args, **kwargs)

    with torch.no_grad():
        out = model(ids, dataclasses.replace(inputs, attention=spy))
        plain = model(ids, inputs)
    assert calls == [model.cfg.attn_len] * 3
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
