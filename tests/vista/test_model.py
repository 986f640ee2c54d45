"""vista-ranking: stage 2's mask against its definition, candidates independent of each other,
stage 2 reading only the summary, the reconstruction loss as the auxiliary loss."""

from __future__ import annotations

import pytest
import torch

from flexgr.masks.dense import dense_hstu_mask
from flexgr.model.registry import build_model, get_spec, spec_of
from flexgr.ranking.batch import RankingBatch
from flexgr.vista.model import VistaRanker, prepare
from flexgr.vista.target import prepare_targets

NUM_ITEMS = 30


def stage2_definition(S: int, M: int) -> torch.Tensor:
    """[S + M, S + M] from the rule: rows 0..S-1 summaries, then M candidates."""
    n = S + M
    want = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i < S:
                want[i, j] = j < S  # a summary sees every summary, no candidate
            else:
                want[i, j] = j < S or j == i  # a candidate: the summaries and itself
    return want


@pytest.mark.parametrize("S,M", [(1, 1), (3, 0), (3, 4), (5, 2)])
def test_stage2_rule_matches_definition(S, M):
    """The built-in rule with contextual_len = S and num_targets = M is the VISTA rule."""
    got = dense_hstu_mask(torch.tensor([S + M]), S + M, num_targets=torch.tensor([M]),
                          contextual_len=S)[0]  # fmt: skip
    assert torch.equal(got, stage2_definition(S, M))


def test_stage2_packing():
    inputs = prepare_targets(2, torch.tensor([0, 3, 3, 4]), 4, backend="reference")
    assert inputs.offsets.tolist() == [0, 5, 7, 10]
    assert inputs.summary_rows.tolist() == [0, 1, 5, 6, 7, 8]
    assert inputs.candidate_rows.tolist() == [2, 3, 4, 9]
    assert inputs.num_tokens == 10


def _batch(hist_lengths, cand_lengths, seed=0) -> RankingBatch:
    g = torch.Generator().manual_seed(seed)
    H, C = sum(hist_lengths), sum(cand_lengths)

    def offsets(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])

    return RankingBatch(
        history_items=torch.randint(1, NUM_ITEMS + 1, (H,), generator=g),
        history_actions=torch.randint(0, 11, (H, 1), generator=g),
        history_timestamps=torch.arange(H),
        history_offsets=offsets(hist_lengths),
        candidates=torch.randint(1, NUM_ITEMS + 1, (C,), generator=g),
        candidate_offsets=offsets(cand_lengths),
        query_time=torch.full((len(hist_lengths),), 10_000),
    )


def _model(**options) -> VistaRanker:
    torch.manual_seed(0)
    base = {
        "num_items": NUM_ITEMS, "max_seq_len": 12, "d_model": 8, "num_heads": 2, "num_seeds": 3,
        "summary_layers": 2, "target_layers": 2, "dropout": 0.0, "head_hidden": 8,
        "tasks": ["like", "rating"], "task_kinds": ["bce", "mse"],
    }  # fmt: skip
    model = build_model("vista-ranking", {**base, **options})
    assert isinstance(model, VistaRanker) and spec_of(model).name == "vista-ranking"
    return model.double()


@pytest.mark.parametrize("attention", ["silu", "qla"])
def test_candidates_never_see_each_other(attention):
    model = _model(summary_attention=attention).eval()
    batch = _batch([5, 0, 7], [3, 2, 1])
    with torch.no_grad():
        both = model(batch, prepare(model, batch))
        # Candidate 1 of sequence 0 alone, with its own history.
        alone = RankingBatch(
            batch.history_items[:5], batch.history_actions[:5], batch.history_timestamps[:5],
            torch.tensor([0, 5]), batch.candidates[1:2], torch.tensor([0, 1]),
            batch.query_time[:1],
        )  # fmt: skip
        one = model(alone, prepare(model, alone))
        moved = RankingBatch(**{**batch.__dict__, "candidates": batch.candidates.clone()})
        moved.candidates[0] = moved.candidates[0] % NUM_ITEMS + 1
        after = model(moved, prepare(model, moved))
    assert both.shape == (6, 2)
    torch.testing.assert_close(one[0], both[1], rtol=1e-12, atol=1e-12)
    changed = (after - both).abs().amax(1) > 0
    assert changed.tolist() == [True, False, False, False, False, False]


def test_stage2_reads_only_the_summary():
    """forward = score(summarise(...)); a history change reaches the scores only through it."""
    model = _model().eval()
    batch = _batch([4, 6], [2, 3], seed=1)
    inputs = prepare(model, batch)
    with torch.no_grad():
        summary = model.summarise(batch, inputs.summary)
        assert summary.shape == (2, 3, 8)
        again = model.score(summary, batch.candidates, inputs.target)
        torch.testing.assert_close(again, model(batch, inputs), rtol=0, atol=0)
        moved = RankingBatch(**{**batch.__dict__, "history_items": batch.history_items.clone()})
        moved.history_items[5] = moved.history_items[5] % NUM_ITEMS + 1  # user 1's history
        after = model(moved, prepare(model, moved))
    assert (after[2:] - again[2:]).abs().amax() > 1e-9
    torch.testing.assert_close(after[:2], again[:2], rtol=0, atol=0)


def test_reconstruction_is_the_aux_loss_in_training_only():
    model = _model(reconstruction_weight=0.5)
    batch = _batch([4, 1, 6], [2, 1, 3], seed=2)
    model.train()
    model(batch, prepare(model, batch))
    aux = model.aux_loss
    assert aux is not None and aux.dim() == 0 and aux.item() > 0
    want = model.decoder(
        model.summarise(batch, prepare(model, batch).summary),
        model.history_tokens(batch),
        prepare(model, batch).summary,
    )
    torch.testing.assert_close(aux, want, rtol=1e-12, atol=0)
    aux.backward()
    assert model.summariser.seeds.grad is not None and model.summariser.seeds.grad.abs().max() > 0
    model.eval()
    model(batch, prepare(model, batch))
    assert model.aux_loss is None
    off = _model(reconstruction_weight=0.0).train()
    off(batch, prepare(off, batch))
    assert off.decoder is None and off.aux_loss is None


@pytest.mark.parametrize("attention", ["silu", "qla"])
def test_gradients_reach_every_parameter(attention):
    model = _model(summary_attention=attention, reconstruction_weight=0.1).train()
    batch = _batch([4, 3], [2, 2], seed=3)
    logits = model(batch, prepare(model, batch))
    assert model.aux_loss is not None
    (logits.square().sum() + model.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == [], missing
    assert torch.isfinite(logits).all()


def test_option_errors_name_the_key():
    spec = get_spec("vista-ranking")
    assert spec.validate is not None
    options = {f: spec.config_cls.__dataclass_fields__[f].default for f in spec.fields()}
    for key, value, match in [
        ("num_seeds", 0, "model.num_seeds"),
        ("num_heads", 3, "divisible by model.num_heads"),
        ("reconstruction_weight", -1.0, "model.reconstruction_weight"),
        ("summary_attention", "softmax", "model.summary_attention"),
    ]:
        with pytest.raises(ValueError, match=match):
            spec.validate({**options, key: value})
