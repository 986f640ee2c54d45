"""M-FALCON equals scoring each candidate alone on history + [candidate]."""

from __future__ import annotations

import pytest
import torch

from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, encode
from flexgr.model.hstu.falcon import candidate_states, encode_history, score_candidates


def model(dtype: torch.dtype, **over) -> HSTU:
    torch.manual_seed(0)
    cfg = HSTUConfig(num_items=60, d_model=16, num_layers=3, num_heads=2, dqk=8, dv=8,
                     max_seq_len=40, backend="reference", **over)
    m = HSTU(cfg).to(dtype).eval()
    with torch.no_grad():  # large biases, so a wrong position or time would show
        for layer in m.layers:
            if layer.rab is not None:
                layer.rab.pos_w.normal_(0, 1.0)
                layer.rab.ts_w.normal_(0, 1.0)
    return m


def alone(m: HSTU, ids, ts, query_time: int, candidate: int) -> torch.Tensor:
    seq = torch.cat([ids, torch.tensor([candidate])])
    stamps = torch.cat([ts, torch.tensor([query_time])])
    batch = JaggedBatch(seq, torch.tensor([0, len(seq)]), stamps, torch.tensor([query_time]),
                        num_targets=torch.tensor([1]))
    return encode(m, batch)[-1]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("over", [{}, {"concat_ua": True, "alpha": 0.3}, {"rel_bias": False}])
def test_cached_microbatches_equal_each_candidate_alone(dtype, tol, over) -> None:
    m = model(dtype, **over)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (23,), generator=g)
    ts = torch.cumsum(torch.randint(0, 5000, (23,), generator=g), 0)
    query_time = int(ts[-1]) + 777
    candidates = torch.randint(1, 61, (11,), generator=g)
    want = torch.stack([alone(m, ids, ts, query_time, int(c)) for c in candidates])
    cache = encode_history(m, ids, ts, query_time)
    for microbatch in (1, 3, 11, 64):
        got = candidate_states(m, cache, candidates, microbatch=microbatch)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    scores, again = score_candidates(m, ids, ts, query_time, candidates, microbatch=4)
    cached, same = score_candidates(m, ids, ts, query_time, candidates, cache=cache)
    assert same is cache and again.length == 23
    expected = (want * m.item_embeddings(candidates)).sum(-1)
    torch.testing.assert_close(scores, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(cached, expected, rtol=tol, atol=tol)


def test_bad_requests_are_clear() -> None:
    m = model(torch.float32)
    ids, ts = torch.tensor([1, 2]), torch.tensor([10, 20])
    with pytest.raises(ValueError, match="history is empty"):
        encode_history(m, ids[:0], ts[:0], 30)
    with pytest.raises(ValueError, match="exceeds"):
        encode_history(m, torch.ones(60, dtype=torch.long), torch.arange(60), 99)
    cache = encode_history(m, ids, ts, 30)
    with pytest.raises(ValueError, match="no candidates"):
        candidate_states(m, cache, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="eval mode"):
        encode_history(m.train(), ids, ts, 30)
