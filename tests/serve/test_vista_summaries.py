"""``flexgr serve --summaries``: a VISTA run's /score for a user from the user's stored summary
(stage 2 only), through a real server, checked against ``predict_cached`` and the full model;
the version picked by the request time; the packing of a batch's summary jobs; the errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import flexgr
from flexgr.ranking.evaluate import predict_requests
from flexgr.ranking.scorer import Ranker
from flexgr.ranking.setup import RankingData, ranking_data
from flexgr.ranking.tasks import predictions
from flexgr.serve.ranking import RankingService, RankResult
from flexgr.serve.schemas import RankScoreRequest
from flexgr.serve.summaries import SummaryJob, SummaryResult, SummaryServing, candidate_passes
from flexgr.train.rundir import RunDir
from flexgr.train.setup import load_dataset
from flexgr.vista.cache import (
    DirectorySummaryStore,
    dequantise,
    export_summaries,
    predict_cached,
    quantise,
)
from flexgr.vista.model import prepare_stage2
from tests.cli.helpers import assert_one_line_error, run
from tests.serve.helpers import ranking_service_for

QUANTISATION_TOLERANCE = 1e-2  # int8 summaries move predictions this little (tests/vista)
# A few steps of training leave the exported summaries close to the seeds (users' summaries
# differ by about 1e-3), too close to tell versions or users apart by their scores; so the
# version and packing checks also read planted users with random, clearly different summaries.
PLANTED_USERS = ["planted-a", "planted-b", "planted-c"]
PLANTED_VERSIONS = [100, 200, 300]
CANDIDATES = ["i0", "i3", "i7", "i3"]  # a repeat is scored again, alike


@dataclass(frozen=True)
class Request:
    """One val or test request of the run's data: whose, its summary's version, its
    impressions (raw item ids) and what ``predict_cached`` and the full model predict."""

    user: str
    version: int
    candidates: list[str]
    history: list[str]
    ratings: list[float]
    timestamps: list[int]
    cached: np.ndarray  # [M, K]
    full: np.ndarray  # [M, K]


@dataclass(frozen=True)
class Reference:
    store: DirectorySummaryStore
    val: dict[str, Request]
    test: dict[str, Request]
    tasks: list[str]
    ranker: Ranker  # a separate copy of the served model

    def planted(self, user: str, version: int, candidates: list[str]) -> np.ndarray:
        """[M, K]: the model's stage 2 on the stored summary (``VistaRanker.score`` itself)."""
        model = self.ranker.model
        summary = torch.from_numpy(dequantise(self.store.get(user, version)))[None]
        items = torch.tensor([self.ranker.item_index(c) for c in candidates])
        target = prepare_stage2(model, torch.tensor([0, len(candidates)]), len(candidates))
        with torch.no_grad():
            logits = model.score(summary, items, target)
        return predictions(logits.float(), list(model.cfg.task_kinds)).numpy()


def requests_of(
    examples: RankingData, model: torch.nn.Module, store: DirectorySummaryStore, which: str
) -> dict[str, Request]:
    rows = examples.split.rows(which)
    cached = predict_cached(model, examples, rows, store)  # type: ignore[arg-type]
    full = predict_requests(model, examples, rows, batch_size=64, device=torch.device("cpu"))
    chosen, data, events = examples.requests.take(rows), examples.data, examples.events
    out, at = {}, 0
    for r in range(len(rows)):
        lo, hi, first = int(chosen.start[r]), int(chosen.end[r]), int(chosen.history_start[r])
        raw = [data.item_ids[i - 1] for i in events.items[first:hi]]
        user = data.user_ids[int(chosen.user[r])]
        out[user] = Request(
            user=user,
            version=int(events.timestamps[lo - 1]),
            candidates=raw[lo - first :],
            history=raw[: lo - first],
            ratings=data.ratings[first:lo].tolist(),
            timestamps=events.timestamps[first:lo].tolist(),
            cached=cached[at : at + hi - lo],
            full=full[at : at + hi - lo],
        )
        at += hi - lo
    assert at == len(cached)
    return out


