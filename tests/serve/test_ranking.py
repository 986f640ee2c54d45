"""Serving a ranking model: /score through a real uvicorn server on a free localhost port,
checked against ``Ranker.score`` on the same inputs; the history cache; every kind of bad input."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

import flexgr
from flexgr.ranking.scorer import Ranker
from flexgr.serve.errors import RequestError
from flexgr.serve.ranking import RankingService, RankResult
from flexgr.serve.schemas import RankScoreRequest
from flexgr.serve.server import BackgroundServer
from flexgr.train.rundir import RunDir
from flexgr.train.setup import load_dataset
from tests.cli.helpers import assert_one_line_error, run
from tests.serve.helpers import ranking_service_for, server_for

MAX_LEN = 12  # the fixture's data.max_seq_len
CANDIDATES = ["i0", "i3", "i7", "i3"]  # a repeat is scored again, alike


@pytest.fixture(scope="module")
def service(ranking_run: Path) -> RankingService:
    return ranking_service_for(ranking_run, max_candidates=6, microbatch=3)


@pytest.fixture(scope="module")
def ranker(ranking_run: Path) -> Ranker:
    """A separate copy of the model, the reference the server's answers are checked against."""
    loaded = flexgr.load(ranking_run)
    assert isinstance(loaded, Ranker)
    return loaded


def stored(ranking_run: Path, user: str) -> tuple[list[str], list[float], list[int]]:
    """The user's events in the run's dataset (items, ratings, timestamps), oldest first."""
    data = load_dataset(RunDir(ranking_run).read_config())
    events = data.events_of(data.user_index(user))
    items = [data.item_ids[i - 1] for i in data.items[events]]
    return items, data.ratings[events].tolist(), data.timestamps[events].tolist()


def predictions(body: dict) -> list[dict[str, float]]:
    assert [entry["item"] for entry in body["scores"]] == [str(c) for c in CANDIDATES]
    return [entry["predictions"] for entry in body["scores"]]


def same(got: list[dict[str, float]], scored: list[tuple[str, dict[str, float]]]) -> None:
    assert len(got) == len(scored)
    for row, (_, want) in zip(got, scored, strict=True):
        assert row.keys() == want.keys()
        for task, value in want.items():
            assert row[task] == pytest.approx(value, abs=1e-6)


def cache_counts(client: httpx.Client) -> dict[str, int]:
    return client.get("/metadata").json()["history_cache"]


def test_health_and_metadata(client: httpx.Client, ranker: Ranker) -> None:
    assert client.get("/health").json() == {"status": "ok", "num_items": len(ranker.item_ids)}
    meta = client.get("/metadata").json()
    assert meta["task"] == "ranking" and meta["arch"] == "hstu-ranking"
    assert meta["tasks"] == [
        {"name": "like", "kind": "bce", "output": "probability"},
        {"name": "dislike", "kind": "bce", "output": "probability"},
        {"name": "rating", "kind": "mse", "output": "value"},
    ]
    assert meta["action_inputs"] == ["rating"] and meta["layout"] == "interleaved"
    assert meta["max_seq_len"] == MAX_LEN and meta["limits"] == {"max_candidates": 6}
    assert meta["dataset"] == "tinyrank" and meta["users"] == 24 and meta["microbatch"] == 3
    assert "M-FALCON" in meta["score"]
    cache = meta["history_cache"]
    assert cache["enabled"] and cache["max_entries"] == 64


