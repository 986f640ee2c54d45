"""gesr-ranking: shapes, candidates never see each other, gradients reach every expert, and
with every lambda at 0 it is exactly the two-tower ranker it holds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from flexgr.gesr.model import GESRRanker
from flexgr.model.registry import build_model, get_spec, spec_of
from flexgr.ranking import RankingConfig, build_requests, impression_batch, request_batch
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.requests import impressions_of
from flexgr.ranking.tasks import task_losses
from tests.ranking.helpers import NUM_ITEMS, events_of, model_options, synthetic_data

CFG = RankingConfig(
    tasks=["like", "rating", "action:click:1"], action_inputs=["rating", "click"], request_size=5
)
KINDS = ["bce", "mse", "bce"]
SMALL = {"d_model": 8, "hidden": 16, "cross_head_dim": 4, "self_head_dim": 4, "mlpg_hidden": 8}
EXPERT_SETS = [
    {"experts": ["match", "cross", "self"]},
    {"experts": ["match"]},
    {"experts": ["cross"]},
    {"experts": ["cross"], "cross_impl": "pairs", "cross_activation": "silu"},
    {"experts": ["self"]},
    {"experts": ["cross", "self"], "match_buckets": 0},
    {"experts": []},  # MLPG over the towers' outputs alone
]


def _model(data, seed: int = 0, **extra) -> GESRRanker:
    torch.manual_seed(seed)
    options = {**model_options(data, CFG, 9), **SMALL, **extra}
    return build_model("gesr-ranking", options).double().eval()  # type: ignore[return-value]


def _logits(model, batch: RankingBatch) -> torch.Tensor:
    return model(batch, spec_of(model).prepare(model, batch))


def _batch(users: int = 10, seed: int = 3):
    data = synthetic_data(users=users, seed=seed)
    requests = build_requests(data, CFG, max_seq_len=9)
    return data, requests, request_batch(events_of(data, CFG), requests, np.arange(len(requests)))


@pytest.mark.parametrize("extra", EXPERT_SETS)
def test_logits_have_one_column_per_task_and_are_finite(extra: dict) -> None:
    data, _, batch = _batch()
    out = _logits(_model(data, **extra), batch)
    assert out.shape == (batch.num_candidates, 3) and out.dtype == torch.float64
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("extra", EXPERT_SETS)
def test_changing_one_candidate_leaves_the_others_unchanged(extra: dict) -> None:
    data, requests, batch = _batch()
    model = _model(data, **extra)
    before = _logits(model, batch)
    # Candidate 1 of request 0 becomes an item of that request's history (a match for it).
    first = int(batch.candidate_offsets[0])
    assert int(batch.candidate_offsets[1]) - first >= 2
    changed = batch.candidates.clone()
    changed[first + 1] = (
        batch.history_items[0] if changed[first + 1] != batch.history_items[0] else 1
    )
    after = _logits(model, dataclasses.replace(batch, candidates=changed))
    others = torch.ones(batch.num_candidates, dtype=torch.bool)
    others[first + 1] = False
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=0)
    assert not torch.allclose(after[first + 1], before[first + 1])
    # ... and every candidate scores as in its own one-candidate sequence (impression layout).
    request_row, impression = impressions_of(requests)
    alone = _logits(
        model, impression_batch(events_of(data, CFG), requests, request_row, impression)
    )
    torch.testing.assert_close(alone, before, rtol=1e-10, atol=1e-10)


def test_match_features_count_the_candidate_in_its_own_history() -> None:
    data, _, batch = _batch()
    model = _model(data, experts=["match"], match_buckets=4)
    inputs = spec_of(model).prepare(model, batch)
    assert inputs.match is not None and inputs.match.shape == (batch.num_candidates, 1)
    h, c = batch.history_offsets.tolist(), batch.candidate_offsets.tolist()
    want = []
    for b in range(batch.num_sequences):
        history = batch.history_items[h[b] : h[b + 1]].tolist()
        for item in batch.candidates[c[b] : c[b + 1]].tolist():
            want.append(min(int(np.log2(1 + history.count(item))), 3))
    assert inputs.match[:, 0].tolist() == want
    assert max(want) >= 1  # the synthetic histories repeat items: some candidates match


def test_gradients_reach_every_expert_and_the_towers() -> None:
    data, _, batch = _batch()
    model = _model(data).train()
    model.fuse[1].p = 0.0  # keep the check deterministic; the rest of dropout is 0.2
    assert batch.labels is not None and batch.known is not None
    loss = task_losses(_logits(model, batch), batch.labels.double(), batch.known, KINDS)
    loss.sum().backward()
    parts = {
        "towers": model.towers,
        "match": model.match,
        "cross": model.cross,
        "self": model.encoder,
        "mlpg": model.mlpg,
    }
    for name, module in parts.items():
        assert module is not None
        for pname, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"
        assert any(p.grad.abs().sum() > 0 for p in module.parameters()), name  # type: ignore[union-attr]
    for pname in ("q.weight", "kv.weight", "out.weight"):
        assert model.cross.get_parameter(pname).grad.abs().sum() > 0, pname  # type: ignore[union-attr]
    assert model.encoder.layers[0].uvqk.grad.abs().sum() > 0  # type: ignore[union-attr]
    assert model.placeholder is not None and model.placeholder.grad.abs().sum() > 0
    assert model.mlpg.lam.grad.abs().min() > 0  # type: ignore[union-attr]


def test_lambda_zero_is_exactly_the_two_tower_ranker() -> None:
    data, _, batch = _batch()
    model = _model(data, mlpg_lambda_init=0.0, mlpg_learn_lambda=False)
    two_tower = build_model("two-tower-ranking", model.towers.cfg.__dict__).double().eval()
    two_tower.load_state_dict(model.towers.state_dict())
    want = two_tower(batch, get_spec("two-tower-ranking").prepare(two_tower, batch))
    torch.testing.assert_close(_logits(model, batch), want, rtol=0, atol=0)
    # A learned lambda that starts at 0 gives the same logits and still gets a gradient.
    learned = _model(data, mlpg_lambda_init=0.0)
    learned.towers.load_state_dict(model.towers.state_dict())
    out = _logits(learned, batch)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out[:, 0].sum().backward()
    assert learned.mlpg.lam.grad.abs().min() > 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"experts": ["cross", "cross"]}, "model.experts"),
        ({"match_buckets": -1}, "match_buckets"),
        ({"match_half_life": 0.0}, "match_half_life"),
        ({"cross_heads": 0}, "cross_heads"),
        ({"mlpg_logits": 0}, "mlpg_logits"),
        ({"compile_scorer": "yes"}, "compile_scorer must be true or false"),
    ],
)
def test_validate_names_the_bad_key(extra: dict, message: str) -> None:
    data = synthetic_data(users=2)
    spec = get_spec("gesr-ranking")
    defaults = {name: getattr(spec.config_cls(num_items=NUM_ITEMS), name) for name in spec.fields()}
    with pytest.raises(ValueError, match=message):
        assert spec.validate is not None
        spec.validate({**defaults, **model_options(data, CFG, 9), **extra})


@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_padded_and_pair_cross_attention_give_the_same_logits(activation: str) -> None:
    data, _, batch = _batch()
    logits = [
        _logits(
            _model(data, experts=["cross"], cross_impl=impl, cross_activation=activation), batch
        )
        for impl in ("padded", "pairs")
    ]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-10, atol=1e-12)
