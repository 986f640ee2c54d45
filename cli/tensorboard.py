"""``flexgr train --tensorboard``: the metrics.jsonl records as TensorBoard scalars too.

Written to ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR``). Needs the ``tensorboard``
package (``pip install 'flexgr[tensorboard]'``); without it the run trains without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexgr.train.loop import Callback

INSTALL_HINT = "pip install 'flexgr[tensorboard]'"
# Keys of a record that are not values to plot.
_LABELS = frozenset({"kind", "step", "epoch", "split", "final", "partial", "message"})


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardLogger(Callback):
    """Every record ``on_log`` sees, as scalars at its ``step``: ``train/loss``, ``train/lr``,
    ``train/tokens_per_s``, ``val/ndcg@10``, ..., ``epoch/train_s``, and the final test metrics
    as ``final_test/...``.

    ``purge_step``: a resumed run rewrites the records after its checkpoint's step; TensorBoard
    drops the events at and after it, as metrics.jsonl is cut back.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def on_log(self, record: dict[str, Any]) -> None:
        kind, step = record.get("kind"), int(record.get("step") or 0)
        if kind == "eval":
            group = "final_test" if record.get("final") else str(record.get("split"))
        elif kind in ("train", "epoch"):
            group = str(kind)
        else:
            return  # warnings are text, not scalars
        for key, value in record.items():
            if key in _LABELS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
