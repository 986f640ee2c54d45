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


def _random_qkv(T, H=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, H, d, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("lengths,S", [([1], 1), ([3, 1, 5], 2), ([4, 0, 2], 3)])
def test_padded_attention_matches_the_mask_mod_oracle(lengths, S):
    """The CPU path (dense per user) against the [P, P] oracle of seed_summary_mask."""
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    P = sum(lengths) + S * len(lengths)
    q, k, v = _random_qkv(P, seed=S)
    got, want = (
        prepare_summary(
            SummariserConfig(d_model=8, num_seeds=S, max_history_len=8, backend=backend), offsets
        ).layers.attention(q, k, v, max_seq_len=9, alpha=0.7, bias=None)
        for backend in ("padded", "reference")
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.abs().max() > 1e-3


@pytest.mark.parametrize("lengths,S", [([1], 1), ([3, 1, 5], 2), ([4, 0, 2], 3)])
def test_qla_attention_is_qla_over_history_then_seeds(lengths, S):
    """attention="qla": user by user, qla over [history; seeds] with the seeds as candidates."""
    from flexgr.vista.qla import qla

    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    P = sum(lengths) + S * len(lengths)
    q, k, v = _random_qkv(P, seed=10 + S)
    cfg = SummariserConfig(d_model=8, num_seeds=S, max_history_len=8, attention="qla")
    got = prepare_summary(cfg, offsets).layers.attention(q, k, v, max_seq_len=9, alpha=0.5,
                                                          bias=None)  # fmt: skip
    start = 0
    for n in lengths:
        seeds, hist = slice(start, start + S), slice(start + S, start + S + n)
        oq, ok, ov = (torch.cat([x[hist], x[seeds]]) for x in (q, k, v))
        want = qla(
            oq * 0.5, ok, ov, torch.tensor([0, n + S]), divisor=9.0,
            num_targets=torch.tensor([S]), feature_map="identity",
        )  # fmt: skip
        torch.testing.assert_close(got[hist], want[:n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[seeds], want[n:], rtol=1e-12, atol=1e-12)
        start += n + S


def test_qla_summariser_seeds_see_history_not_each_other():
    torch.manual_seed(0)
    cfg = SummariserConfig(d_model=8, num_seeds=3, num_layers=2, num_heads=2, max_history_len=16,
                           attention="qla")  # fmt: skip
    model = SeedSummariser(cfg).double().eval()
    offsets = torch.tensor([0, 5, 9])
    inputs = prepare_summary(cfg, offsets)
    history = torch.randn(9, cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        base, states = model(history, inputs), model.encode(history, inputs)
        model.seeds[1] += torch.randn(cfg.d_model, dtype=torch.float64)
        moved, moved_states = model(history, inputs), model.encode(history, inputs)
    # only seed 1 of each user changes; no history row reads a seed
    changed = (moved - base).abs().amax(-1) > 1e-9
    assert changed.tolist() == [[False, True, False]] * 2
    rows = inputs.history_rows
    torch.testing.assert_close(moved_states[rows], states[rows], rtol=0, atol=0)


def test_qla_summariser_history_causal_and_seeds_see_the_last_event():
    torch.manual_seed(0)
    cfg = SummariserConfig(d_model=8, num_seeds=2, num_layers=2, max_history_len=16,
                           attention="qla", qla_state="identity")  # fmt: skip
    model = SeedSummariser(cfg).double().eval()
    offsets = torch.tensor([0, 6])
    inputs = prepare_summary(cfg, offsets)
    history = torch.randn(6, cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        base, states = model(history, inputs), model.encode(history, inputs)
        moved = history.clone()
        moved[5] += torch.randn(cfg.d_model, dtype=torch.float64)
        after, after_states = model(moved, inputs), model.encode(moved, inputs)
    rows = inputs.history_rows
    torch.testing.assert_close(after_states[rows[:5]], states[rows[:5]], rtol=0, atol=0)
    assert (after - base).abs().amax() > 1e-6


@pytest.mark.parametrize(
    "lengths,S", [([200, 1, 0, 90], 4), ([5], 2), ([130, 126, 3], 8), ([400, 3], 4)]
)
def test_flex_block_mask_equals_create_block_mask(lengths, S, monkeypatch):
    """The flex backend's block mask is built from the block pairs that share a segment (no
    compile, no P^2 pass); block for block it is create_block_mask's over the padded length,
    padding blocks included."""
    from torch.nn.attention.flex_attention import create_block_mask

    from flexgr.masks import block
    from flexgr.vista.mask import packed_offsets
    from flexgr.vista.summariser import _silu_attention
    from tests.masks.test_sparse import block_states

    def no_dense_pass(*args, **kwargs):
        raise AssertionError("the seed mask went through create_block_mask's P^2 pass")

    monkeypatch.setattr(block, "block_mask_from_mod", no_dense_pass)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    cfg = SummariserConfig(num_seeds=S, max_history_len=max(lengths) + 100, backend="flex")
    mask = _silu_attention(cfg, offsets, packed_offsets(offsets, S)).mask
    P = mask.padded_len
    assert P > mask.total_len  # padding blocks are exercised
    want = create_block_mask(mask.mask_mod, 1, None, P, P, device="cpu", BLOCK_SIZE=128)
    got_kv, got_q = block_states(mask.block_mask)
    want_kv, want_q = block_states(want)
    assert torch.equal(got_kv, want_kv) and torch.equal(got_q, want_q)
    assert (got_kv == 1).any()
    if max(lengths) >= 300:  # history blocks below the diagonal are full
        assert (got_kv == 2).any()
