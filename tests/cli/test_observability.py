"""TensorBoard scalars, flexgr plot, the progress display and what Ctrl-C says."""

from __future__ import annotations

import io
from pathlib import Path

import flexgr.cli.keep
import pytest
from rich.console import Console

from flexgr.train import dump_config
from flexgr.train.progress import TrainProgress
from flexgr.train.rundir import RunDir
from tests.cli.helpers import assert_one_line_error, run
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def board_run(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("board")
    config = root / "tiny.toml"
    config.write_text(dump_config(tiny_config(tiny_home, "train.max_epochs=2")))
    result = run("train", config, "--run-dir", root / "run", "--tensorboard", "-q")
    assert result.exit_code == 0, result.output
    return root / "run"


def test_tensorboard_scalars_match_metrics_jsonl(board_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(board_run / "tensorboard"))
    events.Reload()
    records = RunDir(board_run).read_metrics()
    train = [r for r in records if r["kind"] == "train"]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [r["step"] for r in train]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in train])
    val = [r for r in records if r.get("split") == "val"]
    assert [e.value for e in events.Scalars("val/ndcg@10")] == pytest.approx(
        [r["ndcg@10"] for r in val]
    )
    final = next(r for r in records if r.get("final"))
    assert events.Scalars("final_test/hr@10")[0].value == pytest.approx(final["hr@10"])


def test_tensorboard_missing_warns_and_trains(
    tiny_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flexgr.cli.tensorboard.tensorboard_available", lambda: False)
    config = tmp_path / "c.toml"
    config.write_text(dump_config(tiny_config(tiny_home, "train.max_steps=1")))
    result = run("train", config, "--run-dir", tmp_path / "run", "--tensorboard", "-q")
    assert result.exit_code == 0, result.output
    assert "warning: --tensorboard needs the tensorboard package" in result.stderr
    assert "pip install 'flexgr[tensorboard]'" in result.stderr
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_plot_writes_pngs(board_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = run("plot", "--run-dir", board_run, "--out", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    for name in ("loss.png", "val.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert not [p for p in (tmp_path / "plots").iterdir() if ".tmp-" in p.name]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("plot", "--run-dir", empty), "has no records yet")
    assert_one_line_error(run("plot", "--run-dir", tmp_path / "none"), "no run directory")


def test_interrupt_says_what_is_lost(
    tiny_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    # 48 users / batch 8 = 6 steps an epoch; a training record every 2 steps.
    config.write_text(dump_config(tiny_config(tiny_home, "train.max_epochs=3")))
    original = flexgr.cli.keep.StepTracker.on_log

    def ctrl_c_at_step_10(self: flexgr.cli.keep.StepTracker, record: dict) -> None:
        original(self, record)
        if record["kind"] == "train" and record["step"] == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(flexgr.cli.keep.StepTracker, "on_log", ctrl_c_at_step_10)
    run_dir = tmp_path / "run"
    result = run("train", config, "--run-dir", run_dir, "-q")
    assert result.exit_code == 130
    assert_one_line_error(
        result,
        "interrupted at step 10; the last checkpoint (after epoch 1, step 6) is kept",
        "4 steps since are lost",
        f"continue with: flexgr train --run-dir {run_dir} --resume",
    )


def test_progress_lines_show_epochs_of_n_the_first_loss_and_an_eta() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with TrainProgress(console, None, max_epochs=3) as progress:
        progress.start_epoch(1, total_batches=4, done_batches=0)
        progress.advance(2.5)  # the first step's loss, before any training record
        progress.advance(1.5)
        progress.log(step=2, loss=2.0, lr=1e-3, tokens_per_s=100.0)
        progress.advance(1.0)  # after a record: not read any more
        progress.start_eval("val")
        progress.end_eval()
    text = out.getvalue()
    assert "epoch 1/3 step 1: loss 2.5000 (first step)" in text
    assert "epoch 1/3 step 2: loss 2.0000, lr 1.00e-03, 100 tok/s, run ETA >" in text
    assert "evaluating val" in text


class CountedLoss:
    """A step's loss that counts its host reads (float() of a CUDA tensor waits for the GPU)."""

    reads = 0

    def __float__(self) -> float:
        CountedLoss.reads += 1
        return 2.0


@pytest.mark.parametrize(
    "show, terminal, reads", [(False, False, 0), (None, False, 1), (True, True, 3)]
)
def test_progress_reads_early_losses_only_where_it_shows_them(
    show: bool | None, terminal: bool, reads: int
) -> None:
    """Quiet: never; log lines: the first step's only; the bar: every step before a record."""
    console = Console(file=io.StringIO(), force_terminal=terminal, width=200)
    CountedLoss.reads = 0
    with TrainProgress(console, show, max_epochs=1) as progress:
        progress.start_epoch(1, total_batches=5, done_batches=0)
        for _ in range(3):
            progress.advance(CountedLoss())  # type: ignore[arg-type]
        progress.log(step=3, loss=2.0, lr=1e-3, tokens_per_s=1.0)
        progress.advance(CountedLoss())  # type: ignore[arg-type]
    assert CountedLoss.reads == reads


def test_progress_bar_shows_eta_and_an_evaluation_bar() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with TrainProgress(console, True, max_epochs=2) as progress:
        progress.start_epoch(1, total_batches=2, done_batches=0)
        progress.advance(3.0)
        progress.advance(3.0)
        progress.start_eval("val")
        progress.eval_batch(1, 3)
        progress.end_eval()
        progress.start_epoch(2, total_batches=2, done_batches=0)
        progress.advance()
        progress._progress.refresh()  # type: ignore[union-attr]
    text = out.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert "loss 3.0000 (mean of 2 steps)" in text and "evaluating val" in text
    assert "run ETA 0:0" in text  # with an epoch end timed, no ">" any more