def test_a_dataset_user_matches_the_ranker_and_hits_the_cache_next_time(
    client: httpx.Client, ranker: Ranker, ranking_run: Path
) -> None:
    items, ratings, times = stored(ranking_run, "u5")
    assert len(items) > MAX_LEN  # the server reads the most recent MAX_LEN, as flexgr score does
    expected = ranker.score(
        items[-MAX_LEN:], CANDIDATES, actions=ratings[-MAX_LEN:], timestamps=times[-MAX_LEN:]
    )
    before = cache_counts(client)
    first = client.post("/score", json={"user": "u5", "candidates": CANDIDATES})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["tasks"] == ["like", "dislike", "rating"] and body["history_used"] == MAX_LEN
    assert body["history_cache"] == "miss"
    same(predictions(body), expected)
    assert all(0 < p["like"] < 1 and 0 < p["dislike"] < 1 for p in predictions(body))

    again = client.post("/score", json={"user": "u5", "candidates": CANDIDATES}).json()
    assert again["history_cache"] == "hit"
    same(predictions(again), expected)
    after = cache_counts(client)
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"] + 1
    assert after["entries"] >= 1 and after["bytes"] > 0

    # The time bias reads the query time, so another one is another history: encoded again.
    assert ranker.model.cfg.rel_bias
    later = times[-1] + 86_400
    moved = client.post(
        "/score", json={"user": "u5", "candidates": CANDIDATES, "query_time": later}
    )
    assert moved.json()["history_cache"] == "stale"
    want = ranker.score(
        items[-MAX_LEN:],
        CANDIDATES,
        actions=ratings[-MAX_LEN:],
        timestamps=times[-MAX_LEN:],
        query_time=later,
    )
    same(predictions(moved.json()), want)


def test_a_raw_history_matches_the_ranker_and_its_cache_key_is_checked(
    client: httpx.Client, ranker: Ranker
) -> None:
    history, ratings, times = ["i1", "i4", "i4", "i9"], [5.0, 2.0, None, 4.0], [10, 20, 20, 90]
    body = {
        "history": history,
        "actions": ratings,
        "timestamps": times,
        "query_time": 500,
        "candidates": CANDIDATES,
    }
    rated = [float("nan") if r is None else r for r in ratings]  # null: an unknown rating
    expected = ranker.score(history, CANDIDATES, actions=rated, timestamps=times, query_time=500)

    plain = client.post("/score", json=body).json()
    assert plain["history_cache"] == "off" and plain["history_used"] == 4
    same(predictions(plain), expected)
    by_name = client.post("/score", json={**body, "actions": {"rating": ratings}}).json()
    same(predictions(by_name), expected)

    keyed = {**body, "cache_key": "caller-7"}
    assert client.post("/score", json=keyed).json()["history_cache"] == "miss"
    hit = client.post("/score", json=keyed).json()
    assert hit["history_cache"] == "hit"
    same(predictions(hit), expected)

    changed = {**keyed, "actions": [5.0, 2.0, 1.0, 4.0]}  # the same key, a new history
    answer = client.post("/score", json=changed).json()
    assert answer["history_cache"] == "stale"
    want = ranker.score(
        history, CANDIDATES, actions=[5.0, 2.0, 1.0, 4.0], timestamps=times, query_time=500
    )
    same(predictions(answer), want)


def test_a_long_history_is_refused_unless_truncate(client: httpx.Client, ranker: Ranker) -> None:
    n = MAX_LEN + 3
    history = [f"i{i % 30}" for i in range(n)]
    ratings = [float(1 + i % 5) for i in range(n)]
    body = {"history": history, "actions": ratings, "candidates": CANDIDATES}
    refused = client.post("/score", json=body)
    assert refused.status_code == 422 and "reads at most 12" in refused.text
    answer = client.post("/score", json={**body, "truncate": True}).json()
    assert answer["history_used"] == MAX_LEN
    same(predictions(answer), ranker.score(history, CANDIDATES, actions=ratings, truncate=True))


def test_concurrent_requests_each_get_their_own_answer(
    server: BackgroundServer, ranker: Ranker, ranking_run: Path
) -> None:
    users = [f"u{u}" for u in range(8)]
    expected = {}
    for user in users:
        items, ratings, times = stored(ranking_run, user)
        keep = slice(max(0, len(items) - MAX_LEN), len(items))
        expected[user] = ranker.score(
            items[keep], CANDIDATES, actions=ratings[keep], timestamps=times[keep]
        )

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            calls = [http.post("/score", json={"user": u, "candidates": CANDIDATES}) for u in users]
            return await asyncio.gather(*calls)

    for user, response in zip(users, asyncio.run(send_all()), strict=True):
        assert response.status_code == 200, response.text
        same(predictions(response.json()), expected[user])


