"""Training under torchrun-style launches (gloo, 2 CPU processes) against one process.

Same config and seed, ``train.batch_size`` the global batch: the per-step losses in metrics.jsonl
must match one process to 1e-4 relative. Dropout stays ON (the tiny config's 0.2): HSTU's
dropout masks are drawn for the whole global batch on every rank and indexed (ReplicatedDropout),
and negatives are drawn the same way, so the draws are those of one process, not just alike in
distribution. (SASRec cannot do that, see test_sasrec_dp2_without_dropout_matches_one_process.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from flexgr.train import Config, RunDir, TrainError, apply_overrides, dump_config, fit
from flexgr.train.checkpoint import load_checkpoint
from flexgr.train.loop import TIMING_KEYS
from tests.conftest import tiny_config
from tests.distributed import train_workers
from tests.distributed.launch import run_world

REL_TOL = 1e-4
# Every step logged; a mid-epoch checkpoint at step 4 for the resume test (checkpoints do not
# change the training, so every run here may share it).
SHORT = ["train.max_steps=6", "train.log_every=1", "train.checkpoint_every=4"]


def config(home: Path, *overrides: str) -> Config:
    return apply_overrides(tiny_config(home, *SHORT), list(overrides))


def fit_single(cfg: Config, run_dir: Path) -> Path:
    fit(cfg, run_dir, console=Console(quiet=True))
    return run_dir


def records(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in RunDir(run_dir).read_metrics()
    ]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if r["kind"] == "train"}


def assert_same_training(parallel: Path, single: Path) -> float:
    """Same records in the same order, per-step losses within REL_TOL; returns the largest
    relative loss difference."""
    got, want = records(parallel), records(single)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    a, b = losses(parallel), losses(single)
    assert sorted(a) == list(range(1, 7))
    worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in b)
    assert worst < REL_TOL, {s: (a[s], b[s]) for s in b}
    for g, w in zip(got, want, strict=True):
        if g["kind"] == "eval":
            # Every user is evaluated once over all ranks (the exact reduction has its own test;
            # here the weights differ in the last bits, which could move a near tie).
            assert g["users"] == w["users"] and g["split"] == w["split"]
            assert abs(g["ndcg@10"] - w["ndcg@10"]) < 0.05
    return worst


@pytest.fixture(scope="module")
def single_run(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_single(config(tiny_home), tmp_path_factory.mktemp("single") / "run")


# The 2-process runs that the tests below compare with one process: (overrides of the one-process
# config, the parallel settings added to it).
WORLD_RUNS = {
    "cp2": ([], ["parallel.cp=2"]),
    "cp2_short": (["data.max_seq_len=3"], ["parallel.cp=2"]),
    "dp2": (["train.batch_size=9"], ["parallel.dp=2"]),
    "sasrec_dp2": (
        ["model.arch=sasrec", "model.dropout=0", "model.attn_dropout=0", "model.input_dropout=0"],
        ["parallel.dp=2"],
    ),
}


def warm(single_run: Path) -> list[str]:
    """A run warm-started from the one-process run's export (train.init_from)."""
    return ["train.batch_size=9", f"train.init_from={single_run}"]


