"""Approximate top-k with FAISS: exact when every cell is probed, and in the server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from flexgr.eval.ranking import top_k
from tests.serve.helpers import server_for, service_for

faiss = pytest.importorskip("faiss")

from flexgr.serve.ann import ApproximateIndex, default_lists


def clustered_table(items: int, dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=generator)
    owner = torch.randint(20, (items,), generator=generator)
    rows = centres[owner] + 0.3 * torch.randn(items, dim, generator=generator)
    return torch.cat([torch.zeros(1, dim), torch.nn.functional.normalize(rows, dim=1)])


def test_probing_every_cell_is_exact_and_fewer_cells_recall_less() -> None:
    table = clustered_table(3000, 16)
    queries = torch.nn.functional.normalize(torch.randn(40, 16), dim=1)
    exact_scores, exact_items = top_k(queries, table, 10)
    index = ApproximateIndex(table, lists=32, probe=32)
    scores, items = index.search(queries, 10)
    assert torch.equal(items, exact_items)
    assert torch.allclose(scores, exact_scores, atol=1e-5)
    index._index.nprobe = 1
    _, rough = index.search(queries, 10)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(rough, exact_items)) / 400
    assert 0 < recall < 1  # one cell of 32 misses some of the true top 10


def test_exclusions_and_short_results() -> None:
    table = clustered_table(200, 8)
    index = ApproximateIndex(table, lists=4, probe=4)
    query = table[5:6]
    banned = torch.tensor([5, 6, 7])
    _, items = index.search(query, 10, [banned])
    _, exact = top_k(query, table, 10, banned, torch.tensor([0, 3]))
    assert torch.equal(items, exact) and not set(items[0].tolist()) & {5, 6, 7}
    scores, items = index.search(query, 199, [banned])  # only 197 are left
    assert (items[0, -2:] == 0).all() and torch.isinf(scores[0, -2:]).all()
    assert default_lists(1_000_000) == 4000 and default_lists(30) == 1


def test_server_with_ann(served_run: Path) -> None:
    service = service_for(served_run)
    exact = service_for(served_run)
    service.ann = ApproximateIndex(service.table, lists=1, probe=1)  # one cell: exact again
    with server_for(service) as approx_server, server_for(exact) as exact_server:
        got = httpx.post(approx_server.url + "/recommend", json={"user": "u2", "k": 5}).json()
        want = httpx.post(exact_server.url + "/recommend", json={"user": "u2", "k": 5}).json()
        meta = httpx.get(approx_server.url + "/metadata").json()
    assert got["approximate"] and not want["approximate"]
    assert [e["item"] for e in got["items"]] == [e["item"] for e in want["items"]]
    assert meta["top_k"]["method"] == "faiss IVF-Flat"


def test_exact_top_k_matches_the_evaluation_ranking() -> None:
    from flexgr.serve.topk import exact_top_k

    table = clustered_table(500, 8, seed=3)
    queries = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    banned = [torch.tensor([1, 2, 3]), torch.tensor([], dtype=torch.int64)] * 3
    offsets = torch.tensor([0, 3, 3, 6, 6, 9, 9])
    want_scores, want_items = top_k(queries, table, 20, torch.cat(banned), offsets)
    scores, items = exact_top_k(queries, table[1:], 20, banned)
    assert torch.equal(items, want_items) and torch.allclose(scores, want_scores)
