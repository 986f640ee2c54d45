"""Per-token metadata for packed (jagged) sequences.

Every mask_mod in flexgr is a function of global token indices. It looks up small per-token tables
(which sequence a token belongs to, its HSTU position id, ...) so that FlexAttention, the block-mask
builder and our Triton kernel all evaluate the same rule from the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PAD_SEQ = -1  # seq_id of padding tokens; they attend nothing and nothing attends them


@dataclass(frozen=True)
class JaggedLayout:
    """Per-token tables of a packed batch, padded to ``padded_len`` tokens.

    seq_id:  [P] int32, sequence of each token (``PAD_SEQ`` for padding).
    local:   [P] int32, index of the token inside its sequence.
    pos_id:  [P] int32, the HSTU position id p (contextual tokens share 0, targets share one id).
    max_id:  [P] int32, p of the first target (one past the last history id) of the token's sequence.
    is_target: [P] bool.
    seq_len: [P] int32, length of the token's sequence (0 for padding).
    """

    seq_id: Tensor
    local: Tensor
    seq_len: Tensor
    pos_id: Tensor
    max_id: Tensor
    is_target: Tensor
    total_len: int
    padded_len: int
    contextual_len: int
    has_targets: bool

    @property
    def device(self) -> torch.device:
        return self.seq_id.device


def seq_ids_and_local(offsets: Tensor, total_len: int, padded_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Sequence id and in-sequence index of every token, without a host sync."""
    padded_len = total_len if padded_len is None else padded_len
    tok = torch.arange(padded_len, device=offsets.device, dtype=offsets.dtype)
    seq = torch.searchsorted(offsets[1:].contiguous(), tok, right=True)
    seq = seq.clamp(max=offsets.numel() - 2)
    local = tok - offsets[seq]
    pad = tok >= total_len
    seq = torch.where(pad, torch.full_like(seq, PAD_SEQ), seq)
    local = torch.where(pad, torch.zeros_like(local), local)
    return seq.to(torch.int32), local.to(torch.int32)


def build_layout(
    offsets: Tensor,
    *,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    total_len: int | None = None,
    padded_len: int | None = None,
) -> JaggedLayout:
    """Build the per-token tables. Position ids follow the reference HSTU exactly:

    - with ``contextual_len = c > 0`` the first c tokens get id 0, history tokens 1, 2, ...;
      otherwise ids are 0, 1, ...;
    - ``max_id = L - t`` (minus ``c - 1`` when c > 0), and ids are clamped to it when targets are
      given, so all t targets share the id of the first target.
    """
    offsets = offsets.to(torch.int64)
    if total_len is None:
        total_len = int(offsets[-1])
    padded_len = total_len if padded_len is None else padded_len
    seq, local = seq_ids_and_local(offsets, total_len, padded_len)
    seq_safe = seq.clamp(min=0).long()
    lengths = (offsets[1:] - offsets[:-1])[seq_safe]
    local64 = local.long()
    if contextual_len > 0:
        pos = (local64 - contextual_len + 1).clamp(min=0)
        max_id = lengths - contextual_len + 1
    else:
        pos = local64
        max_id = lengths
    if num_targets is not None:
        nt = num_targets.to(offsets.device, torch.int64)[seq_safe]
        max_id = max_id - nt
        pos = torch.minimum(pos, max_id)
        is_target = local64 >= lengths - nt
    else:
        is_target = torch.zeros_like(local64, dtype=torch.bool)
    pad = seq < 0
    is_target = is_target & ~pad
    return JaggedLayout(
        seq_id=seq,
        local=local,
        seq_len=torch.where(pad, torch.zeros_like(lengths), lengths).to(torch.int32),
        pos_id=pos.to(torch.int32),
        max_id=max_id.to(torch.int32),
        is_target=is_target,
        total_len=total_len,
        padded_len=padded_len,
        contextual_len=contextual_len,
        has_targets=num_targets is not None,
    )
