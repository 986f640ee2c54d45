"""Draws that do not depend on how a batch is split (flexgr.distributed.rng), in one process."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexgr.distributed import ReplicatedDropout, rank_local_rng, replicate_dropout
from flexgr.model import HSTU, HSTUConfig


def test_replicated_dropout_gives_each_shard_the_rows_of_the_whole_batch_draw() -> None:
    full = torch.randn(23, 6)
    torch.manual_seed(5)
    want = F.dropout(full, 0.3, training=True)
    after_whole = torch.randint(0, 1000, (4,))

    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.3))
    rows = replicate_dropout(model)
    assert isinstance(model[1], ReplicatedDropout)
    pieces = [torch.tensor([0, 4, 5, 22]), torch.tensor([], dtype=torch.int64), torch.arange(9)]
    for index in pieces:  # every "rank" starts from the same generator state
        torch.manual_seed(5)
        with rows.bound(index, total=23):
            got = model[1](full[index])
        assert torch.equal(got, want[index])
        # The generator moved exactly as for the whole batch, whatever this rank's share.
        assert torch.equal(torch.randint(0, 1000, (4,)), after_whole)
    assert rows.index is None  # unbound after the forward


def test_unbound_or_eval_replicated_dropout_is_plain_dropout() -> None:
    rows = replicate_dropout(drop := nn.Sequential(nn.Dropout(0.5)))
    x = torch.randn(7, 3)
    torch.manual_seed(1)
    want = F.dropout(x, 0.5, training=True)
    torch.manual_seed(1)
    assert torch.equal(drop(x), want)
    drop.eval()
    with rows.bound(torch.arange(7), total=10):
        assert torch.equal(drop(x), x)


def test_replicate_dropout_reaches_every_hstu_dropout() -> None:
    model = HSTU(HSTUConfig(num_items=9, d_model=8, num_layers=2, dqk=4, dv=4))
    before = sum(type(m) is nn.Dropout for m in model.modules())
    replicate_dropout(model)
    assert before == 3  # input + one per layer
    assert sum(isinstance(m, ReplicatedDropout) for m in model.modules()) == before
    assert not any(type(m) is nn.Dropout for m in model.modules())


def test_rank_local_rng_differs_per_rank_and_restores_the_shared_generator() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    draws = []
    for rank in (0, 1):
        with rank_local_rng(seed=7, step=3, rank=rank, device=torch.device("cpu")):
            draws.append(torch.rand(5))
        assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(draws[0], draws[1])
    with rank_local_rng(seed=7, step=3, rank=1, device=torch.device("cpu")):
        assert torch.equal(torch.rand(5), draws[1])  # recomputed after a resume
