"""GESR's scoring path reads nothing from the device on the host, and gives the logits of the
computation it replaced (tests/gesr/old_scoring.py, which read the data's value range, pair
count and longest lengths).

Sync-freedom is shown on the ``meta`` device: a meta tensor has a shape and no data, so any
host read of a value (``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``, ``nonzero``, boolean
indexing, ``repeat_interleave`` without ``output_size``...) raises there. The old code fails these
tests (it read the value range and the longest lengths with ``.tolist()``). The self expert's
forward is left out: on CPU it runs HSTU's dense reference backend, which pads to the batch's
longest sequence it reads (flexgr/ops/reference.py); its prepare is covered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexgr.gesr.falcon import candidate_logits, encode_ranking_history
from flexgr.gesr.model import GESRRanker
from flexgr.model.registry import build_model, spec_of
from flexgr.ranking import RankingConfig, build_requests, impression_batch, request_batch
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.requests import impressions_of
from tests.gesr.old_scoring import old_logits
from tests.ranking.helpers import events_of, model_options, synthetic_data

CFG = RankingConfig(tasks=["like", "rating"], action_inputs=["rating", "click"], request_size=5)
MAX_EVENTS = 9
SMALL = {"d_model": 8, "hidden": 16, "cross_head_dim": 4, "self_head_dim": 4, "mlpg_hidden": 8}
CONFIGS = [
    {"experts": ["match", "cross", "self"]},
    {"experts": ["match"], "match_half_life": 500.0, "match_buckets": 0},
    {"experts": ["cross"], "cross_activation": "silu"},
    {"experts": ["cross"], "cross_impl": "pairs"},
    {"experts": ["cross"], "cross_impl": "pairs", "cross_activation": "silu"},
    {"experts": ["self"]},
    {"experts": []},
]
NOT_SELF = [c for c in CONFIGS if "self" not in c["experts"]]


def _data_and_batch(users: int = 10, seed: int = 3):
    data = synthetic_data(users=users, seed=seed)
    requests = build_requests(data, CFG, max_seq_len=MAX_EVENTS)
    batch = request_batch(events_of(data, CFG), requests, np.arange(len(requests)))
    return data, batch


def _model(data, over: dict, dtype: torch.dtype = torch.float64) -> GESRRanker:
    torch.manual_seed(0)
    options = {**model_options(data, CFG, MAX_EVENTS), **SMALL, **over}
    model = build_model("gesr-ranking", options).to(dtype).eval()
    with torch.no_grad():  # large enough weights that every expert moves the logits
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model  # type: ignore[return-value]


def _logits(model: GESRRanker, batch: RankingBatch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch, spec_of(model).prepare(model, batch))


def _wide_batch(num_items: int, seed: int = 0) -> RankingBatch:
    """Requests of 0 to 40 candidates over histories of 0 to MAX_EVENTS events (items drawn
    from a few, so they repeat and match): tiles of several candidates, some left unused."""
    g = torch.Generator().manual_seed(seed)
    history_len, candidate_len = [9, 2, 5, 9, 0, 7], [40, 3, 17, 0, 25, 1]
    H, C, B = sum(history_len), sum(candidate_len), len(history_len)
    timestamps = 1_000_000 + torch.randint(0, 500, (H,), generator=g).cumsum(0)
    return RankingBatch(
        history_items=torch.randint(1, 8, (H,), generator=g),
        history_actions=torch.stack(
            [torch.randint(0, 6, (H,), generator=g), torch.randint(0, 4, (H,), generator=g)], 1
        ),
        history_timestamps=timestamps,
        history_offsets=torch.tensor(np.cumsum([0, *history_len])),
        candidates=torch.randint(1, min(num_items, 12) + 1, (C,), generator=g),
        candidate_offsets=torch.tensor(np.cumsum([0, *candidate_len])),
        query_time=torch.full((B,), int(timestamps[-1]) + 100),
    )


def _batch_of(kind: str):
    """(data, batch): ROO requests of 5 candidates, one impression per sequence (a tile per
    candidate) or the wide batch."""
    data = synthetic_data(users=10, seed=3)
    requests = build_requests(data, CFG, max_seq_len=MAX_EVENTS)
    events = events_of(data, CFG)
    if kind == "impressions":
        return data, impression_batch(events, requests, *impressions_of(requests))
    if kind == "wide":
        return data, _wide_batch(data.num_items)
    return data, request_batch(events, requests, np.arange(len(requests)))


BATCHES = {"requests": 4, "impressions": 1, "wide": 8}  # and their tile sizes


@pytest.mark.parametrize("over", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", BATCHES)
def test_logits_equal_the_old_computation(over: dict, dtype: torch.dtype, kind: str) -> None:
    """To a few ulps of the logits' scale on CPU. Histories shorter than the bound
    (max_seq_len) add padding slots, exact zeros in every sum, but the padded matmuls are longer
    than the old layout's, and some BLAS kernels round their rows' last bit differently: equal to
    the bit on one CPU, 1-2 ulps apart on another (the wide batch's padded cross attention)."""
    data, batch = _batch_of(kind)
    lengths = batch.history_offsets[1:] - batch.history_offsets[:-1]
    assert bool((lengths < MAX_EVENTS).any())  # padding slots are exercised
    model = _model(data, over, dtype)
    new, old = _logits(model, batch), old_logits(model, batch)
    ulps = 8 * torch.finfo(dtype).eps * float(old.abs().max())
    torch.testing.assert_close(new, old, rtol=0, atol=ulps)


@pytest.mark.parametrize("kind", BATCHES)
def test_the_batches_exercise_tiles_and_matches(kind: str) -> None:
    data, batch = _batch_of(kind)
    model = _model(data, {"experts": ["match", "cross"]})
    inputs = spec_of(model).prepare(model, batch)
    assert inputs.cross.tile_size == BATCHES[kind]  # type: ignore[union-attr]
    assert inputs.match is not None and int(inputs.match.max()) >= 1


@pytest.mark.parametrize("over", CONFIGS)
def test_prepare_reads_nothing_from_the_device(over: dict) -> None:
    data, batch = _data_and_batch()
    model = _model(data, over).to("meta")
    inputs = spec_of(model).prepare(model, batch.to("meta"))
    assert inputs.history_seq.device.type == "meta"


@pytest.mark.parametrize("over", NOT_SELF)
def test_scoring_reads_nothing_from_the_device(over: dict) -> None:
    data, batch = _data_and_batch()
    model = _model(data, over).to("meta")
    out = _logits(model, batch.to("meta"))
    assert out.shape == (batch.num_candidates, 2) and out.device.type == "meta"


@pytest.mark.parametrize("over", NOT_SELF)
def test_cached_serving_reads_nothing_from_the_device(over: dict) -> None:
    """flexgr.gesr.falcon: the history encoded, then microbatches of candidates over it."""
    data, batch = _data_and_batch()
    model = _model(data, over).to("meta")
    n = int(batch.history_offsets[1])
    history = (batch.history_items[:n], batch.history_actions[:n], batch.history_timestamps[:n])
    meta = [t.to("meta") for t in history]
    cache = encode_ranking_history(model, *meta, query_time=int(batch.query_time[0]))
    out = candidate_logits(model, cache, batch.candidates.to("meta"), microbatch=3)
    assert out.shape == (batch.num_candidates, 2)
