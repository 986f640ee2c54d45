"""The training loop reads no tensor back to the host between training records.

On CUDA every such read (``float(loss)``, ``.item()``, ``.tolist()``, ``nonzero``, a boolean
mask index) waits for the GPU and empties the launch queue. On CPU nothing waits, so this test
counts the reads themselves: the ops that produce a Python value or a data-dependent shape,
and ``tolist`` / ``numpy`` (which reach no dispatcher on CPU). The model's forward and the
optimizer step are left out: they are timed and checked on the GPU (BENCHMARKS.md,
benchmarks/prepare_compile.py's host-sync column), and CPU Adam reads its CPU step counter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch.utils._python_dispatch import TorchDispatchMode

from flexgr.train.loop import Trainer
from flexgr.train.progress import TrainProgress
from flexgr.train.rundir import RunDir
from tests.conftest import tiny_config

READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}


class HostReads(TorchDispatchMode):
    """Counts host reads per training step, except inside the model and the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.exempt = 0  # > 0 while the model or the optimizer runs
        self.step = 0
        self.by_step: dict[int, list[str]] = {}

    def read(self, what: str) -> None:
        if not self.exempt:
            self.by_step.setdefault(self.step, []).append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = str(func.overloadpacket)
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())
        )
        if name in READS or bool_index:
            self.read(name)
        return func(*args, **(kwargs or {}))

    def exempting(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.exempt += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.exempt -= 1

        return call


def test_steps_between_records_read_nothing_back(
    tiny_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tiny_home, "train.log_every=4", "train.max_epochs=2")  # 6 steps an epoch
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    trainer = Trainer(cfg, run, Console(quiet=True), show_progress=False, callbacks=())
    reads = HostReads()
    trainer.forward = reads.exempting(trainer.forward)
    trainer.optimizer.step = reads.exempting(trainer.optimizer.step)  # type: ignore[method-assign]
    descend = trainer._descend

    def descend_and_count(loss: torch.Tensor) -> None:
        descend(loss)
        reads.step += 1  # what follows belongs to the next step (or the record of this one)

    trainer._descend = descend_and_count  # type: ignore[method-assign]
    for method in ("tolist", "numpy"):
        real = getattr(torch.Tensor, method)

        def counted(self: torch.Tensor, *args: Any, _real: Any = real, _name: str = method) -> Any:
            reads.read(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, method, counted)
    progress = TrainProgress(Console(quiet=True), False, max_epochs=2)
    with reads:
        trainer.run_epoch(progress)
        trainer.state.epoch, trainer.state.batch_in_epoch = 2, 0
        trainer.run_epoch(progress)
    assert trainer.state.step == 12
    # A step's reads are counted after its backward: steps 4, 8 and 12 write records, and
    # nothing else reads the device.
    assert sorted(reads.by_step) == [4, 8, 12], reads.by_step
    assert all(names == ["aten._local_scalar_dense"] for names in reads.by_step.values())