def test_recommend_is_refused_with_a_json_error(client: httpx.Client) -> None:
    response = client.post("/recommend", json={"user": "u1", "k": 3})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "not_supported" and "POST /score" in error["message"]


HISTORY = {"history": ["i1", "i2"], "actions": [4, 3]}


@pytest.mark.parametrize(
    ("body", "status", "kind", "fragment"),
    [
        ({"user": "nobody", "candidates": ["i1"]}, 404, "unknown_user", "unknown user id"),
        ({"user": "u1", "candidates": ["i1", "x"]}, 422, "unknown_item", "candidates: unknown"),
        ({**HISTORY, "history": ["i1", "zz"], "candidates": ["i1"]}, 422, "unknown_item", "'zz'"),
        ({"user": "u1", "candidates": []}, 422, "invalid_request", "1 to 6 item ids, got 0"),
        ({"user": "u1", "candidates": ["i1"] * 7}, 422, "invalid_request", "got 7"),
        ({"candidates": ["i1"]}, 422, "invalid_request", "either user"),
        ({**HISTORY, "user": "u1", "candidates": ["i1"]}, 422, "invalid_request", "either user"),
        ({"user": "u1", "actions": [4], "candidates": ["i1"]}, 422, "invalid_request", "actions"),
        ({"user": "u1", "cache_key": "k", "candidates": ["i1"]}, 422, "invalid_request", "cache"),
        ({"history": ["i1"], "candidates": ["i1"]}, 422, "invalid_request", "actions"),
        ({**HISTORY, "actions": [4], "candidates": ["i1"]}, 422, "invalid_request", "1 'rating'"),
        ({**HISTORY, "actions": [4, 9], "candidates": ["i1"]}, 422, "invalid_request", "0.5 .. 5"),
        ({**HISTORY, "actions": [4, "a"], "candidates": ["i1"]}, 422, "invalid_request", "actions"),
        (
            {**HISTORY, "actions": {"rating": [4, 3], "click": [0, 1]}, "candidates": ["i1"]},
            422,
            "invalid_request",
            "unknown: click",
        ),
        (
            {**HISTORY, "actions": {"click": [0, 1]}, "candidates": ["i1"]},
            422,
            "invalid_request",
            "missing: rating",
        ),
        ({"history": [], "actions": [], "candidates": ["i1"]}, 422, "invalid_request", "empty"),
        ({**HISTORY, "timestamps": [5], "candidates": ["i1"]}, 422, "invalid_request", "1 times"),
        ({**HISTORY, "timestamps": [5, 1], "candidates": ["i1"]}, 422, "invalid_request", "decr"),
        (
            {**HISTORY, "timestamps": [5, 9], "query_time": 6, "candidates": ["i1"]},
            422,
            "invalid_request",
            "before the last event",
        ),
        ({**HISTORY, "cache_key": "", "candidates": ["i1"]}, 422, "invalid_request", "cache_key"),
        ({**HISTORY, "k": 3, "candidates": ["i1"]}, 422, "invalid_request", "k: Extra inputs"),
    ],
)
def test_bad_requests_get_a_4xx_json_error(
    client: httpx.Client, body: dict, status: int, kind: str, fragment: str
) -> None:
    response = client.post("/score", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and fragment in error["message"], error


def test_infinite_and_bad_json_bodies(client: httpx.Client) -> None:
    infinite = b'{"history": ["i1"], "actions": [Infinity], "candidates": ["i1"]}'
    response = client.post("/score", content=infinite, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "finite" in response.text
    broken = client.post("/score", content=b"{", headers={"content-type": "application/json"})
    assert broken.status_code == 400


def test_a_job_the_model_refuses_leaves_its_batch_mates_answered(service: RankingService) -> None:
    good = service.score_job(RankScoreRequest(history=["i1"], actions=[4], candidates=["i2"]))
    bad = service.score_job(RankScoreRequest(history=["i1"], actions=[0.1], candidates=["i2"]))
    results = service.run_batch([good, bad, good])
    assert isinstance(results[0], RankResult) and isinstance(results[2], RankResult)
    assert results[0].predictions == results[2].predictions
    assert isinstance(results[1], RequestError) and results[1].status == 422


def test_without_dataset_users_a_user_id_is_404(ranking_run: Path) -> None:
    service = ranking_service_for(ranking_run, users=False, cache_entries=0)
    with server_for(service) as running, httpx.Client(base_url=running.url) as http:
        refused = http.post("/score", json={"user": "u1", "candidates": ["i1"]})
        assert refused.status_code == 404 and refused.json()["error"]["type"] == "no_users"
        body = {"history": ["i1"], "actions": [4], "cache_key": "a", "candidates": ["i1"]}
        assert http.post("/score", json=body).json()["history_cache"] == "off"  # cache off
        assert not http.get("/metadata").json()["history_cache"]["enabled"]


def test_serve_command_serves_a_ranking_run(
    ranking_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flexgr serve`` on a ranking run, in this process: the command builds the app and binds
    the socket as always; the server runs in a thread here (test_cli_serve.py runs the whole
    command in a subprocess, signals included) while requests check what the options set."""
    import flexgr.serve.server as server_module

    answers: dict[str, object] = {}

    def serve_briefly(app: object, sock: socket.socket, *, log_level: str = "warning") -> None:
        server = server_module.make_server(app, log_level=log_level)  # type: ignore[arg-type]
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            while not server.started:
                assert thread.is_alive()
                time.sleep(0.01)
            with httpx.Client(base_url=server_module.url_of(sock), timeout=30) as client:
                answers["metadata"] = client.get("/metadata").json()
                body = {"user": "u2", "candidates": ["i1", "i2", "i3"]}
                answers["first"] = client.post("/score", json=body).json()
                answers["second"] = client.post("/score", json=body).json()
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    monkeypatch.setattr(server_module, "serve", serve_briefly)
    result = run(
        "serve", "--run-dir", ranking_run, "--port", "0", "--microbatch", "2",
        "--history-cache", "8", "--max-candidates", "5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "24 users of tinyrank; ranking: like, dislike, rating) on http://" in result.stdout
    meta = answers["metadata"]
    assert isinstance(meta, dict) and meta["task"] == "ranking" and meta["microbatch"] == 2
    assert meta["history_cache"]["max_entries"] == 8
    assert meta["limits"] == {"max_candidates": 5}
    assert answers["first"]["history_cache"] == "miss"  # type: ignore[index]
    assert answers["second"]["history_cache"] == "hit"  # type: ignore[index]


def test_serve_ann_on_a_ranking_run_is_a_one_line_error(ranking_run: Path) -> None:
    result = run("serve", "--run-dir", ranking_run, "--ann")
    assert_one_line_error(result, "--ann ranks a retrieval model's item table")


def test_warm_up_scores_each_shape_and_leaves_answers_unchanged(service: RankingService) -> None:
    job = service.score_job(
        RankScoreRequest(history=["i1", "i5"], actions=[4, 2], candidates=["i2"])
    )
    before = service.run_batch([job])
    # history lengths 1, 6, 12 x candidate counts 1 and a full microbatch (3)
    assert service.warm_up(max_batch=4) == 6
    assert service.run_batch([job]) == before


def test_serve_threads_sets_torch_threads(
    ranking_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--threads N is torch.set_num_threads(N) before the model serves (restored afterwards,
    as the setting is process-wide)."""
    import torch

    import flexgr.serve.server as server_module

    seen: list[int] = []
    monkeypatch.setattr(
        server_module, "serve", lambda app, sock, **_: seen.append(torch.get_num_threads())
    )
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    try:
        result = run("serve", "--run-dir", ranking_run, "--port", "0", "--threads", str(target))
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    assert seen == [target]
