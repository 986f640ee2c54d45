"""OS errors on the run directory and unreadable configs: one ``error:`` line naming the path
and what was kept, nothing half-written, and a resume that loses nothing."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
from flexgr.cli.keep import checkpoint_state

import flexgr.atomic
import flexgr.train.rundir
from flexgr.train import dump_config
from flexgr.train.rundir import RunDir
from tests.cli.helpers import assert_one_line_error, run
from tests.conftest import tiny_config


@pytest.fixture
def config(tiny_home: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(dump_config(tiny_config(tiny_home, "train.max_epochs=3")))
    return path


class FullDisk(io.FileIO):
    """A file on a full disk: opening works, writing fails as the kernel's write(2) does."""

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, name: str, allowed: int) -> None:
    """Writes of ``name`` (through flexgr.atomic's temp files) fail after ``allowed`` of them."""
    count = {"n": 0}

    def fake_open(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if Path(str(path)).name.startswith(f".{name}.tmp-") and "w" in mode:
            count["n"] += 1
            if count["n"] > allowed:
                return FullDisk(str(path), "w")
        return open(path, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(flexgr.atomic, "open", fake_open, raising=False)


def test_disk_full_at_a_checkpoint_keeps_the_last_good_one(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    # The checkpoint before training and the one after epoch 1 are written; epoch 2's is not.
    fill_disk_after(monkeypatch, "last.pt", allowed=2)
    result = run("train", config, "--run-dir", run_dir, "-q")
    # torch.save reports the full disk as RuntimeError("... unexpected pos"); the OSError behind
    # it names no file, so the line names the run directory (with save_checkpoint naming the
    # file, as proposed, it names checkpoints/last.pt).
    assert_one_line_error(
        result,
        "No space left on device (ENOSPC)",
        str(run_dir),
        "kept: the last good checkpoint",
        "(after epoch 1, step",
        f"flexgr train --run-dir {run_dir} --resume",
    )
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]
    state = checkpoint_state(run_dir / "checkpoints" / "last.pt")
    assert state is not None and state["epoch"] == 2 and state["batch_in_epoch"] == 0
    monkeypatch.undo()  # space is free again
    resumed = run("train", "--run-dir", run_dir, "--resume", "-q")
    assert resumed.exit_code == 0, resumed.output
    records = RunDir(run_dir).read_metrics()
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]
    assert sum(1 for r in records if r.get("final")) == 1


def test_disk_full_on_metrics_leaves_whole_lines(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    writes = {"n": 0}
    real_open = open

    class FillsUp(io.FileIO):
        def write(self, data: object) -> int:
            writes["n"] += 1
            if writes["n"] > 3:  # half a record fits, then the disk is full
                super().write(bytes(data)[:7])  # type: ignore[call-overload]
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)  # type: ignore[arg-type]

    def fake_open(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            return FillsUp(str(path), "a")
        return real_open(path, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(flexgr.train.rundir, "open", fake_open, raising=False)
    result = run("train", config, "--run-dir", run_dir, "-q")
    assert_one_line_error(result, f"{run_dir / 'metrics.jsonl'}: No space left on device")
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3  # the torn record was cut off


def test_read_only_run_dir(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(flexgr.atomic, "open", read_only, raising=False)
    run_dir = tmp_path / "run"
    assert_one_line_error(
        run("train", config, "--run-dir", run_dir, "-q"),
        f"{run_dir / 'config.toml'}: Read-only file system (EROFS)",
        "no checkpoint was written yet",
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_run_dir_without_permission(config: Path, tmp_path: Path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert_one_line_error(
            run("train", config, "--run-dir", parent / "run", "-q"), "Permission denied"
        )
    finally:
        parent.chmod(0o700)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "is not a directory"),
        (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "run", "Not a directory"),
        (lambda tmp: Path("/proc/flexgr-no-such-dir/run"), "/proc/flexgr-no-such-dir"),
    ],
)
def test_unusable_run_dir_paths(config: Path, tmp_path: Path, make, fragment: str) -> None:
    assert_one_line_error(run("train", config, "--run-dir", make(tmp_path), "-q"), fragment)


def test_configs_that_cannot_be_read(config: Path, tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# r\xe9glages\n[train]\nlr = 1e-3\n")
    assert_one_line_error(run("train", latin1, "--print-config"), "not UTF-8", "0xe9")
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    assert_one_line_error(run("train", folder, "--print-config"), f"cannot read config {folder}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_bytes(b"\xff\xfe[train]")
    assert_one_line_error(run("train", "--run-dir", run_dir, "--resume"), "not UTF-8")
    assert_one_line_error(run("eval", "--run-dir", run_dir), "not UTF-8")
