"""M-FALCON for HSTU ranking equals scoring each candidate alone on history + [candidate], for
every microbatch size, both layouts, with and without the relative bias and the cross-request
history cache."""

from __future__ import annotations

import copy

import pytest
import torch

from flexgr.model.hstu import falcon
from flexgr.model.hstu.falcon import HistoryCache, HistoryStore
from flexgr.model.registry import build_model, spec_of
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.falcon import candidate_logits, encode_ranking_history, history_content
from flexgr.ranking.scorer import Ranker
from tests.ranking.score_requests import predictions, ranker_over, request_body

NUM_ITEMS, MAX_EVENTS, TOL = 30, 9, 1e-5
MICROBATCHES = (1, 2, 4, 6, 50)  # one, a divisor of 6 candidates, a non-divisor, = m, > m
CONFIGS = [
    {"layout": "interleaved"},
    {"layout": "interleaved", "rel_bias": False},
    {"layout": "merged"},
    {"layout": "merged", "rel_bias": False},
    {"layout": "merged", "candidate_action": "zero", "concat_ua": True, "alpha": 0.4},
]


def _model(**over) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {
        "num_items": NUM_ITEMS,
        "max_seq_len": MAX_EVENTS,
        "d_model": 16,
        "num_layers": 2,
        "num_heads": 2,
        "dqk": 8,
        "dv": 8,
        "head_hidden": 8,
        "backend": "reference",
        "action_inputs": ["rating", "click"],
        "action_vocab": [11, 4],
        "tasks": ["like", "rating"],
        "task_kinds": ["bce", "mse"],
        **over,
    }
    model = build_model("hstu-ranking", options).eval()
    with torch.no_grad():  # large biases and embeddings, so a wrong position, time or token
        model.item_emb.weight.normal_(0, 0.5)  # would show
        for table in model.actions.tables:
            table.normal_(0, 1.0)
        for layer in model.encoder.layers:
            if layer.rab is not None:
                layer.rab.pos_w.normal_(0, 1.0)
                layer.rab.ts_w.normal_(0, 1.0)
    return model


def _history(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, NUM_ITEMS + 1, (n,), generator=g)
    actions = torch.stack(
        [torch.randint(0, 11, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)], 1
    )
    gaps = torch.tensor([0, 0, 7, 300, 90_000])[torch.randint(0, 5, (n,), generator=g)]
    timestamps = 1_000_000 + torch.cumsum(gaps, 0)
    return items, actions, timestamps, int(timestamps[-1]) + 4321


def _alone(model, items, actions, timestamps, query_time: int, candidate: int) -> torch.Tensor:
    """The definition: the normal forward on history + [candidate], the candidate its target."""
    batch = RankingBatch(
        items,
        actions,
        timestamps,
        torch.tensor([0, len(items)]),
        torch.tensor([candidate]),
        torch.tensor([0, 1]),
        torch.tensor([query_time]),
    )
    return model(batch, spec_of(model).prepare(model, batch))[0]


