"""train.cuda_graphs on CPU: the padding, the padded step against the plain one, the refusals.

Capture and replay need CUDA (tests/train/test_graphs_cuda.py); what makes a replayed step
right is checked here: a padded batch's step gives the unpadded step's loss and gradients.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from flexgr.train import ConfigError, apply_overrides
from flexgr.train.batches import TrainBatch
from flexgr.train.config import Config
from flexgr.train.graphs import PAD_ITEM, GraphPadding, token_weights
from flexgr.train.loop import Trainer
from flexgr.train.loss import sampled_softmax_loss
from flexgr.train.parallel import ParallelSetupError, check_parallel
from flexgr.train.rundir import RunDir
from tests.conftest import tiny_config


def random_batch(gen: torch.Generator, lengths: list[int], num_items: int = 30) -> TrainBatch:
    T = sum(lengths)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    return TrainBatch(
        item_ids=torch.randint(1, num_items + 1, (T,), generator=gen),
        offsets=offsets,
        timestamps=torch.randint(0, 10**6, (T,), generator=gen).sort().values,
        query_time=torch.full((len(lengths),), 10**6 + 1),
        targets=torch.randint(1, num_items + 1, (T,), generator=gen),
        users=torch.arange(len(lengths)),
    )


@pytest.mark.parametrize("bucket", [1, 7, 64, 1024])
@pytest.mark.parametrize("max_len", [2, 5, 200])
def test_padding_fills_whole_buckets_with_short_dummy_sequences(bucket: int, max_len: int) -> None:
    gen = torch.Generator().manual_seed(bucket * 1000 + max_len)
    batch_size = 9
    padding = GraphPadding.for_batches(batch_size, bucket, max_len)
    for trial in range(20):
        B = 1 + trial % batch_size  # every fill, down to a last batch of one sequence
        lengths = torch.randint(1, max_len + 1, (B,), generator=gen).tolist()
        if trial == 0:
            lengths = [max_len] * B
        batch = random_batch(gen, lengths)
        out = padding.pad(batch)
        T, T_pad = batch.num_tokens, out.num_tokens
        assert T_pad % bucket == 0 and T < T_pad < T + (padding.num_sequences - B) + bucket
        assert out.offsets.numel() == padding.num_sequences + 1 == out.query_time.numel() + 1
        assert out.users.numel() == padding.num_sequences
        dummy_lengths = out.offsets[B + 1 :] - out.offsets[B:-1]
        assert int(out.offsets[-1]) == T_pad
        assert bool((dummy_lengths >= 1).all()) and bool((dummy_lengths <= max_len).all())
        assert torch.equal(out.offsets[: B + 1], batch.offsets)
        for name in ("item_ids", "timestamps", "targets"):
            assert torch.equal(getattr(out, name)[:T], getattr(batch, name))
        assert bool((out.item_ids[T:] == PAD_ITEM).all())
        assert bool((out.targets[T:] == PAD_ITEM).all())
        assert out.real_tokens == out.num_real_tokens == T and out.row_total == T_pad
        weights = token_weights(out)
        assert torch.allclose(weights.sum(), torch.tensor(1.0)) and bool((weights[T:] == 0).all())


def test_padding_refuses_what_it_cannot_hold() -> None:
    padding = GraphPadding.for_batches(2, 8, 4)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="does not fit"):
        padding.pad(random_batch(gen, [1] * padding.num_sequences))
    with pytest.raises(ValueError, match="whole step"):
        batch = random_batch(gen, [2, 2])
        padding.pad(TrainBatch(**{**batch.__dict__, "row_offset": 2, "row_total": 8}))
    with pytest.raises(ValueError, match="max_len >= 2"):
        GraphPadding.for_batches(2, 8, 1)


def test_loss_without_reduction_is_per_position() -> None:
    gen = torch.Generator().manual_seed(1)
    user = torch.nn.functional.normalize(torch.randn(11, 8, generator=gen), dim=-1)
    table = torch.nn.functional.normalize(torch.randn(31, 8, generator=gen), dim=-1)
    targets = torch.randint(1, 31, (11,), generator=gen)
    negatives = torch.randint(1, 31, (11, 5), generator=gen)
    per = sampled_softmax_loss(user, targets, negatives, table, 0.05, reduction="none")
    total = sampled_softmax_loss(user, targets, negatives, table, 0.05, reduction="sum")
    assert per.shape == (11,) and torch.allclose(per.sum(), total)


def fixed_negatives(rows: int, per_row: int, num_items: int, device: torch.device) -> torch.Tensor:
    """Negatives that depend on the row alone: the padded batch's first T rows get the plain
    batch's (the random draws of a padded step differ, by design)."""
    return (torch.arange(rows * per_row, device=device).reshape(rows, per_row) * 7) % num_items + 1


