"""SASRec's per-batch inputs: positions, and the padded length its dense attention uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from flexgr.batch import JaggedBatch
from flexgr.masks.layout import seq_ids_and_local
from flexgr.ops.jagged import lengths_of

if TYPE_CHECKING:
    from flexgr.model.sasrec.model import SASRec


@dataclass(frozen=True)
class SASRecInputs:
    offsets: Tensor  # [B + 1]
    positions: Tensor  # [T] int64 index inside the sequence
    max_len: int  # longest sequence: the padded batch is [B, max_len]


def prepare(model: SASRec, batch: JaggedBatch) -> SASRecInputs:
    if batch.num_targets is not None:
        raise ValueError("SASRec does not support num_targets (target-aware masks are HSTU's)")
    offsets = batch.offsets
    # An empty batch (B = 0) is allowed: a data-parallel replica can draw no sequences. The one
    # host sync of a SASRec batch is here, outside the forward.
    max_len = int(lengths_of(offsets).max()) if offsets.numel() > 1 else 0
    _, positions = seq_ids_and_local(offsets, batch.num_tokens)
    return SASRecInputs(offsets=offsets, positions=positions.long(), max_len=max_len)
