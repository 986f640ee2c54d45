"""The seed summariser: its mask against the definition, its outputs' dependencies."""

from __future__ import annotations

import pytest
import torch

from flexgr.vista.mask import seed_summary_mask
from flexgr.vista.summariser import SeedSummariser, SummariserConfig, prepare_summary


def mask_definition(lengths: list[int], S: int) -> torch.Tensor:
    """[P, P] from the rule, token by token: segment b is S seeds then lengths[b] history rows."""
    tokens = []  # (segment, is_seed, index in the history)
    for b, n in enumerate(lengths):
        tokens += [(b, True, -1)] * S + [(b, False, i) for i in range(n)]
    P = len(tokens)
    want = torch.zeros(P, P, dtype=torch.bool)
    for qi, (bq, sq, iq) in enumerate(tokens):
        for ki, (bk, sk, ik) in enumerate(tokens):
            if bq != bk:
                continue
            want[qi, ki] = sq or (not sk and ik <= iq)
    return want


@pytest.mark.parametrize("lengths,S", [([1], 1), ([3, 1, 5], 2), ([4, 0, 2], 3)])
def test_mask_matches_definition(lengths, S):
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    mod = seed_summary_mask(offsets, S)
    P = sum(lengths) + S * len(lengths)
    q = torch.arange(P).view(-1, 1)
    kv = torch.arange(P).view(1, -1)
    zero = torch.zeros((), dtype=torch.int64)
    got = mod(zero, zero, q.expand(P, P), kv.expand(P, P))
    assert torch.equal(got, mask_definition(lengths, S))


def _model(S=3, d=8, layers=2):
    torch.manual_seed(0)
    cfg = SummariserConfig(d_model=d, num_seeds=S, num_layers=layers, num_heads=2,
                           max_history_len=16)  # fmt: skip
    return SeedSummariser(cfg).double().eval(), cfg


def test_summary_shape_and_history_causality():
    model, cfg = _model()
    lengths = [5, 1, 7]
    offsets = torch.tensor([0, 5, 6, 13])
    inputs = prepare_summary(cfg, offsets)
    history = torch.randn(13, cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        summary = model(history, inputs)
        states = model.encode(history, inputs)
        moved_history = history.clone()
        moved_history[3] += torch.randn(cfg.d_model, dtype=torch.float64)  # user 0, row 3
        # (a random direction: LayerNorm erases a constant shift)
        moved_summary = model(moved_history, inputs)
        moved_states = model.encode(moved_history, inputs)
    assert summary.shape == (len(lengths), cfg.num_seeds, cfg.d_model)
    rows = inputs.history_rows
    # user 0's history rows 0..2 and every other user's tokens are unchanged
    same = [int(r) for r in rows[:3]] + list(range(8 + 0, states.shape[0]))
    torch.testing.assert_close(moved_states[same], states[same], rtol=0, atol=0)
    assert (moved_states[rows[3:5]] - states[rows[3:5]]).abs().amax() > 1e-6
    # user 0's summary changes, the others' do not
    assert (moved_summary[0] - summary[0]).abs().amax() > 1e-6
    torch.testing.assert_close(moved_summary[1:], summary[1:], rtol=0, atol=0)


def test_seeds_see_the_last_event():
    model, cfg = _model()
    offsets = torch.tensor([0, 4])
    inputs = prepare_summary(cfg, offsets)
    history = torch.randn(4, cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        base = model(history, inputs)
        moved = history.clone()
        moved[3] += torch.randn(cfg.d_model, dtype=torch.float64)
        assert (model(moved, inputs) - base).abs().amax() > 1e-6


def test_gradients_reach_seeds_and_history():
    model, cfg = _model()
    offsets = torch.tensor([0, 2, 5])
    inputs = prepare_summary(cfg, offsets)
    history = torch.randn(5, cfg.d_model, dtype=torch.float64, requires_grad=True)
    model(history, inputs).square().sum().backward()
    assert model.seeds.grad is not None and model.seeds.grad.abs().amax() > 0
    assert history.grad is not None and history.grad.abs().amax(dim=1).min() > 0


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="vista.num_seeds"):
        SummariserConfig(num_seeds=0).validate()
    with pytest.raises(ValueError, match="vista.num_heads"):
        SummariserConfig(d_model=10, num_heads=3).validate()
    with pytest.raises(ValueError, match="vista.max_history_len"):
        prepare_summary(SummariserConfig(max_history_len=2), torch.tensor([0, 3]))
