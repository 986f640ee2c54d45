"""The run directory's exclusive lock: a second trainer fails at once, naming the holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flexgr.train import dump_config
from flexgr.train.rundir import RunDir, RunDirBusy, RunDirError
from tests.cli.helpers import assert_one_line_error, run
from tests.conftest import tiny_config

HOLD = """
import sys, time
from pathlib import Path
from flexgr.train.rundir import RunDir
with RunDir(Path(sys.argv[1])).lock():
    print("locked", flush=True)
    time.sleep(60)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(60, process.kill)  # never outlives the test by much
    watchdog.daemon = True
    watchdog.start()
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def test_a_held_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(
            RunDirBusy, match=f"in use by another flexgr process \\(pid {holder.pid}\\)"
        ):
            RunDir(run_dir).lock().acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup at all: the kernel drops the lock
        holder.wait(timeout=10)
    assert (run_dir / ".lock").exists()  # the stale file does not block
    with RunDir(run_dir).lock():
        assert (run_dir / ".lock").read_text().strip() == str(os.getpid())


def test_the_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    with run.lock(), run.lock():  # the CLI and fit() may both take it
        pass
    with run.lock():
        pass


def test_a_file_is_not_a_run_directory(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(RunDirError, match="is not a directory"):
        RunDir(path).lock().acquire()


def test_a_second_trainer_on_the_same_run_dir_fails_at_once(
    tiny_home: Path, tmp_path: Path
) -> None:
    config = tmp_path / "long.toml"
    config.write_text(dump_config(tiny_config(tiny_home, "train.max_epochs=10000")))
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "flexgr", "train", str(config), "--run-dir", str(run_dir), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "metrics.jsonl").exists():  # it trains, holding the lock
            assert first.poll() is None and time.monotonic() < deadline, "trainer did not start"
            time.sleep(0.05)
        started = time.monotonic()
        second = run("train", config, "--run-dir", run_dir, "-q")
        assert time.monotonic() - started < 10  # at once, not after the first one's run
        assert_one_line_error(second, f"{run_dir} is in use", f"pid {first.pid}")
        resumed = run("train", "--run-dir", run_dir, "--resume", "-q")
        assert_one_line_error(resumed, f"pid {first.pid}")
    finally:
        first.kill()
        first.wait(timeout=10)
    records = RunDir(run_dir).read_metrics()
    assert not any(r.get("final") for r in records)  # nothing of a second run got in


def test_a_run_that_fails_before_it_starts_leaves_no_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "new" / "run"
    with RunDir(run_dir).lock():
        assert run_dir.is_dir()
    assert not (tmp_path / "new").exists()  # only the lock was there: all of it goes
    kept = tmp_path / "kept"
    with RunDir(kept).lock():
        (kept / "config.toml").write_text("")
    assert (kept / ".lock").exists() and (kept / "config.toml").exists()
    assert_one_line_error(
        run("train", "--set", "parallel.cp=2", "--run-dir", tmp_path / "cp" / "run"),
        "does not divide the world size",
    )
    assert not (tmp_path / "cp").exists()
