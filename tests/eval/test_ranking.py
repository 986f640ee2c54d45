from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgr.eval import target_ranks, top_k


def table_1d(*scores: float) -> torch.Tensor:
    """An item table whose item i scores ``scores[i - 1]`` against the query [1.0]."""
    return torch.tensor([[0.0], *[[s] for s in scores]])


def jagged(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    items = torch.tensor([i for row in lists for i in row], dtype=torch.int64)
    offsets = torch.tensor([0, *torch.tensor([len(r) for r in lists]).cumsum(0).tolist()])
    return items, offsets


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_ranks_by_hand(chunk: int) -> None:
    table = table_1d(0.9, 0.5, 0.7, 0.1, 0.8)  # items 1..5
    queries = torch.ones(3, 1)
    targets = torch.tensor([3, 3, 4])
    # user 0: nothing excluded -> items 1 (0.9) and 5 (0.8) beat item 3 (0.7): rank 2
    # user 1: items 1 and 3 excluded -> the target still counts; only item 5 beats it: rank 1
    # user 2: target 4 (0.1) is last of 5, item 2 excluded -> rank 3
    exclude, offsets = jagged([[], [1, 3], [2]])
    got = target_ranks(queries, table, targets, exclude, offsets, chunk_size=chunk)
    assert got.tolist() == [2, 1, 3]


def test_ties_count_against_the_target_and_nan_ranks_last() -> None:
    table = table_1d(0.5, 0.5, 0.5, 0.2)
    got = target_ranks(torch.ones(1, 1), table, torch.tensor([2]), chunk_size=2)
    assert got.tolist() == [2]  # items 1 and 3 tie with the target and are ranked ahead
    nan = target_ranks(torch.full((1, 1), float("nan")), table, torch.tensor([2]))
    assert nan.tolist() == [4]


def test_padding_item_is_never_ranked() -> None:
    table = torch.tensor([[10.0], [0.1], [0.2]])  # row 0 would win if it were an item
    assert target_ranks(torch.ones(1, 1), table, torch.tensor([2])).tolist() == [0]


@settings(max_examples=40, deadline=None)
@given(
    num_items=st.integers(1, 40),
    users=st.integers(1, 6),
    chunk=st.integers(1, 50),
    k=st.integers(1, 45),
    seed=st.integers(0, 10_000),
)
def test_chunked_ranking_equals_brute_force(
    num_items: int, users: int, chunk: int, k: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(num_items + 1, 4, generator=g, dtype=torch.float64)
    queries = torch.randn(users, 4, generator=g, dtype=torch.float64)
    targets = torch.randint(1, num_items + 1, (users,), generator=g)
    lists = [
        torch.randint(
            1, num_items + 1, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(users)
    ]
    exclude, offsets = jagged(lists)
    scores = queries @ table[1:].T  # [users, items]
    expected_ranks, expected_top = [], []
    for u in range(users):
        banned = set(lists[u])
        s_t = scores[u, targets[u] - 1]
        others = [i for i in range(1, num_items + 1) if i != targets[u] and i not in banned]
        expected_ranks.append(sum(1 for i in others if scores[u, i - 1] >= s_t))
        allowed = [i for i in range(1, num_items + 1) if i not in banned]
        expected_top.append(sorted(allowed, key=lambda i: -scores[u, i - 1].item())[:k])
    got = target_ranks(queries, table, targets, exclude, offsets, chunk_size=chunk)
    assert got.tolist() == expected_ranks
    best_scores, best_items = top_k(queries, table, k, exclude, offsets, chunk_size=chunk)
    for u in range(users):
        kept = [
            i for i, s in zip(best_items[u].tolist(), best_scores[u].tolist()) if s != float("-inf")
        ]
        assert kept == expected_top[u]
