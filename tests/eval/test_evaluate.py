from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from flexgr.batch import JaggedBatch
from flexgr.data import RawEvents, build_interactions, make_split
from flexgr.eval import evaluate
from flexgr.model import HSTU, HSTUConfig, SASRec, SASRecConfig, encode


def random_data(users: int = 24, items: int = 25, seed: int = 0):
    rng = np.random.default_rng(seed)
    u, i, t = [], [], []
    for user in range(users):
        n = int(rng.integers(2, 15))
        ts = np.cumsum(rng.integers(1, 10_000, n))
        for k in range(n):
            u.append(f"u{user}")
            i.append(f"i{int(rng.integers(0, items))}")  # repeats allowed
            t.append(int(ts[k]))
    # The catalogue has items nobody rated, as ML-1M's movies.dat does.
    catalog = pa.array([f"i{k}" for k in range(items + 5)])
    return build_interactions("random", RawEvents.from_lists(u, i, t), catalog=catalog)


def brute_force(model, data, split, which, max_seq_len, ks, exclude) -> dict[str, float]:
    model.eval()
    table = model.item_embeddings().double()
    pool = table.shape[0] - 1
    targets = split.val_pos if which == "val" else split.test_pos
    per_user = []
    with torch.no_grad():
        for user in split.users_with(which):
            target = int(targets[user])
            start = max(int(data.user_offsets[user]), target - max_seq_len)
            ids = torch.from_numpy(data.items[start:target].astype(np.int64))
            ts = torch.from_numpy(data.timestamps[start:target])
            query_time = torch.tensor([int(data.timestamps[target])])
            state = encode(model, JaggedBatch(ids, torch.tensor([0, len(ids)]), ts, query_time))
            state = state[-1].double()
            scores = table[1:] @ state
            item = int(data.items[target])
            first = {"all": int(data.user_offsets[user]), "window": start, "none": target}
            seen = set(data.items[first[exclude] : target].tolist())
            rank = sum(
                1
                for other in range(1, pool + 1)
                if other != item and other not in seen and scores[other - 1] >= scores[item - 1]
            )
            per_user.append(rank)
    out = {}
    for k in ks:
        out[f"hr@{k}"] = float(np.mean([r < k for r in per_user]))
        out[f"ndcg@{k}"] = float(
            np.mean([1 / math.log2(r + 2) if r < k else 0.0 for r in per_user])
        )
    out["mrr"] = float(np.mean([1 / (r + 1) for r in per_user]))
    return out


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
@pytest.mark.parametrize("which", ["val", "test"])
@pytest.mark.parametrize(
    ("exclude", "pool"), [("all", "rated"), ("window", "catalog"), ("none", "rated")]
)
def test_evaluate_equals_a_user_by_user_brute_force(
    arch: str, which: str, exclude: str, pool: str
) -> None:
    data = random_data()
    assert data.num_catalog_items > data.num_items
    split = make_split(data, "loo-val")
    torch.manual_seed(0)
    num_items = data.pool_size(pool)
    if arch == "hstu":
        model = HSTU(
            HSTUConfig(num_items=num_items, d_model=8, num_layers=1, dqk=4, dv=4, max_seq_len=6)
        )
        with torch.no_grad():  # large time/position biases: a wrong query time changes ranks
            for layer in model.layers:
                layer.rab.ts_w.normal_(0, 5.0)
                layer.rab.pos_w.normal_(0, 5.0)
    else:
        model = SASRec(
            SASRecConfig(num_items=num_items, d_model=8, num_layers=1, ffn_dim=8, max_seq_len=6)
        )
    ks = [1, 3, 10]
    got = evaluate(
        model,
        data,
        split,
        which,
        max_seq_len=6,
        ks=ks,
        exclude=exclude,
        batch_size=4,
        item_chunk=6,
    )
    expected = brute_force(model, data, split, which, 6, ks, exclude)
    assert got["users"] == len(split.users_with(which))
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_evaluate_restores_training_mode() -> None:
    data = random_data()
    model = HSTU(
        HSTUConfig(num_items=data.num_items, d_model=8, num_layers=1, dqk=4, dv=4, max_seq_len=6)
    )
    model.train()
    evaluate(model, data, make_split(data, "loo-val"), "test", max_seq_len=6)
    assert model.training


def test_gr_compatible_has_no_validation_users() -> None:
    data = random_data()
    model = HSTU(
        HSTUConfig(num_items=data.num_items, d_model=8, num_layers=1, dqk=4, dv=4, max_seq_len=6)
    )
    with pytest.raises(ValueError, match="no user has a val target"):
        evaluate(model, data, make_split(data, "gr-compatible"), "val", max_seq_len=6)
