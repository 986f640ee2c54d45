"""model.compile_scorer: GESR's scoring forward under torch.compile is one graph for every batch
shape (no recompiles), gives the eager logits, and is what scoring (no gradient) runs."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from flexgr.gesr import model as gesr_model
from flexgr.gesr.model import GESRRanker, compiled_scorer, scoring_forward
from flexgr.model.registry import build_model, spec_of
from flexgr.ranking.batch import RankingBatch

NUM_ITEMS, MAX_EVENTS = 30, 12
OPTIONS = {
    "num_items": NUM_ITEMS,
    "max_seq_len": MAX_EVENTS,
    "d_model": 8,
    "hidden": 16,
    "cross_head_dim": 4,
    "mlpg_hidden": 8,
    "action_inputs": ["rating"],
    "action_vocab": [11],
    "tasks": ["like", "rating"],
    "task_kinds": ["bce", "mse"],
}


def _model(**over) -> GESRRanker:
    torch.manual_seed(0)
    return build_model("gesr-ranking", {**OPTIONS, **over}).eval()  # type: ignore[return-value]


def _batch(history: list[int], candidates: list[int], seed: int) -> RankingBatch:
    """Requests of the given history and candidate counts, items drawn from a few (repeats)."""
    g = torch.Generator().manual_seed(seed)
    H, C = sum(history), sum(candidates)
    timestamps = 1_000_000 + torch.randint(0, 500, (H,), generator=g).cumsum(0)
    return RankingBatch(
        history_items=torch.randint(1, 9, (H,), generator=g),
        history_actions=torch.randint(1, 11, (H, 1), generator=g),
        history_timestamps=timestamps,
        history_offsets=torch.tensor([0, *history]).cumsum(0),
        candidates=torch.randint(1, 9, (C,), generator=g),
        candidate_offsets=torch.tensor([0, *candidates]).cumsum(0),
        query_time=torch.full((len(history),), int(timestamps[-1]) + 60),
    )


# Batch shapes whose tile sizes differ (1, 2, 8, 32, 32): the tile size is a dimension, not a
# guard. Dynamo specialises a dimension of size 1 (tile size 1, first) and then the rest.
SHAPES = [
    ([2, 12, 12], [1, 1, 1]),
    ([12, 3, 7], [2, 5, 1]),
    ([12, 12, 0, 5], [9, 8, 0, 20]),
    ([4, 12], [40, 33]),
    ([12, 12, 1, 6, 9], [64, 80, 71, 90, 77]),
]


@pytest.mark.parametrize(
    "over",
    [
        {"experts": ["match", "cross"]},
        {"experts": ["match", "cross"], "cross_impl": "pairs", "match_half_life": 300.0},
        {"experts": []},
    ],
)
def test_the_compiled_forward_is_one_graph_for_every_batch_shape(over: dict) -> None:
    model = _model(**over)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(scoring_forward, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    with torch.no_grad():
        for seed, (history, candidates) in enumerate(SHAPES):
            batch = _batch(history, candidates, seed)
            inputs = spec_of(model).prepare(model, batch)
            assert torch.equal(compiled(model, batch, inputs), model.eager_forward(batch, inputs))
            frames.append(counter.frame_count)
    # One graph for tile size 1, one for every other shape: no recompile after the second.
    assert frames[1] == frames[-1] <= 2, frames


def test_compile_scorer_routes_scoring_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(*args):
        calls.append(args)
        return scoring_forward(*args)

    monkeypatch.setattr(gesr_model, "compiled_scorer", lambda: spy)
    batch = _batch(*SHAPES[0], seed=0)
    for flag in (False, True):
        model = _model(experts=["cross"], compile_scorer=flag)
        inputs = spec_of(model).prepare(model, batch)
        with torch.no_grad():
            model(batch, inputs)
        model.train()(batch, inputs)  # training keeps the eager forward
    assert len(calls) == 1


@pytest.mark.slow
def test_inductor_logits_equal_eager_without_recompiles() -> None:
    """The real compiler (inductor, C++ on CPU, ~40 s): fused kernels round differently, so the
    logits agree to fp32 rounding, not to the bit."""
    from torch._dynamo.utils import counters

    model = _model(experts=["match", "cross"], compile_scorer=True)
    torch._dynamo.reset()
    compiled_scorer.cache_clear()
    graphs_before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for seed, shape in enumerate(SHAPES[:3]):
            batch = _batch(*shape, seed)
            inputs = spec_of(model).prepare(model, batch)
            got, want = model(batch, inputs), model.eager_forward(batch, inputs)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Tile sizes 1, 2 and 8: one graph for size 1, one for the others.
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2
