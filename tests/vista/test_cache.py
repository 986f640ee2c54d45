"""The summary cache: quantisation error bounds, the directory store, export, and stage 2 on
stored summaries scoring as stage 2 on recomputed ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flexgr.ranking.evaluate import predict_requests
from flexgr.ranking.setup import new_ranking_model, ranking_data
from flexgr.train.config import apply_overrides, load_preset
from flexgr.vista.cache import (
    DirectorySummaryStore,
    QuantisedSummary,
    SummaryStore,
    dequantise,
    export_summaries,
    latest_version,
    load_summaries,
    predict_cached,
    quantise,
    request_keys,
)
from tests.ranking.helpers import synthetic_data


def _rows(S=6, d=9, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((S, d)).astype(np.float32) * rng.uniform(0.01, 30, (S, 1))
    x[2] = 0.0  # an all-zero row (scale 0)
    x[3, 4] = -5e3  # a row dominated by one element
    return x.astype(np.float32)


@pytest.mark.parametrize("bits,qmax", [(8, 127), (4, 7)])
def test_dequantisation_error_is_at_most_half_a_step(bits, qmax):
    x = _rows()
    q = quantise(x, bits)
    back = dequantise(q)
    assert back.shape == x.shape and back.dtype == np.float32
    step = np.abs(x).max(axis=1) / qmax
    err = np.abs(back - x)
    assert (err <= step[:, None] / 2 * (1 + 1e-5) + 1e-30).all()
    assert np.all(back[2] == 0)
    # Each row's largest element is on the grid: exact up to float rounding.
    top = np.abs(x).argmax(axis=1)
    np.testing.assert_allclose(back[np.arange(6), top], x[np.arange(6), top], rtol=1e-6)
    assert err.max() > 0  # the quantisation did round something


def test_int4_packs_two_per_byte_and_odd_widths():
    x = _rows(d=9)
    q4, q8 = quantise(x, 4), quantise(x, 8)
    assert q4.values.shape == (6, 5) and q4.values.dtype == np.uint8
    assert q8.values.shape == (6, 9) and q8.values.dtype == np.int8
    assert q4.nbytes == 6 * 5 + 6 * 4 and q8.nbytes == 6 * 9 + 6 * 4
    # Every nibble value -7..7 round-trips at its position (low nibble even, high odd).
    grid = np.array([np.arange(-7, 8, dtype=np.float32)[:9], np.arange(7, -8, -1)[:9]])
    np.testing.assert_array_equal(dequantise(quantise(grid, 4)), grid)
    assert np.abs(dequantise(q4) - x).max() > np.abs(dequantise(q8) - x).max()


def test_bytes_round_trip_and_bad_input():
    q = quantise(_rows(), 4)
    again = QuantisedSummary.from_bytes(q.to_bytes())
    assert again.bits == 4 and again.dim == 9
    np.testing.assert_array_equal(dequantise(again), dequantise(q))
    with pytest.raises(ValueError, match="truncated"):
        QuantisedSummary.from_bytes(q.to_bytes()[:-1])
    with pytest.raises(ValueError, match="not a VISTA summary"):
        QuantisedSummary.from_bytes(b"nope" * 8)
    with pytest.raises(ValueError, match="NaN"):
        quantise(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="bits"):
        quantise(_rows(), 2)


def test_directory_store(tmp_path: Path):
    store = DirectorySummaryStore(tmp_path / "store")
    assert isinstance(store, SummaryStore)
    a, b = quantise(_rows(seed=1)), quantise(_rows(seed=2))
    for user in ("1", "../x", "", "ü/ser"):  # any string is a safe key
        store.put(user, 200, a)
        store.put(user, -5, b)
        store.put(user, 100, b)
        store.put(user, 100, a)  # a rewrite replaces
        assert store.versions(user) == [-5, 100, 200]
        np.testing.assert_array_equal(dequantise(store.get(user, 100)), dequantise(a))
        assert latest_version(store, user, 150) == 100
        assert latest_version(store, user, 200) == 200
        with pytest.raises(KeyError, match="at or before -6"):
            latest_version(store, user, -6)
    assert sorted(store.users()) == sorted(["1", "../x", "", "ü/ser"])
    assert not (tmp_path / "x").exists()  # "../x" stayed inside the store
    assert store.versions("nobody") == []
    with pytest.raises(KeyError, match="no summary of user 'nobody'"):
        store.get("nobody", 1)
    leftovers = [p for p in (tmp_path / "store").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []  # atomic writes leave no temp files behind


def _setup(tmp_path: Path, attention: str = "silu"):
    data = synthetic_data(users=10, seed=3, min_len=12, max_len=30)
    cfg = apply_overrides(
        load_preset("ml-100k-vista-ranking"),
        ["data.max_seq_len=16", "ranking.request_size=4", "model.d_model=8", "model.num_seeds=3",
         "model.summary_layers=1", "model.head_hidden=8", f"model.summary_attention={attention}",
         "ranking.action_inputs=rating,click"],
    )  # fmt: skip
    examples = ranking_data(cfg, data)
    torch.manual_seed(0)
    model = new_ranking_model(cfg, data, examples.events.actions).eval()
    return model, examples, DirectorySummaryStore(tmp_path / "store")


@pytest.mark.parametrize("attention", ["silu", "qla"])
def test_stored_summaries_score_as_recomputed(tmp_path: Path, attention: str):
    model, examples, store = _setup(tmp_path, attention)
    report = export_summaries(model, examples, store, which="test", batch_size=4)
    rows = examples.split.rows("test")
    assert report.summaries == len(rows) == 10 and report.skipped_empty == 0
    keys = request_keys(examples, rows)
    assert [store.versions(u) for u in keys.user_ids] == [[int(v)] for v in keys.versions]

    cached = predict_cached(model, examples, rows, store, batch_size=3)
    recomputed = predict_requests(model, examples, rows, batch_size=5, device=torch.device("cpu"))
    assert cached.shape == recomputed.shape == (10 * 4, 3)
    diff = np.abs(cached - recomputed).max()
    assert 0 < diff < 1e-2  # int8 rounding moves the scores, a little

    # Exactly: stage 2 on the dequantised store equals predict_cached, and stage 2 on the
    # unquantised summaries equals the full forward.
    from flexgr.ranking.batch import request_batch
    from flexgr.ranking.tasks import predictions
    from flexgr.vista.model import prepare

    batch = request_batch(examples.events, examples.requests, rows)
    inputs = prepare(model, batch)
    with torch.no_grad():
        summary = model.summarise(batch, inputs.summary)
        exact = predictions(model.score(summary, batch.candidates, inputs.target), examples.kinds)
        stored = load_summaries(store, keys.user_ids, keys.versions, 3, 8)
        via_store = predictions(model.score(stored, batch.candidates, inputs.target),
                                examples.kinds)  # fmt: skip
    np.testing.assert_allclose(exact.numpy(), recomputed, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(via_store.numpy(), cached, rtol=1e-5, atol=1e-6)
    assert np.abs(stored.numpy() - summary.numpy()).max() <= summary.abs().max() / 254 * 1.001


def test_int4_store_is_coarser_and_missing_keys_fail(tmp_path: Path):
    model, examples, store = _setup(tmp_path)
    rows = examples.split.rows("test")
    recomputed = predict_requests(model, examples, rows, batch_size=16, device=torch.device("cpu"))
    export_summaries(model, examples, store, bits=8)
    err8 = np.abs(predict_cached(model, examples, rows, store) - recomputed).max()
    four = DirectorySummaryStore(tmp_path / "four")
    export_summaries(model, examples, four, bits=4)
    err4 = np.abs(predict_cached(model, examples, rows, four) - recomputed).max()
    assert err4 > err8
    with pytest.raises(KeyError, match="no summary of user"):
        predict_cached(model, examples, examples.split.rows("val"), store)
    with pytest.raises(ValueError, match="val or test"):
        export_summaries(model, examples, store, which="train")