def _candidates(seed: int, m: int = 6) -> torch.Tensor:
    return torch.randint(1, NUM_ITEMS + 1, (m,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("over", CONFIGS)
def test_cached_microbatches_equal_each_candidate_alone(over: dict) -> None:
    model = _model(**over)
    for seed, n in enumerate((1, 4, MAX_EVENTS)):  # jagged histories, length 1 included
        items, actions, timestamps, query_time = _history(n, seed)
        candidates = _candidates(100 + seed)
        history = (items, actions, timestamps, query_time)
        want = torch.stack([_alone(model, *history, int(c)) for c in candidates])
        cache = encode_ranking_history(model, *history)
        per_event = 2 if over["layout"] == "interleaved" else 1
        assert cache.length == per_event * n and len(cache.keys) == 2
        for microbatch in MICROBATCHES:
            got = candidate_logits(model, cache, candidates, microbatch=microbatch)
            torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_a_cache_from_another_query_time_or_history_differs() -> None:
    """The equality above can fail: the time bias, the actions and the order all reach the
    cached keys and the candidates (so a wrong cache or a wrong candidate bias would show)."""
    model = _model(layout="interleaved")
    items, actions, timestamps, query_time = _history(MAX_EVENTS, 7)
    candidates = _candidates(8)
    want = torch.stack(
        [_alone(model, items, actions, timestamps, query_time, int(c)) for c in candidates]
    )
    wrong = [
        encode_ranking_history(model, items, actions, timestamps, query_time + 10**6),
        encode_ranking_history(model, items, (actions + 1) % 4, timestamps, query_time),
        encode_ranking_history(model, items.flip(0), actions, timestamps, query_time),
    ]
    for cache in wrong:
        got = candidate_logits(model, cache, candidates, microbatch=4)
        assert (got - want).abs().max() > 1e-3


def _ranker(**over) -> Ranker:
    return ranker_over(_model(**over), "hstu-ranking", NUM_ITEMS)


def _request(n: int, seed: int) -> dict:
    return request_body(*_history(n, seed))


@pytest.mark.parametrize("over", CONFIGS[:4])
def test_ranker_score_with_the_cross_request_cache(over: dict) -> None:
    ranker = _ranker(**over)
    assert ranker.falcon_unsupported is None
    store = ranker.history_cache
    for seed, n in enumerate((1, 4, MAX_EVENTS)):
        request = _request(n, seed)
        candidates = [f"i{int(c)}" for c in _candidates(50 + seed)]
        # every candidate a target of one pass (test_layouts: equal to each alone)
        targets = predictions(ranker.score(candidates=candidates, falcon=False, **request))
        before = store.stats.hits
        for microbatch in MICROBATCHES:  # the first call encodes, the others hit the cache
            got = ranker.score(
                candidates=candidates, microbatch=microbatch, cache_key=("user", seed), **request
            )
            torch.testing.assert_close(predictions(got), targets, rtol=TOL, atol=TOL)
            assert [raw for raw, _ in got] == candidates
        uncached = ranker.score(candidates=candidates, microbatch=4, **request)
        torch.testing.assert_close(predictions(uncached), targets, rtol=TOL, atol=TOL)
        assert store.stats.hits == before + len(MICROBATCHES) - 1
    assert store.stats.misses == 3 and len(store) == 3 and store.stats.stale == 0


def test_a_reused_key_with_another_history_is_encoded_again() -> None:
    ranker = _ranker(layout="merged")
    request = _request(5, 3)
    candidates = ["i3", "i7", "i7", "i11"]
    ranker.score(candidates=candidates, cache_key="u", **request)
    later = {**request, "query_time": request["query_time"] + 86_400}  # the time bias reads it
    got = ranker.score(candidates=candidates, cache_key="u", **later)
    want = ranker.score(candidates=candidates, falcon=False, **later)
    torch.testing.assert_close(predictions(got), predictions(want), rtol=TOL, atol=TOL)
    assert ranker.history_cache.stats.stale == 1 and ranker.history_cache.stats.hits == 0
    ranker.score(candidates=candidates[:1], cache_key="u", **later)
    assert ranker.history_cache.stats.hits == 1 and len(ranker.history_cache) == 1


def test_without_the_time_bias_the_query_time_does_not_change_the_cache() -> None:
    model = _model(layout="merged", rel_bias=False)
    items, actions, timestamps, query_time = _history(4, 1)
    now = history_content(model, items, actions, timestamps, query_time)
    assert now == history_content(model, items, actions, timestamps, query_time + 999)
    assert now != history_content(model, items, actions.flip(0), timestamps, query_time)
    assert now != history_content(model, items[:3], actions[:3], timestamps[:3], query_time)


def _entry(length: int) -> HistoryCache:
    kv = [torch.zeros(length, 1, 2)]  # 8 bytes per token, keys and values
    return HistoryCache(kv, kv, torch.zeros(length, dtype=torch.int64), 0, length)


def test_history_store_is_a_bounded_lru() -> None:
    store = HistoryStore(max_entries=2)
    store.put("a", b"1", _entry(1))
    store.put("b", b"1", _entry(1))
    assert store.get("a", b"1") is not None  # "a" is now the most recent
    store.put("c", b"1", _entry(1))
    assert "b" not in store and "a" in store and "c" in store
    assert store.stats.evictions == 1 and store.get("b", b"1") is None
    assert store.stats.misses == 1 and store.stats.hits == 1
    by_bytes = HistoryStore(max_entries=10, max_bytes=100)  # an entry of 4 tokens: 64 bytes
    by_bytes.put("a", b"", _entry(4))
    by_bytes.put("b", b"", _entry(4))
    assert len(by_bytes) == 1 and "b" in by_bytes and by_bytes.nbytes() == 64
    by_bytes.put("c", b"", _entry(10))  # alone above the bound: not stored
    assert "c" not in by_bytes and len(by_bytes) == 1
    with pytest.raises(ValueError, match="max_entries"):
        HistoryStore(max_entries=0)


def test_baseline_rankers_keep_their_path() -> None:
    torch.manual_seed(0)
    options = {
        "num_items": NUM_ITEMS,
        "max_seq_len": MAX_EVENTS,
        "d_model": 16,
        "num_heads": 2,
        "action_inputs": ["rating", "click"],
        "action_vocab": [11, 4],
        "tasks": ["like", "rating"],
        "task_kinds": ["bce", "mse"],
    }
    model = build_model("sasrec-ranking", options).eval()
    ranker = ranker_over(model, "sasrec-ranking", NUM_ITEMS)
    assert ranker.falcon_unsupported is not None
    scored = ranker.score(candidates=["i1", "i2"], cache_key="u", **_request(3, 0))
    assert len(scored) == 2 and len(ranker.history_cache) == 0


def test_bad_requests_are_clear() -> None:
    model = _model(layout="interleaved")
    items, actions, timestamps, query_time = _history(3, 0)
    cache = encode_ranking_history(model, items, actions, timestamps, query_time)
    with pytest.raises(ValueError, match="no candidates"):
        candidate_logits(model, cache, torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="microbatch"):
        candidate_logits(model, cache, torch.tensor([1]), microbatch=0)
    with pytest.raises(ValueError, match="history is empty"):
        encode_ranking_history(model, items[:0], actions[:0], timestamps[:0], query_time)
    with pytest.raises(ValueError, match="eval mode"):
        encode_ranking_history(model.train(), items, actions, timestamps, query_time)


def test_the_cache_keeps_the_step_layouts_and_a_hit_equals_a_fresh_cache() -> None:
    """encode keeps keys [H, Dqk, L] and values [H, L, Dv] contiguous (handed out as [L, H, D]
    views) and one candidate bias row per layer, counted in nbytes; scoring a kept cache again
    gives the logits of a freshly encoded one."""
    model = _model(layout="interleaved")
    history = _history(MAX_EVENTS, 2)
    candidates = _candidates(3, m=7)
    cache = encode_ranking_history(model, *history)
    L = cache.length
    for keys, values, row in zip(cache.keys, cache.values, cache.candidate_bias, strict=True):
        assert keys.shape == (L, 2, 8) and keys.permute(1, 2, 0).is_contiguous()
        assert values.shape == (L, 2, 8) and values.permute(1, 0, 2).is_contiguous()
        assert row is not None and row.shape == (L + 1,)
    kv_bytes = sum(t.numel() * 4 for t in (*cache.keys, *cache.values))
    assert cache.nbytes() == kv_bytes + 2 * (L + 1) * 4
    first = candidate_logits(model, cache, candidates, microbatch=3)
    again = candidate_logits(model, cache, candidates, microbatch=3)
    fresh = candidate_logits(model, encode_ranking_history(model, *history), candidates)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, fresh, rtol=TOL, atol=TOL)
    unbiased = _model(layout="interleaved", rel_bias=False)
    assert encode_ranking_history(unbiased, *history).candidate_bias == [None, None]
    bare = HistoryCache(cache.keys, cache.values, cache.timestamps, cache.query_time, L)
    with pytest.raises(ValueError, match="no candidate bias rows"):
        candidate_logits(model, bare, candidates)


@pytest.mark.parametrize("half_products", [False, True])
def test_bf16_cached_logits_are_as_close_as_the_bf16_forward(
    half_products: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 M-FALCON against the fp64 forward, within 2x the bf16 forward's own error (the rule
    the Triton kernel's bf16 tests use). On CPU the step multiplies half types in fp32;
    ``half_products`` runs the accelerators' bf16 products (fp32 accumulation) here too."""
    if half_products:
        monkeypatch.setattr(falcon, "matmul_dtype", lambda dtype, device: dtype)
    events = 100
    model = _model(layout="interleaved", max_seq_len=events)
    items, actions, timestamps, query_time = _history(events, 5)
    history = (items, actions, timestamps, query_time)
    candidates = _candidates(6, m=16)
    batch = RankingBatch(
        items,
        actions,
        timestamps,
        torch.tensor([0, events]),
        candidates,
        torch.tensor([0, candidates.numel()]),
        torch.tensor([query_time]),
    )

    def forward(m: torch.nn.Module) -> torch.Tensor:
        return m(batch, spec_of(m).prepare(m, batch)).double()

    truth = forward(copy.deepcopy(model).double())
    bf16 = model.to(torch.bfloat16)
    cache = encode_ranking_history(bf16, *history)
    assert cache.keys[0].dtype == torch.bfloat16
    got = candidate_logits(bf16, cache, candidates, microbatch=5).double()
    eager = forward(bf16)
    assert (got - truth).abs().max() <= 2 * (eager - truth).abs().max()


def step_definition(q, k, v, keys_HDL, values_HLD, row, alpha: float, n: int):  # noqa: ANN001, ANN202
    """The candidate step's definition in the inputs' own dtype: scores against the cached
    keys plus the bias row ([L + 1]; None: no bias), the own key's term, SiLU, both value
    sums, divided by n. tests/ops/test_delta_query.py checks the kernel against it too."""
    s = alpha * torch.einsum("mhd,hdl->mhl", q, keys_HDL)
    s_own = alpha * (q * k).sum(-1)
    if row is not None:
        s, s_own = s + row[:-1], s_own + row[-1]
    out = torch.einsum("mhl,hld->mhd", torch.nn.functional.silu(s), values_HLD)
    return (out + torch.nn.functional.silu(s_own).unsqueeze(-1) * v) / n


def _step_by_formula(cache: HistoryCache, index: int, q, k, v, alpha: float, n: int):  # noqa: ANN001, ANN202
    """step_definition over one layer of ``cache``, in q's dtype."""
    keys = cache.keys[index].permute(1, 2, 0).to(q.dtype)
    values = cache.values[index].permute(1, 0, 2).to(q.dtype)
    return step_definition(q, k, v, keys, values, cache.candidate_bias[index].to(q.dtype),
                           alpha, n)


@pytest.mark.parametrize("half_products", [False, True])
def test_bf16_candidate_step_within_twice_the_bf16_definitions_error(
    half_products: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bf16 candidate step (one layer, 64 candidates over a 200-token cache with the bias)
    against fp64 on the same bf16 inputs. With bf16 products (the accelerators' path): at most
    2x the error of the definition evaluated in bf16 (the kernels' rule). With the CPU's fp32
    products: at most 2x the error of the definition in fp32 rounded once to bf16, a bound that
    a 1% scale error in the step exceeds (the logits test above cannot see the step's
    precision: the logits' error is their own bf16 rounding)."""
    if half_products:
        monkeypatch.setattr(falcon, "matmul_dtype", lambda dtype, device: dtype)
    events = 100
    model = _model(layout="interleaved", max_seq_len=events).to(torch.bfloat16)
    items, actions, timestamps, query_time = _history(events, 8)
    cache = encode_ranking_history(model, items, actions, timestamps, query_time)
    g = torch.Generator().manual_seed(3)
    H, D = cache.keys[0].shape[1], cache.keys[0].shape[2]
    q, k, v = (torch.randn(64, H, D, generator=g).to(torch.bfloat16) for _ in range(3))
    alpha, n = 0.7, 2 * events
    got = falcon._CachedAttention(cache, 0)(
        q, k, v, max_seq_len=n, alpha=alpha, bias=(torch.zeros(1), torch.zeros(1))
    )
    truth = _step_by_formula(cache, 0, q.double(), k.double(), v.double(), alpha, n)
    if half_products:
        reference = _step_by_formula(cache, 0, q, k, v, alpha, n)
    else:
        fp32 = (x.float() for x in (q, k, v))
        reference = _step_by_formula(cache, 0, *fp32, alpha, n).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert (got.double() - truth).abs().max() <= 2 * (reference.double() - truth).abs().max()


def test_cuda_graph_request_is_the_eager_pass_off_cuda() -> None:
    """Off CUDA ``cuda_graph=True`` runs the eager pass and captures nothing."""
    model = _model(layout="interleaved")
    items, actions, timestamps, query_time = _history(MAX_EVENTS, 3)
    cache = encode_ranking_history(model, items, actions, timestamps, query_time)
    candidates = _candidates(7)
    want = candidate_logits(model, cache, candidates, microbatch=4)
    got = candidate_logits(model, cache, candidates, microbatch=4, cuda_graph=True)
    assert torch.equal(got, want) and cache.graphs == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("over", [CONFIGS[0], CONFIGS[2]])
def test_cuda_graph_replays_equal_the_eager_pass(over: dict) -> None:
    """Replayed passes (padded last microbatch, sizes below the microbatch, a second and a
    third replay with other candidates) equal the eager pass on the same cache; the scorer
    captures on the first cache hit and replays after."""
    model = _model(**over).cuda()
    items, actions, timestamps, query_time = _history(MAX_EVENTS, 4)
    history = (items.cuda(), actions.cuda(), timestamps.cuda(), query_time)
    cache = encode_ranking_history(model, *history)
    for seed, m, microbatch in ((1, 6, 4), (2, 6, 4), (3, 3, 4), (4, 13, 8)):
        candidates = _candidates(seed, m).cuda()
        want = candidate_logits(model, cache, candidates, microbatch=microbatch)
        got = candidate_logits(model, cache, candidates, microbatch=microbatch, cuda_graph=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not got.isnan().any()
    assert sorted(cache.graphs) == [4, 8]
    ranker = ranker_over(model, "hstu-ranking", NUM_ITEMS)
    request = request_body(*_history(MAX_EVENTS, 5))
    names = [f"i{int(c)}" for c in _candidates(9)]
    first = ranker.score(candidates=names, microbatch=4, cache_key="u", **request)
    hit = ranker.score(candidates=names, microbatch=4, cache_key="u", **request)
    again = ranker.score(candidates=names, microbatch=4, cache_key="u", **request)
    torch.testing.assert_close(predictions(hit), predictions(first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predictions(again), predictions(first), rtol=1e-5, atol=1e-5)
    assert ranker.history_cache.stats.hits == 2
    ((_, stored),) = ranker.history_cache._entries.values()
    assert list(stored.graphs) == [4]  # captured on the first hit, replayed on the second


def test_live_cuda_graphs_are_capped_least_recently_used_first(monkeypatch) -> None:
    """The process keeps at most MAX_LIVE_GRAPHS captured passes; a replay makes one recent."""
    from flexgr.ranking import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "MAX_LIVE_GRAPHS", 2)
    monkeypatch.setattr(cuda_graphs, "_live", cuda_graphs.OrderedDict())
    from flexgr.model.hstu.falcon import GraphSlots

    a, b = GraphSlots({4: object(), 8: object()}), GraphSlots({4: object()})
    cuda_graphs._touch(a, 4, a[4])
    cuda_graphs._touch(a, 8, a[8])
    cuda_graphs._touch(a, 4, a[4])  # a[4] is now the most recent
    cuda_graphs._touch(b, 4, b[4])  # evicts a[8], the least recently used
    assert sorted(a) == [4] and list(b) == [4] and cuda_graphs.live_graphs() == 2
    a[4] = object()  # a newer capture under the same key: its own entry
    cuda_graphs._touch(a, 4, a[4])
    cuda_graphs._touch(b, 4, b[4])
    assert 4 in a and 4 in b
    del a  # an evicted history: the list does not keep its graphs
    assert cuda_graphs.live_graphs() == 1
