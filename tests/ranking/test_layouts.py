"""ROO (one sequence per request) and impression-level (history repeated) give the same
per-impression predictions and gradients; HSTU ranking tokens match a hand-built sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexgr.batch import JaggedBatch
from flexgr.model.hstu.inputs import prepare as prepare_hstu
from flexgr.model.registry import build_model
from flexgr.ranking import RankingConfig, build_requests, impression_batch, request_batch
from flexgr.ranking.requests import impressions_of, split_requests
from flexgr.ranking.tasks import task_losses
from tests.ranking.helpers import events_of, model_options, synthetic_data

ARCHS = [
    ("hstu-ranking", {"layout": "interleaved"}),
    ("hstu-ranking", {"layout": "merged"}),
    ("hstu-ranking", {"layout": "merged", "candidate_action": "zero", "action_encoding": "bits"}),
    ("hstu-ranking", {"layout": "interleaved", "rel_bias": False, "concat_ua": True}),
    ("sasrec-ranking", {}),
    ("two-tower-ranking", {}),
]
CFG = RankingConfig(
    tasks=["like", "rating", "action:click:1"], action_inputs=["rating", "click"], request_size=5
)


def _model(arch: str, extra: dict, data, max_seq_len: int = 9, seed: int = 0):
    torch.manual_seed(seed)
    encoding = extra.get("action_encoding", "categorical")
    options = {**model_options(data, CFG, max_seq_len, encoding), **extra}
    return build_model(arch, options).double().eval()


def _logits(model, batch):
    return model(batch, get_spec_of(model).prepare(model, batch))


def get_spec_of(model):
    from flexgr.model.registry import spec_of

    return spec_of(model)


@pytest.mark.parametrize(("arch", "extra"), ARCHS)
def test_request_and_impression_layouts_agree(arch: str, extra: dict) -> None:
    data = synthetic_data(users=10, seed=3)
    requests = build_requests(data, CFG, max_seq_len=9)
    events = events_of(data, CFG)
    rows = np.arange(len(requests))
    model = _model(arch, extra, data)
    per_request = _logits(model, request_batch(events, requests, rows))
    request_row, impression = impressions_of(requests)
    per_impression = _logits(model, impression_batch(events, requests, request_row, impression))
    assert per_request.shape == (int(requests.sizes.sum()), 3)
    torch.testing.assert_close(per_request, per_impression, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("arch", "extra"), ARCHS[:2] + ARCHS[4:])
def test_request_and_impression_layouts_give_the_same_gradients(arch: str, extra: dict) -> None:
    data = synthetic_data(users=8, seed=5)
    requests = build_requests(data, CFG, max_seq_len=9)
    events = events_of(data, CFG)
    kinds = ["bce", "mse", "bce"]
    grads = []
    for layout in ("request", "impression"):
        model = _model(arch, extra, data)  # eval mode: no dropout, same weights
        if layout == "request":
            batch = request_batch(events, requests, np.arange(len(requests)))
        else:
            batch = impression_batch(events, requests, *impressions_of(requests))
        loss = task_losses(_logits(model, batch), batch.labels.double(), batch.known, kinds)
        (loss.sum() / batch.num_candidates).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12)


def _reference_hstu_logits(model, data, events, history: range, candidate: int, query_time: int):
    """The definition: the history's tokens built one by one in Python, then the candidate as
    the sequence's single target, run through the model's own stack and head."""
    cfg = model.cfg
    tokens, stamps = [], []
    for e in history:
        item = model.item_emb(torch.tensor([events.items[e]]))
        action = model.actions(torch.from_numpy(events.actions[e : e + 1]))
        if cfg.layout == "interleaved":
            tokens += [item, action]
            stamps += [events.timestamps[e]] * 2
        else:
            tokens.append(item + action)
            stamps.append(events.timestamps[e])
    cand = model.item_emb(torch.tensor([events.items[candidate]]))
    if cfg.layout == "merged" and model.placeholder is not None:
        cand = cand + model.placeholder
    tokens.append(cand)
    stamps.append(query_time)
    x = torch.cat(tokens)
    jagged = JaggedBatch(
        torch.zeros(len(tokens), dtype=torch.int64),
        torch.tensor([0, len(tokens)]),
        torch.tensor(stamps, dtype=torch.int64),
        torch.tensor([query_time]),
        torch.tensor([1]),
    )
    states = model.encoder(x, prepare_hstu(model.encoder, jagged))
    return model.head(states[-1:])[0]


@pytest.mark.parametrize("layout", ["interleaved", "merged"])
def test_hstu_ranking_equals_each_candidate_alone_after_its_history(layout: str) -> None:
    data = synthetic_data(users=6, seed=11)
    requests = build_requests(data, CFG, max_seq_len=7)
    events = events_of(data, CFG)
    split = split_requests(requests)
    model = _model("hstu-ranking", {"layout": layout}, data, max_seq_len=7)
    rows = np.concatenate([split.train[:2], split.test[:2]])
    got = _logits(model, request_batch(events, requests, rows))
    c = 0
    for r in rows:
        qt = int(events.timestamps[requests.start[r]])
        history = range(int(requests.history_start[r]), int(requests.start[r]))
        for e in range(int(requests.start[r]), int(requests.end[r])):
            want = _reference_hstu_logits(model, data, events, history, e, qt)
            torch.testing.assert_close(got[c], want, rtol=1e-10, atol=1e-10)
            c += 1
    assert c == got.shape[0]


def test_a_candidate_never_sees_the_other_impressions_or_their_labels() -> None:
    data = synthetic_data(users=6, seed=2)
    requests = build_requests(data, CFG, max_seq_len=9)
    events = events_of(data, CFG)
    model = _model("hstu-ranking", {"layout": "interleaved"}, data)
    rows = np.arange(len(requests))
    batch = request_batch(events, requests, rows)
    base = _logits(model, batch)
    # Change every impression's labels and every candidate but each request's first.
    first = batch.candidate_offsets[:-1]
    others = torch.ones(batch.num_candidates, dtype=torch.bool)
    others[first] = False
    candidates = batch.candidates.clone()
    candidates[others] = (candidates[others] % data.num_items) + 1
    changed = type(batch)(
        **{**batch.__dict__, "candidates": candidates, "labels": 1 - batch.labels}
    )
    torch.testing.assert_close(_logits(model, changed)[first], base[first], rtol=1e-12, atol=1e-12)


def test_only_sasrec_reads_the_longest_history(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare_history's host sync (the longest history, for SASRec's padding) is skipped for the
    two-tower model, which never reads it; SASRec still gets the true longest history."""
    import flexgr.ranking.baselines as baselines

    data = synthetic_data(users=10, seed=3)
    requests = build_requests(data, CFG, max_seq_len=9)
    batch = request_batch(events_of(data, CFG), requests, np.arange(len(requests)))
    longest = int((batch.history_offsets[1:] - batch.history_offsets[:-1]).max())
    sasrec = _model("sasrec-ranking", {}, data)
    assert baselines.prepare_history(sasrec, batch).max_len == longest > 0

    def no_sync(offsets):  # noqa: ANN001, ANN202
        raise AssertionError("the two-tower prepare read the longest history")

    monkeypatch.setattr(baselines, "lengths_of", no_sync)
    two_tower = _model("two-tower-ranking", {}, data)
    assert baselines.prepare_history(two_tower, batch).max_len == 0
    with pytest.raises(AssertionError, match="two-tower prepare"):
        baselines.prepare_history(sasrec, batch)
