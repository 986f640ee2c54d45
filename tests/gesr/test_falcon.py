"""gesr-ranking's cached serving path (flexgr.gesr.falcon) equals the whole model run on
history + candidates, for every microbatch size, history length and expert set, with the
history cached across Ranker.score calls and the item side cached per set of weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgr.gesr.falcon import (
    GESRHistoryCache,
    candidate_logits,
    encode_ranking_history,
    forget_item_side,
    history_content,
    item_side,
)
from flexgr.gesr.model import GESRRanker
from flexgr.model.registry import build_model, spec_of
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.scorer import Ranker
from tests.ranking.score_requests import predictions, ranker_over, request_body

NUM_ITEMS, MAX_EVENTS, TOL = 12, 9, 1e-5
HISTORY_LENGTHS = (1, 4, MAX_EVENTS)
MICROBATCHES = (1, 2, 4, 7, 50)  # one, a divisor of 8 candidates, a non-divisor, > M
CONFIGS = [
    # log1p counts: recency-weighted counts below 1 would all fall in bucket 0
    {"experts": ["match", "cross", "self"], "match_half_life": 500.0, "match_buckets": 0},
    {"experts": ["self"], "self_layers": 2, "self_heads": 2},
    {"experts": ["self"], "self_rel_bias": False},
    {"experts": ["match", "cross"], "cross_activation": "silu"},
    {"experts": ["cross"], "cross_impl": "pairs"},
    {"experts": []},
]


def _model(**over) -> GESRRanker:
    torch.manual_seed(0)
    options = {
        "num_items": NUM_ITEMS,
        "max_seq_len": MAX_EVENTS,
        "d_model": 16,
        "hidden": 16,
        "dropout": 0.0,
        "cross_head_dim": 4,
        "self_head_dim": 4,
        "mlpg_hidden": 8,
        "action_inputs": ["rating", "click"],
        "action_vocab": [11, 4],
        "tasks": ["like", "rating"],
        "task_kinds": ["bce", "mse"],
        **over,
    }
    model: GESRRanker = build_model("gesr-ranking", options).eval()  # type: ignore[assignment]
    with torch.no_grad():  # large embeddings and biases, so a wrong token, position or time
        model.towers.item_emb.weight.normal_(0, 1.0)  # would show in the scores
        for table in model.towers.actions.tables:
            table.normal_(0, 1.0)
        if model.placeholder is not None:
            model.placeholder.normal_(0, 1.0)
        if model.encoder is not None:
            for layer in model.encoder.layers:
                if layer.rab is not None:
                    layer.rab.pos_w.normal_(0, 1.0)
                    layer.rab.ts_w.normal_(0, 1.0)
        if model.match is not None:
            model.match.table.normal_(0, 1.0)
    return model


def _history(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, NUM_ITEMS + 1, (n,), generator=g)  # few items: repeats
    actions = torch.stack(
        [torch.randint(0, 11, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)], 1
    )
    gaps = torch.tensor([0, 7, 300, 90_000])[torch.randint(0, 4, (n,), generator=g)]
    timestamps = 1_000_000 + torch.cumsum(gaps, 0)
    return items, actions, timestamps, int(timestamps[-1]) + 400


def _candidates(items: torch.Tensor, seed: int) -> torch.Tensor:
    """8 candidates: two from the history (so the match counts are not all 0), the rest
    random, with a repeat."""
    g = torch.Generator().manual_seed(seed)
    rest = torch.randint(1, NUM_ITEMS + 1, (5,), generator=g)
    return torch.cat([items[-1:], items[:1], rest, rest[:1]])


@torch.no_grad()
def _whole(model, items, actions, timestamps, query_time: int, candidates) -> torch.Tensor:
    """The definition: the normal forward, every candidate a target of the one history."""
    batch = RankingBatch(
        items,
        actions,
        timestamps,
        torch.tensor([0, len(items)]),
        candidates,
        torch.tensor([0, len(candidates)]),
        torch.tensor([query_time]),
    )
    return model(batch, spec_of(model).prepare(model, batch))


@pytest.mark.parametrize("over", CONFIGS)
def test_cached_microbatches_equal_the_whole_model(over: dict) -> None:
    model = _model(**over)
    for seed, n in enumerate(HISTORY_LENGTHS):
        history = _history(n, seed)
        candidates = _candidates(history[0], 100 + seed)
        want = _whole(model, *history, candidates)
        cache = encode_ranking_history(model, *history)
        assert cache.length == n
        assert len(cache.keys) == (model.cfg.self_layers if model.encoder is not None else 0)
        for microbatch in MICROBATCHES:
            for use_item_side in (True, False):
                got = candidate_logits(
                    model, cache, candidates, microbatch=microbatch, use_item_side=use_item_side
                )
                torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_a_wrong_cache_gives_other_scores() -> None:
    """The equality above can fail: the history's order, actions and timestamps, the query time
    and each cached part reach the scores (a cache that kept the wrong one would show)."""
    model = _model(**CONFIGS[0])
    items, actions, timestamps, query_time = _history(MAX_EVENTS, 7)
    candidates = _candidates(items, 8)
    want = _whole(model, items, actions, timestamps, query_time, candidates)
    right = encode_ranking_history(model, items, actions, timestamps, query_time)
    other_items, other_actions, other_timestamps, _ = _history(MAX_EVENTS, 99)
    other = encode_ranking_history(model, other_items, other_actions, other_timestamps, query_time)
    wrong = [
        encode_ranking_history(model, items, actions, timestamps, query_time + 10**6),
        encode_ranking_history(model, items, (actions + 1) % 4, timestamps, query_time),
        encode_ranking_history(model, items, actions, timestamps * 0 + timestamps[0], query_time),
        encode_ranking_history(model, items.flip(0), actions.flip(0), timestamps, query_time),
        # each part of the right cache swapped for another history's
        dataclasses.replace(right, keys=other.keys, values=other.values),
        dataclasses.replace(right, user=other.user),
        dataclasses.replace(right, cross_keys=other.cross_keys, cross_values=other.cross_values),
        dataclasses.replace(right, items=other.items),
    ]
    for cache in wrong:
        got = candidate_logits(model, cache, candidates, microbatch=3)
        # 10x the tolerance: the equality test would have caught each of these.
        assert (got - want).abs().max() > 10 * TOL


def _ranker(**over) -> Ranker:
    return ranker_over(_model(**over), "gesr-ranking", NUM_ITEMS)


def _request(n: int, seed: int) -> dict:
    return request_body(*_history(n, seed))


def test_ranker_score_keeps_histories_across_calls() -> None:
    ranker = _ranker(experts=["match", "cross", "self"])
    assert ranker.falcon_unsupported is None
    store = ranker.history_cache
    for seed, n in enumerate(HISTORY_LENGTHS):
        request = _request(n, seed)
        candidates = [f"i{int(c)}" for c in _candidates(torch.tensor([1, 2]), 50 + seed)]
        uncached = predictions(ranker.score(candidates=candidates, falcon=False, **request))
        hits = store.stats.hits
        for microbatch in MICROBATCHES:  # the first call encodes, the others hit the cache
            got = ranker.score(
                candidates=candidates, microbatch=microbatch, cache_key=("u", seed), **request
            )
            assert [raw for raw, _ in got] == candidates
            torch.testing.assert_close(predictions(got), uncached, rtol=TOL, atol=TOL)
        assert store.stats.hits == hits + len(MICROBATCHES) - 1
    assert store.stats.misses == len(HISTORY_LENGTHS) and store.stats.stale == 0


@pytest.mark.parametrize(
    "change",
    [
        lambda r: {**r, "history": r["history"][:-1] + ["i12" if r["history"][-1] != "i12" else "i1"]},
        lambda r: {**r, "actions": {**r["actions"], "click": [(c + 1) % 4 for c in r["actions"]["click"]]}},
        lambda r: {**r, "timestamps": [t - 3600 for t in r["timestamps"]]},
        lambda r: {**r, "query_time": r["query_time"] + 86_400},  # the time bias reads it
    ],
    ids=["item", "action", "timestamps", "query_time"],
)  # fmt: skip
def test_a_changed_history_under_the_same_key_is_encoded_again(change) -> None:
    ranker = _ranker(experts=["match", "cross", "self"])
    request = _request(5, 3)
    candidates = ["i3", "i7", "i7", "i11", request["history"][-1]]
    before = predictions(ranker.score(candidates=candidates, cache_key="u", **request))
    later = change(request)
    got = predictions(ranker.score(candidates=candidates, cache_key="u", **later))
    want = predictions(ranker.score(candidates=candidates, falcon=False, **later))
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert (got - before).abs().max() > 1e-4  # the change matters, so a stale entry would show
    assert ranker.history_cache.stats.stale == 1 and ranker.history_cache.stats.hits == 0


def test_the_query_time_is_part_of_the_content_only_where_it_is_read() -> None:
    history = _history(4, 1)
    items, actions, timestamps, query_time = history
    later = (items, actions, timestamps, query_time + 999)
    for over, reads in [
        ({"experts": ["self"]}, True),
        ({"experts": ["self"], "self_rel_bias": False}, False),
        ({"experts": ["match"], "match_half_life": 60.0}, True),
        ({"experts": ["match", "cross"]}, False),
    ]:
        model = _model(**over)
        assert (history_content(model, *history) != history_content(model, *later)) == reads
        if not reads:  # then the query time does not change the scores either
            candidates = _candidates(items, 2)
            torch.testing.assert_close(
                _whole(model, *history, candidates), _whole(model, *later, candidates)
            )
        assert history_content(model, *history) != history_content(
            model, items, actions.flip(0), timestamps, query_time
        )


def test_the_item_side_is_kept_until_its_weights_change() -> None:
    model = _model(experts=["cross", "self"])
    history = _history(6, 4)
    candidates = _candidates(history[0], 5)
    cache = encode_ranking_history(model, *history)
    first = item_side(model)
    assert item_side(model) is first
    assert first.item_tower.shape == (NUM_ITEMS + 1, 2, 16)
    assert first.self_tokens is not None and first.cross_queries is not None
    before = candidate_logits(model, cache, candidates)
    with torch.no_grad():  # a history-side weight: the item side stays
        model.towers.user_tower[0].weight.mul_(1.1)
    assert item_side(model) is first
    cache = encode_ranking_history(model, *history)
    # In-place changes of each item-side input, then a whole new set of weights.
    changes = [
        lambda: model.towers.item_tower[-1].weight.mul_(1.5),
        lambda: model.towers.item_emb.weight.add_(0.3),
        lambda: model.placeholder.add_(0.5),  # type: ignore[union-attr]
        lambda: model.cross.q.bias.add_(1.0),  # type: ignore[union-attr]
        lambda: model.load_state_dict(_model(experts=["cross", "self"], d_model=16).state_dict()),
    ]
    kept = first
    for change in changes:
        with torch.no_grad():
            change()
        cache = encode_ranking_history(model, *history)
        assert item_side(model) is not kept
        kept = item_side(model)
        got = candidate_logits(model, cache, candidates)
        torch.testing.assert_close(got, _whole(model, *history, candidates), rtol=TOL, atol=TOL)
        assert (got - before).abs().max() > 1e-4  # a stale item side would have failed above
        before = got
    forget_item_side(model)
    assert item_side(model) is not kept


def test_bad_calls_are_clear() -> None:
    model = _model(experts=["self"])
    items, actions, timestamps, query_time = _history(3, 0)
    cache = encode_ranking_history(model, items, actions, timestamps, query_time)
    assert isinstance(cache, GESRHistoryCache)
    with pytest.raises(ValueError, match="no candidates"):
        candidate_logits(model, cache, torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="microbatch"):
        candidate_logits(model, cache, torch.tensor([1]), microbatch=0)
    with pytest.raises(ValueError, match="history is empty"):
        encode_ranking_history(model, items[:0], actions[:0], timestamps[:0], query_time)
    with pytest.raises(ValueError, match="eval mode"):
        encode_ranking_history(model.train(), items, actions, timestamps, query_time)
    with pytest.raises(ValueError, match="eval mode"):
        item_side(model)
    no_expert = _model(experts=[]).train()
    with pytest.raises(ValueError, match="eval mode"):
        encode_ranking_history(no_expert, items, actions, timestamps, query_time)