def grads_of_one_step(trainer: Trainer, step) -> tuple[float, dict[str, torch.Tensor]]:  # noqa: ANN001
    torch.manual_seed(0)
    trainer.optimizer.zero_grad(set_to_none=True)
    steps: list[int] = []
    trainer.optimizer.step = lambda *a, **k: steps.append(1)  # type: ignore[method-assign]
    loss = float(step())
    assert steps == [1]
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss, grads


@pytest.mark.parametrize(
    "extra",
    [
        ("train.negatives=uniform",),
        ("train.negatives=full", "train.label_smoothing=0.1"),
        ("train.grad_clip=0.01",),
    ],
    ids=["uniform", "full-smoothed", "clipped"],
)
def test_the_padded_step_is_the_plain_step(
    tiny_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...]
) -> None:
    cfg = tiny_config(
        tiny_home, "model.dropout=0.0", "model.input_dropout=0.0", "train.batch_size=8", *extra
    )
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    trainer = Trainer(cfg, run, Console(quiet=True), show_progress=False, callbacks=())
    monkeypatch.setattr("flexgr.train.loop.sample_negatives", fixed_negatives)
    padding = GraphPadding.for_batches(8, 16, cfg.data.max_seq_len)
    clip = cfg.train.grad_clip
    for rows in ([0, 1, 2, 3, 4, 5, 6, 7], [3, 9], [5]):  # a full batch and short last ones
        batch = trainer.sequences[rows]
        padded = padding.pad(batch)
        assert padded.num_tokens > batch.num_tokens
        loss, grads = grads_of_one_step(trainer, lambda: trainer._train_step(batch))
        got_loss, got = grads_of_one_step(
            trainer, lambda: trainer._padded_step(padded, token_weights(padded))
        )
        assert got_loss == pytest.approx(loss, rel=1e-5)
        assert grads.keys() == got.keys()
        for name, grad in grads.items():
            tol = 1e-5 * max(1.0, float(grad.abs().max()))
            assert torch.allclose(got[name], grad, atol=tol, rtol=1e-4), (rows, name, clip)


def test_cpu_runs_ignore_cuda_graphs(tiny_home: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_home, "train.cuda_graphs=true", "train.max_epochs=1")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    trainer = Trainer(cfg, run, Console(quiet=True), show_progress=False, callbacks=())
    assert trainer.graphs is None
    assert not isinstance(trainer.optimizer.param_groups[0]["lr"], torch.Tensor)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["train.compile=true"], "train.compile"),
        (["train.recompute=layers"], "train.recompute"),
        (["train.negatives=in_batch"], "in_batch"),
        (["model.truncate_after=1", "model.truncate_len=4"], "model.truncate_after"),
        (["model.mot_streams=2"], "mot_streams"),
        (["parallel.cp=2"], "one process"),
        (["data.source=versioned"], "data.source"),
        (["train.graph_bucket=0"], "graph_bucket"),
        (["data.max_seq_len=1"], "max_seq_len"),
        (["model.arch=hstu-ranking", "data.dataset=synthetic-ranking"], "retrieval"),
    ],
)
def test_settings_graphs_cannot_replay_are_refused(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        apply_overrides(Config(), ["train.cuda_graphs=true", *overrides])


def test_torchrun_refuses_cuda_graphs() -> None:
    cfg = apply_overrides(Config(), ["train.cuda_graphs=true", "train.negatives=uniform"])
    check_parallel(cfg, 1)
    with pytest.raises(ParallelSetupError, match="train.cuda_graphs"):
        check_parallel(cfg, 2)
