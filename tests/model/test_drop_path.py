"""model.drop_path: one keep draw per sequence, expanded over its tokens; identity in eval and
at p = 0 (no draw); the expectation of a layer's output preserved."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, HSTUInputs, encode
from flexgr.model.drop_path import SequenceDropPath
from flexgr.model.hstu.inputs import prepare
from tests.conftest import make_offsets


def jagged(lengths: list[int], seed: int = 0, repeat: bool = False) -> JaggedBatch:
    """A batch of ``lengths``; with ``repeat`` every sequence holds the same items and times."""
    g = torch.Generator().manual_seed(seed)
    if repeat:
        ids = torch.randint(1, 31, (lengths[0],), generator=g).repeat(len(lengths))
        ts = torch.arange(lengths[0]).repeat(len(lengths)) * 100
    else:
        ids = torch.randint(1, 31, (sum(lengths),), generator=g)
        ts = torch.arange(sum(lengths)) * 100
    offsets = make_offsets(lengths)
    return JaggedBatch(ids, offsets, ts, ts[offsets[1:] - 1] + 50)


def hstu(**over) -> HSTU:
    torch.manual_seed(0)
    options = dict(num_items=30, d_model=12, num_layers=2, num_heads=2, dqk=4, dv=6)
    options |= dict(max_seq_len=20, backend="reference")
    return HSTU(HSTUConfig(**(options | over))).double()


def test_one_draw_per_sequence_expanded_over_its_tokens() -> None:
    lengths = [3, 0, 5, 1, 4]  # an empty sequence must not shift the others' draws
    offsets = make_offsets(lengths)
    drop = SequenceDropPath(0.4).train()
    torch.manual_seed(5)
    scale = drop.scale(offsets, sum(lengths))
    torch.manual_seed(5)
    keep = torch.rand(len(lengths)) >= 0.4
    expected = [(1 / 0.6 if keep[b] else 0.0) for b, n in enumerate(lengths) for _ in range(n)]
    assert scale.shape == (sum(lengths), 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale.squeeze(1), torch.tensor(expected), rtol=1e-7, atol=0)


def test_identity_in_eval_and_at_zero_without_a_draw() -> None:
    offsets = make_offsets([4, 2])
    for drop in (SequenceDropPath(0.5).eval(), SequenceDropPath(0.0).train()):
        before = torch.get_rng_state()
        assert drop.scale(offsets, 6) is None
        assert torch.equal(torch.get_rng_state(), before)


def test_bad_probabilities_are_refused() -> None:
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"model.drop_path must be in \[0, 1\)"):
            SequenceDropPath(p)


def test_default_layer_is_the_previous_formula_and_draws_as_before() -> None:
    """drop_path = 0: the layer computes x + out(dropout(u * LN(attn))) as before, with the
    same draws (dropout on), and leaves the generator where that formula leaves it."""
    model = hstu(dropout=0.3).train()
    layer, batch = model.layers[0], jagged([6, 3, 8])
    inputs = prepare(model, batch)
    x = torch.randn(17, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(9)
    got = layer(x, inputs)
    after_layer = torch.get_rng_state()
    torch.manual_seed(9)
    u, v, q, k = torch.split(layer.project(x), layer.splits, dim=-1)
    gated = u * layer.attn_norm(layer.attend(q, k, v, inputs))
    expected = x + layer.out(layer.dropout(gated))
    assert torch.equal(got, expected)
    assert torch.equal(torch.get_rng_state(), after_layer)


def test_eval_ignores_drop_path() -> None:
    batch = jagged([6, 3, 8])
    plain, dropped = hstu().eval(), hstu(drop_path=0.5).eval()
    dropped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(encode(plain, batch), encode(dropped, batch))


def test_each_sequence_gets_all_or_nothing_of_the_branch() -> None:
    p = 0.5
    model = hstu(dropout=0.0, input_dropout=0.0, drop_path=p)
    layer, batch = model.layers[0], jagged([5, 7, 2, 6, 4, 3], seed=2)
    inputs = prepare(model, batch)
    x = torch.randn(27, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        branch = layer.eval()(x, inputs) - x
        layer.train()
        torch.manual_seed(4)
        out = layer(x, inputs)
    kept = 0
    for b in range(6):
        rows = slice(int(batch.offsets[b]), int(batch.offsets[b + 1]))
        if torch.equal(out[rows], x[rows]):
            continue  # dropped: the residual alone
        torch.testing.assert_close(out[rows], x[rows] + branch[rows] / (1 - p))
        kept += 1
    assert 0 < kept < 6  # this seed keeps some sequences and drops others


def test_the_expected_output_is_the_eval_output() -> None:
    """Mean of the training output over 2,000 per-sequence draws (100 identical sequences, 20
    forwards) against the eval output, dropout off: the draw mean's spread is
    sqrt(p / (1 - p) / 2000) ~ .015 of the branch at p = .3; the tolerance is 5 of those (a
    missing 1 / (1 - p) would be off by .3)."""
    p, copies, forwards, length = 0.3, 100, 20, 3
    model = hstu(dropout=0.0, input_dropout=0.0, drop_path=p)
    layer, batch = model.layers[0], jagged([length] * copies, seed=5, repeat=True)
    inputs = prepare(model, batch)
    x = torch.randn(length, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = x.repeat(copies, 1)
    with torch.no_grad():
        expected = layer.eval()(x, inputs)
        layer.train()
        torch.manual_seed(7)
        total = torch.zeros_like(x)
        for _ in range(forwards):
            total += layer(x, inputs)
    mean = total.view(copies, length, 12).sum(0) / forwards / copies
    branch = (expected - x)[:length]
    tolerance = 5 * (p / (1 - p) / (copies * forwards)) ** 0.5
    torch.testing.assert_close(
        mean, expected[:length], rtol=0, atol=tolerance * branch.abs().max()
    )
    assert (mean - expected[:length]).abs().max() > 0  # it did draw


def test_same_seed_same_draws() -> None:
    model, batch = hstu(drop_path=0.5, dropout=0.0, input_dropout=0.0).train(), jagged([4] * 12)
    outs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(encode(model, batch))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize(
    "over", [dict(truncate_after=1, truncate_len=3), dict(mot_streams=2, num_layers=1)]
)
def test_truncated_and_mixture_layers_draw_for_their_own_sequences(over: dict) -> None:
    model = hstu(drop_path=0.5, dropout=0.0, input_dropout=0.0, **over).train()
    plain = hstu(dropout=0.0, input_dropout=0.0, **over).train()
    batch = jagged([7, 5, 9, 6, 8])
    with torch.no_grad():
        torch.manual_seed(0)
        out = encode(model, batch)
        assert torch.isfinite(out).all()
        assert not torch.equal(out, encode(plain, batch))  # some branch was dropped


def test_inputs_without_sequence_offsets_are_refused_in_training_only() -> None:
    model = hstu(drop_path=0.5)
    layer, batch = model.layers[0], jagged([4, 4])
    inputs = dataclasses.replace(prepare(model, batch), offsets=None)  # as under CP
    x = torch.randn(8, 12, dtype=torch.float64)
    layer.eval()(x, inputs)
    with pytest.raises(ValueError, match="model.drop_path needs each sequence's token range"):
        layer.train()(x, inputs)
    assert isinstance(inputs, HSTUInputs)
