"""The reconstruction loss against its definition, and the decoder's causality."""

from __future__ import annotations

import pytest
import torch

from flexgr.vista.reconstruction import ReconstructionConfig, ReconstructionDecoder
from flexgr.vista.summariser import SeedSummariser, SummariserConfig, prepare_summary

CFG = SummariserConfig(d_model=8, num_seeds=2, num_layers=1, num_heads=2, max_history_len=16)


def _setup(lengths, weight=0.5):
    torch.manual_seed(1)
    summariser = SeedSummariser(CFG).double().eval()
    decoder = ReconstructionDecoder(CFG, ReconstructionConfig(weight=weight)).double().eval()
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    history = torch.randn(int(offsets[-1]), CFG.d_model, dtype=torch.float64)
    return summariser, decoder, offsets, history


def test_loss_matches_definition():
    lengths = [4, 1, 6, 0, 2]
    summariser, decoder, offsets, history = _setup(lengths)
    inputs = prepare_summary(CFG, offsets)
    summary = summariser(history, inputs)
    got = decoder(summary, history, inputs)
    # Definition: user by user, alone in its batch, the squared error of v_i against u_{i+1}.
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        u = history[int(offsets[b]) : int(offsets[b + 1])]
        alone = prepare_summary(CFG, torch.tensor([0, n]))
        v = decoder.decode(summary[b : b + 1], u, alone)
        for i in range(n - 1):
            total = total + (v[i] - u[i + 1]).square().sum()
            count += 1
    torch.testing.assert_close(got, 0.5 * total / count, rtol=1e-12, atol=1e-12)
    assert got > 1e-3


def test_decoder_is_causal_and_reads_the_summary():
    summariser, decoder, offsets, history = _setup([6])
    inputs = prepare_summary(CFG, offsets)
    summary = summariser(history, inputs).detach()
    with torch.no_grad():
        base = decoder.decode(summary, history, inputs)
        moved = history.clone()
        moved[3] += torch.randn(CFG.d_model, dtype=torch.float64)
        after = decoder.decode(summary, moved, inputs)
        torch.testing.assert_close(after[:3], base[:3], rtol=0, atol=0)
        assert (after[3:] - base[3:]).abs().amax() > 1e-6
        other = decoder.decode(summary + torch.randn_like(summary), history, inputs)
        assert (other - base).abs().amax(dim=1).min() > 1e-6  # every row reads the summary


def test_gradient_reaches_the_seeds_and_the_target_is_detached():
    summariser, decoder, offsets, history = _setup([3, 5])
    inputs = prepare_summary(CFG, offsets)
    grads = []
    for detach in (True, False):
        decoder.cfg.detach_target = detach
        u = history.clone().requires_grad_()
        summariser.zero_grad()
        decoder(summariser(u, inputs), u, inputs).backward()
        assert summariser.seeds.grad is not None and summariser.seeds.grad.abs().amax() > 0
        grads.append(u.grad)
    # by hand: the targets are a detached copy, so only the inputs carry gradient
    u = history.clone().requires_grad_()
    v = decoder.decode(summariser(u, inputs), u, inputs)
    rows = torch.tensor([0, 1, 3, 4, 5, 6])  # rows with a next event in [3, 5]
    (0.5 * (v[rows] - history[rows + 1]).square().sum() / 6).backward()
    torch.testing.assert_close(grads[0], u.grad, rtol=1e-10, atol=1e-12)
    assert (grads[1] - grads[0]).abs().amax() > 1e-6


def test_no_pairs_gives_zero_with_graph():
    summariser, decoder, offsets, history = _setup([1, 1])
    inputs = prepare_summary(CFG, offsets)
    loss = decoder(summariser(history, inputs), history, inputs)
    assert loss.item() == 0.0 and loss.requires_grad


def test_config_errors():
    with pytest.raises(ValueError, match="vista.reconstruction.weight"):
        ReconstructionConfig(weight=-1.0).validate()