@pytest.fixture(scope="module")
def reference(vista_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Two versions per user (the history before its val request, and before its test
    request), exported by a separate copy of the model, and what the cached and full paths
    predict for every request."""
    cfg = RunDir(vista_run).read_config()
    data = load_dataset(cfg)
    examples = ranking_data(cfg, data)
    assert (examples.events.items == data.items).all()  # event indices are the dataset's
    ranker = flexgr.load(vista_run)
    assert isinstance(ranker, Ranker)
    model = ranker.model.eval()
    store = DirectorySummaryStore(tmp_path_factory.mktemp("summaries") / "store")
    for which in ("val", "test"):
        export_summaries(model, examples, store, which=which)  # type: ignore[arg-type]
    val, test = (requests_of(examples, model, store, w) for w in ("val", "test"))
    rng = np.random.default_rng(0)
    shape = (model.cfg.num_seeds, model.cfg.d_model)
    for user in PLANTED_USERS:
        for version in PLANTED_VERSIONS:
            store.put(user, version, quantise(rng.standard_normal(shape).astype(np.float32)))
    return Reference(store, val, test, list(cfg.ranking.tasks), ranker)


@pytest.fixture(scope="module")
def service(vista_run: Path, reference: Reference) -> RankingService:
    built = ranking_service_for(vista_run, max_candidates=8, microbatch=3)
    built.summaries = SummaryServing(built.ranker, DirectorySummaryStore(reference.store.root))
    return built


def as_array(body: dict, tasks: list[str], candidates: list[str]) -> np.ndarray:
    assert [entry["item"] for entry in body["scores"]] == candidates
    return np.array([[entry["predictions"][t] for t in tasks] for entry in body["scores"]])


def score(client: httpx.Client, user: str, candidates: list[str], at: int | None = None) -> dict:
    body: dict = {"user": user, "candidates": candidates}
    if at is not None:
        body["query_time"] = at
    answer = client.post("/score", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_metadata_reports_the_summary_store(client: httpx.Client, reference: Reference) -> None:
    meta = client.get("/metadata").json()
    assert meta["arch"] == "vista-ranking"
    summaries = meta["summaries"]
    assert summaries["served"] is True and summaries["kind"] == "directory"
    assert summaries["store"] == str(reference.store.root)
    assert summaries["users"] == len(reference.test) + len(PLANTED_USERS) == 24 + 3
    assert summaries["bits"] == [8] and summaries["num_seeds"] == 3


def test_score_from_summaries_equals_predict_cached_and_the_full_model_within_int8(
    client: httpx.Client, reference: Reference
) -> None:
    largest = 0.0
    for user, request in reference.test.items():
        body = score(client, user, request.candidates)  # no time: the newest summary
        assert body["summary"] == {"user": user, "version": request.version, "bits": 8}
        assert body["history_used"] is None and "stage 2" in body["method"]
        got = as_array(body, reference.tasks, request.candidates)
        np.testing.assert_allclose(got, request.cached, rtol=0, atol=1e-6)
        largest = max(largest, float(np.abs(got - request.full).max()))
    assert 0 < largest < QUANTISATION_TOLERANCE  # the int8 rounding is real, and small


def check_versions_follow_the_request_time(client: httpx.Client, reference: Reference) -> None:
    """Planted users with versions 100, 200, 300: a request time picks the newest version at or
    before it (no time: the newest), scored as the model scores that summary."""
    first, second, third = PLANTED_VERSIONS
    times = [(first, first), (first + 1, first), (second - 1, first), (second, second),
             (third + 10**6, third), (None, third)]  # fmt: skip
    for user in PLANTED_USERS:
        by_version = {v: reference.planted(user, v, CANDIDATES) for v in PLANTED_VERSIONS}
        for at, version in times:
            body = score(client, user, CANDIDATES, at)
            assert body["summary"] == {"user": user, "version": version, "bits": 8}
            got = as_array(body, reference.tasks, CANDIDATES)
            np.testing.assert_allclose(got, by_version[version], rtol=0, atol=1e-6)
        # The planted summaries' scores differ by far more than the 1e-6 compared to (the
        # barely trained stage 2 reads a summary weakly): the version matters.
        assert np.abs(by_version[first] - by_version[third]).max() > 1e-4


def test_the_version_served_is_the_latest_at_or_before_the_request_time(
    client: httpx.Client, reference: Reference
) -> None:
    check_versions_follow_the_request_time(client, reference)


def test_a_planted_version_bug_fails_the_version_check(
    client: httpx.Client, reference: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bug: always the newest version, whatever the request time.
    monkeypatch.setattr(
        "flexgr.serve.summaries.latest_version", lambda store, user, at: store.versions(user)[-1]
    )
    with pytest.raises(AssertionError):
        check_versions_follow_the_request_time(client, reference)


def test_no_summary_at_or_before_the_request_time_is_a_404(
    client: httpx.Client, reference: Reference
) -> None:
    before = client.get("/metadata").json()["summaries"]["missing"]
    user, val = next(iter(reference.val.items()))
    early = client.post(
        "/score", json={"user": user, "candidates": val.candidates, "query_time": val.version - 1}
    )
    assert early.status_code == 404
    error = early.json()["error"]
    assert error["type"] == "no_summary"
    assert f"at or before query_time {val.version - 1}" in error["message"]
    assert f"the earliest is {val.version}" in error["message"]
    nobody = client.post("/score", json={"user": "nobody", "candidates": val.candidates})
    assert nobody.status_code == 404 and nobody.json()["error"]["type"] == "no_summary"
    assert client.get("/metadata").json()["summaries"]["missing"] == before + 2


def test_user_requests_refuse_history_fields_and_bad_times(
    client: httpx.Client, reference: Reference
) -> None:
    user, test = next(iter(reference.test.items()))
    cases = [
        ({"actions": [4.0]}, "actions go with history"),
        ({"query_time": 2**62}, "query_time 4611686018427387904 is out of range"),
        ({"candidates": ["nope"]}, "candidates: unknown item id 'nope'"),
    ]
    for extra, message in cases:
        answer = client.post("/score", json={"user": user, "candidates": test.candidates, **extra})
        assert answer.status_code == 422 and message in answer.json()["error"]["message"]


def test_a_history_request_still_runs_the_full_model(
    client: httpx.Client, reference: Reference, vista_run: Path
) -> None:
    test = next(iter(reference.test.values()))
    body = {"history": test.history, "actions": test.ratings, "timestamps": test.timestamps,
            "candidates": test.candidates}  # fmt: skip
    answer = client.post("/score", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert "summary" not in result and result["history_used"] == len(test.history)
    ranker = flexgr.load(vista_run)
    assert isinstance(ranker, Ranker)
    expected = ranker.score(
        test.history, test.candidates, actions=test.ratings, timestamps=test.timestamps
    )
    want = np.array([[p[t] for t in reference.tasks] for _, p in expected])
    got = as_array(result, reference.tasks, test.candidates)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, test.full, rtol=0, atol=1e-6)  # the same full model


def check_packed_batch(service: RankingService, reference: Reference) -> None:
    """Summary jobs of several users in one batch (microbatch 3: jobs split over passes, passes
    holding several users), with a history job among them, score as each alone."""
    first = next(iter(reference.test.values()))
    users = [*PLANTED_USERS, first.user]
    jobs: list = []
    for n, user in enumerate(users):
        candidates = CANDIDATES[: 1 + n]  # 1 to 4 candidates: some span two passes
        jobs.append(service.score_job(RankScoreRequest(user=user, candidates=candidates)))
    history = RankScoreRequest(
        history=first.history, actions=first.ratings, timestamps=first.timestamps,
        candidates=first.candidates,
    )  # fmt: skip
    jobs.insert(2, service.score_job(history))
    together = service.run_batch(jobs)
    for job, result in zip(jobs, together, strict=True):
        (alone,) = service.run_batch([job])
        if isinstance(job, SummaryJob):
            assert isinstance(result, SummaryResult) and isinstance(alone, SummaryResult)
        else:
            assert isinstance(result, RankResult) and isinstance(alone, RankResult)
        for got, want in zip(result.predictions, alone.predictions, strict=True):
            assert got == pytest.approx(want, abs=1e-6)
        if isinstance(job, SummaryJob) and job.user in PLANTED_USERS:
            got = np.array([[p[t] for t in reference.tasks] for p in result.predictions])
            want = reference.planted(job.user, PLANTED_VERSIONS[-1], job.candidates)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_summary_jobs_packed_in_one_batch_score_as_alone(
    service: RankingService, reference: Reference
) -> None:
    check_packed_batch(service, reference)


def test_a_planted_packing_bug_fails_the_batch_check(
    service: RankingService, reference: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flexgr.serve import summaries

    real = summaries.score_summaries

    def shifted(model, summary_BSD, *rest):  # each sequence reads its neighbour's summary
        return real(model, summary_BSD.roll(1, 0), *rest)

    monkeypatch.setattr(summaries, "score_summaries", shifted)
    with pytest.raises(AssertionError):
        check_packed_batch(service, reference)


@pytest.mark.parametrize("counts,microbatch", [([2, 0, 5, 1], 3), ([7], 2), ([1, 1, 1], 8)])
def test_candidate_passes_cover_each_candidate_once(counts: list[int], microbatch: int) -> None:
    passes = candidate_passes(counts, microbatch)
    seen = {j: [] for j in range(len(counts))}
    for group in passes:
        assert sum(hi - lo for _, lo, hi in group) <= microbatch
        for j, lo, hi in group:
            assert 0 <= lo < hi <= counts[j]
            seen[j].extend(range(lo, hi))
    assert seen == {j: list(range(c)) for j, c in enumerate(counts)}


def test_serve_summaries_errors_are_one_line(
    ranking_run: Path, vista_run: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    assert_one_line_error(
        run("serve", "--run-dir", ranking_run, "--summaries", store),
        "--summaries:",
        "is a hstu-ranking run; stored summaries are served for vista-ranking runs only",
    )
    assert_one_line_error(
        run("serve", "--run-dir", vista_run, "--summaries", store),
        f"--summaries {store}: {store} is not a directory",
    )
    store.mkdir()
    assert_one_line_error(
        run("serve", "--run-dir", vista_run, "--summaries", store), "holds no summaries"
    )
