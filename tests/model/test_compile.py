"""Compiled HSTU: the forward traces once and does not recompile for new packed lengths."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, get_spec


def batches(count: int):
    g = torch.Generator().manual_seed(0)
    for _ in range(count):
        lengths = torch.randint(1, 40, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        T = int(offsets[-1])
        ids = torch.randint(1, 51, (T,), generator=g)
        ts = torch.cumsum(torch.randint(0, 100, (T,), generator=g), 0)
        yield JaggedBatch(ids, offsets, ts, ts[offsets[1:] - 1] + 1)


def test_no_recompile_for_new_packed_lengths() -> None:
    torch.manual_seed(0)
    model = HSTU(HSTUConfig(num_items=50, d_model=16, num_layers=2, num_heads=2, dqk=8, dv=8,
                            max_seq_len=40, backend="reference", dropout=0.0, input_dropout=0.0))
    prepare = get_spec("hstu").prepare
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, backend="eager")
    graphs = []
    for batch in batches(5):
        inputs = prepare(model, batch)
        got = compiled(batch.item_ids, inputs)
        got.sum().backward()
        torch.testing.assert_close(got, model(batch.item_ids, inputs))
        graphs.append(counters["stats"]["unique_graphs"])
    # The first two batches may specialise (0/1-sized dimensions, then dynamic); after that a
    # new length must reuse the graphs.
    assert graphs[2] == graphs[-1], graphs