@pytest.fixture(scope="module")
def world_runs(
    tiny_home: Path, single_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Every run of WORLD_RUNS, and dp2_warm, trained one after another by the same two
    processes: they start once (a start imports torch, seconds on CI) and join the gloo group
    once; each fit finds the group and leaves it up for the next, as under a caller that owns
    the group."""
    root = tmp_path_factory.mktemp("world")
    runs = {**WORLD_RUNS, "dp2_warm": (warm(single_run), ["parallel.dp=2"])}
    jobs = [
        (apply_overrides(config(tiny_home, *single), parallel), root / name)
        for name, (single, parallel) in runs.items()
    ]
    run_world(train_workers.fit_many_body, 2, jobs)
    return {name: root / name for name in runs}


@pytest.fixture(scope="module")
def cp2_run(world_runs: dict[str, Path]) -> Path:
    return world_runs["cp2"]


def test_cp2_losses_match_one_process(cp2_run: Path, single_run: Path) -> None:
    assert_same_training(cp2_run, single_run)
    assert load_checkpoint(cp2_run / "checkpoints" / "last.pt")["state"]["step"] == 6


def test_cp2_with_sequences_shorter_than_the_chunks(
    tiny_home: Path, tmp_path: Path, world_runs: dict[str, Path]
) -> None:
    """data.max_seq_len=3: every sequence has 1 to 3 tokens, fewer than the 2C = 4 chunks, so
    chunks are empty and rank 1 holds no token of the 1-token sequences."""
    single = fit_single(config(tiny_home, *WORLD_RUNS["cp2_short"][0]), tmp_path / "single")
    assert_same_training(world_runs["cp2_short"], single)


def test_a_warm_start_under_dp2_matches_one_process(
    world_runs: dict[str, Path], single_run: Path, tiny_home: Path, tmp_path: Path
) -> None:
    """Rank 0 reads train.init_from and broadcasts the weights: both ranks start from them, so
    the losses are one warm-started process's (a rank left cold would move them)."""
    one = fit_single(config(tiny_home, *warm(single_run)), tmp_path / "warm")
    assert_same_training(world_runs["dp2_warm"], one)
    cold = fit_single(config(tiny_home, "train.batch_size=9"), tmp_path / "cold")
    assert losses(cold)[1] != losses(one)[1]  # the warm start changed the first step


def test_dp2_losses_match_one_process_on_the_combined_batch(
    tiny_home: Path, tmp_path: Path, world_runs: dict[str, Path]
) -> None:
    """46 sequences in batches of 9: the sixth batch holds one sequence, so replica 1 has an
    empty batch at step 6 and must still take part (dropout draws, DDP's all-reduce)."""
    single = fit_single(config(tiny_home, *WORLD_RUNS["dp2"][0]), tmp_path / "single")
    assert_same_training(world_runs["dp2"], single)


def test_sasrec_dp2_without_dropout_matches_one_process(
    tiny_home: Path, tmp_path: Path, world_runs: dict[str, Path]
) -> None:
    """SASRec's attention dropout works on a padded local batch, so under DP each rank draws its
    own masks (rank_local_rng) and only the distribution matches; with dropout off the run must
    match exactly as HSTU's does, which also shows that the private draws leave the shared
    generator (the negatives) alone."""
    single = fit_single(config(tiny_home, *WORLD_RUNS["sasrec_dp2"][0]), tmp_path / "single")
    assert_same_training(world_runs["sasrec_dp2"], single)


def test_resume_under_two_processes_ends_like_the_unbroken_run(
    tiny_home: Path, tmp_path: Path, cp2_run: Path, single_run: Path
) -> None:
    cfg = config(tiny_home, "parallel.cp=2")
    broken = tmp_path / "broken"
    with pytest.raises(Exception, match="simulated kill after the checkpoint at step 4"):
        run_world(train_workers.fit_body, 2, cfg, broken, False, 4)
    assert load_checkpoint(broken / "checkpoints" / "last.pt")["state"]["step"] == 4
    assert not (broken / "model.safetensors").exists()
    # The batches are global and the checkpointed RNG state is every rank's, so the same
    # checkpoint can also be continued by one process.
    shutil.copytree(broken, tmp_path / "continued-alone")
    run_world(train_workers.fit_body, 2, RunDir(broken).read_config(), broken, True)
    assert records(broken) == records(cp2_run)
    got, want = load_file(broken / "model.safetensors"), load_file(cp2_run / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    alone = tmp_path / "continued-alone"
    cfg_alone = apply_overrides(RunDir(alone).read_config(), ["parallel.cp=1"])
    fit(cfg_alone, alone, resume=True, console=Console(quiet=True))
    assert_same_training(alone, single_run)


def test_split_evaluation_equals_one_process_exactly(tiny_home: Path) -> None:
    run_world(train_workers.split_eval_body, 2, tiny_home)


# ---------------------------------------------------------------- settings that cannot run


@pytest.mark.parametrize(
    "world, overrides, fragment",
    [
        (None, ["parallel.cp=2"], "parallel.cp=2 does not divide the world size 1"),
        (None, ["parallel.dp=2"], "conflicting parallel settings"),
        ("4", ["parallel.cp=3"], "parallel.cp=3 does not divide the world size 4"),
        ("4", ["parallel.dp=4", "parallel.cp=2"], "parallel.dp=4 x parallel.cp=2 = 8 ranks"),
    ],
)
def test_bad_parallel_settings_fail_before_any_collective(
    tiny_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    world: str | None,
    overrides: list[str],
    fragment: str,
) -> None:
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)  # checked before the process group is joined
    with pytest.raises(TrainError, match=fragment) as err:
        fit(config(tiny_home, *overrides), tmp_path / "run", console=Console(quiet=True))
    if world is None:
        assert "torchrun --nproc-per-node" in str(err.value)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the real command under torchrun


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [*command, "2", "-m", "flexgr", "train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_torchrun_cli_cp2_matches_one_process(
    tiny_home: Path, tmp_path: Path, single_run: Path
) -> None:
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(dump_config(config(tiny_home)))
    run_dir = tmp_path / "run"
    done = torchrun(
        str(config_file),
        "--set",
        "parallel.cp=2",
        "--run-dir",
        str(run_dir),
        "--json",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # rank 0 alone prints, so stdout is one JSON document
    assert summary["run_dir"] == str(run_dir)
    assert_same_training(run_dir, single_run)
    assert RunDir(run_dir).read_config().parallel.cp == 2


def test_torchrun_cli_reports_a_bad_cp_once(tiny_home: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(dump_config(config(tiny_home)))
    done = torchrun(
        str(config_file),
        "--set",
        "parallel.cp=3",
        "--run-dir",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, done.stderr[-3000:]
    assert "parallel.cp=3 does not divide the world size 2" in ours[0]
    # torchrun adds its own failure report; no traceback from flexgr's code.
    assert not any("/flexgr/" in line for line in done.stderr.splitlines() if 'File "' in line)
