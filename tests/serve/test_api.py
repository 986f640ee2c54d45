"""The HTTP endpoints, through a real uvicorn server on a free localhost port."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from flexgr.cli.runs import Weights

import flexgr
from flexgr.data import load_prepared
from flexgr.serve.server import BackgroundServer
from tests.serve.conftest import same_ranking
from tests.serve.helpers import server_for, service_for


@pytest.fixture(scope="module")
def server(served_run: Path) -> Iterator[BackgroundServer]:
    with server_for(service_for(served_run, max_k=25), max_body_bytes=8192) as running:
        yield running


def user_history(tiny_home: Path, user: str) -> tuple[list[str], list[int]]:
    data = load_prepared("tiny", data_dir=tiny_home)
    events = data.events_of(data.user_index(user))
    return [data.item_ids[i - 1] for i in data.items[events]], data.timestamps[events].tolist()


def pairs(body: dict) -> list[tuple[str, float]]:
    return [(entry["item"], entry["score"]) for entry in body["items"]]


def test_health_and_metadata(client: httpx.Client, served_run: Path) -> None:
    assert client.get("/health").json() == {"status": "ok", "num_items": 30}
    meta = client.get("/metadata").json()
    rec = flexgr.load(served_run)
    assert meta["arch"] == "hstu" and meta["num_items"] == 30 and meta["users"] == 48
    assert meta["weights"] == "model" and meta["dataset"] == "tiny"
    assert meta["max_seq_len"] == rec.max_seq_len and meta["limits"]["max_k"] == 25
    assert meta["top_k"] == {"method": "exact"} and "dot product" in meta["score"]
    assert meta["model_metadata"]["epoch"] == rec.metadata["epoch"]


def test_recommend_for_a_dataset_user_matches_the_library(
    client: httpx.Client, served_run: Path, tiny_home: Path
) -> None:
    history, times = user_history(tiny_home, "u3")
    expected = flexgr.load(served_run).recommend_scored(history, 5, timestamps=times)
    response = client.post("/recommend", json={"user": "u3", "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    same_ranking(pairs(body), expected)
    assert body["excluded"] == len(set(history)) and body["returned"] == 5
    assert not set(history) & {item for item, _ in pairs(body)}


def test_recommend_for_a_raw_history(client: httpx.Client, served_run: Path) -> None:
    rec = flexgr.load(served_run)
    history, times = ["i4", "i5", "i6", "i7"], [10, 20, 30, 40]
    request = {"history": history, "timestamps": times, "query_time": 55, "k": 25}
    body = client.post("/recommend", json={**request, "exclude": ["i10", "i11", "i12"]}).json()
    expected = rec.recommend_scored(
        history, 25, timestamps=times, query_time=55, exclude=["i10", "i11", "i12"]
    )
    same_ranking(pairs(body), expected)
    # 30 items, 7 left out: fewer than k are left, and the answer says so.
    assert body["returned"] == 23 and body["k"] == 25 and body["excluded"] == 7
    kept = client.post(
        "/recommend", json={"history": ["i4", "i5"], "k": 3, "exclude_history": False}
    ).json()
    assert kept["excluded"] == 0 and kept["returned"] == 3


def test_score_is_the_retrieval_dot_product(client: httpx.Client, served_run: Path) -> None:
    rec = flexgr.load(served_run)
    history, times = ["i1", "i2", "i3"], [1, 2, 3]
    candidates = ["i9", "i1", "i20", "i9"]
    response = client.post(
        "/score", json={"history": history, "timestamps": times, "candidates": candidates}
    )
    assert response.status_code == 200, response.text
    scores = rec.scores(history, times)
    got = response.json()["scores"]
    assert [s["item"] for s in got] == candidates
    for entry in got:
        assert entry["score"] == pytest.approx(float(scores[rec.item_index(entry["item"]) - 1]))


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/recommend", {"user": "ghost"}, 404, "unknown user id 'ghost'"),
        ("/recommend", {"history": ["i1", "nope"]}, 422, "history: unknown item id 'nope'"),
        ("/recommend", {"history": [7]}, 422, "unknown item id '7'"),  # JSON numbers are ids too
        ("/recommend", {"history": ["i1"], "exclude": ["x"]}, 422, "exclude: unknown item"),
        ("/recommend", {"history": []}, 422, "history is empty"),
        ("/recommend", {"history": ["i1"], "k": 0}, 422, "k must be between 1 and 25"),
        ("/recommend", {"history": ["i1"], "k": 26}, 422, "k must be between 1 and 25"),
        ("/recommend", {"history": ["i1"], "k": "many"}, 422, "k:"),
        ("/recommend", {"history": ["i1"], "k": 10**30}, 422, "k must be between"),
        ("/recommend", {}, 422, "either user"),
        ("/recommend", {"user": "u1", "history": ["i1"]}, 422, "either user"),
        ("/recommend", {"user": "u1", "timestamps": [1]}, 422, "timestamps go with history"),
        ("/recommend", {"history": ["i1"], "timestamps": [1, 2]}, 422, "2 timestamps for 1"),
        ("/recommend", {"history": ["i1", "i2"], "timestamps": [5, 3]}, 422, "must not decrease"),
        ("/recommend", {"history": ["i1"], "timestamps": [2**70]}, 422, "out of range"),
        ("/recommend", {"history": ["i1"], "timestamps": [9], "query_time": 3}, 422, "before"),
        ("/recommend", {"history": "i1"}, 422, "history:"),
        ("/recommend", {"history": ["i1"], "colour": "red"}, 422, "colour"),
        ("/recommend", [1, 2], 422, "body"),
        ("/score", {"history": ["i1"], "candidates": []}, 422, "candidates must hold 1"),
        ("/score", {"history": ["i1"], "candidates": ["zz"]}, 422, "candidates: unknown"),
        ("/score", {"history": ["i1"]}, 422, "candidates"),
    ],
)
def test_bad_requests_are_4xx_json(
    client: httpx.Client, path: str, body: object, status: int, fragment: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and fragment in error["message"], error


def test_malformed_oversize_and_misrouted_requests(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    broken = client.post("/recommend", content=b'{"history": [', headers=headers)
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "bad_json"
    big = client.post("/recommend", json={"history": ["i1"] * 5000})  # about 30 KB
    assert big.status_code == 413 and "over the limit of 8,192" in big.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as it arrives
        yield b'{"history": ['
        for _ in range(2000):
            yield b'"i1", '
        yield b'"i1"]}'

    streamed = client.post("/recommend", content=chunks(), headers=headers)
    assert streamed.status_code == 413
    assert client.get("/recommend").status_code == 405
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


def test_concurrent_callers_are_batched_and_each_gets_its_own_answer(
    served_run: Path, tiny_home: Path
) -> None:
    service = service_for(served_run)
    rec = flexgr.load(served_run)
    users = [f"u{i}" for i in range(24)]
    expected = {}
    for user in users:
        history, times = user_history(tiny_home, user)
        expected[user] = rec.recommend_scored(history, 4, timestamps=times)

    async def call_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            # A score request rides in the same batches as the recommendations.
            score = http.post("/score", json={"user": "u0", "candidates": ["i1", "i2"]})
            calls = [http.post("/recommend", json={"user": u, "k": 4}) for u in users]
            return list(await asyncio.gather(*calls, score))

    # A long wait makes the batching certain: all 25 requests arrive within it.
    with server_for(service, max_batch=64, max_wait_ms=300) as server:
        responses = asyncio.run(call_all(server.url))
        stats = httpx.get(server.url + "/metadata").json()["batching"]
    for user, response in zip(users, responses, strict=False):
        assert response.status_code == 200, response.text
        same_ranking(pairs(response.json()), expected[user])
    assert responses[-1].status_code == 200 and len(responses[-1].json()["scores"]) == 2
    assert stats["requests"] == 25 and stats["largest_batch"] > 1, stats


def test_checkpoint_weights(served_run: Path) -> None:
    service = service_for(served_run, Weights.last)
    with server_for(service) as server:
        meta = httpx.get(server.url + "/metadata").json()
        body = httpx.post(server.url + "/recommend", json={"user": "u1", "k": 3}).json()
    assert meta["weights"] == "last" and body["returned"] == 3
