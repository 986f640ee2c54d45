"""The mask of one rank's queries against every rank's keys, evaluated on global coordinates.

A query in local slot i is global token ``q_index[i]``; a key in gathered slot j is global token
``kv_index[j]``. The mask is the batch's ordinary global mask_mod composed with these maps, so
every rule (and any custom mask_mod over global indices) means exactly what it means on one device.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from flexgr.distributed.sharding import TokenShard
from flexgr.masks.block import BLOCK_SIZE, MaskSpec, _compiled_create_block_mask, padded_length
from flexgr.masks.layout import JaggedLayout, build_layout
from flexgr.masks.mods import MaskMod, hstu_mask
from flexgr.masks.sparse import jagged_block_mask


# eq=False: identity equality and hash (fields hold tensors), so per-batch caches can key on it.
@dataclass(frozen=True, eq=False)
class CPMask:
    """shard:  the token shard (global offsets, local tokens, gathered-buffer layout).
    layout:    per-token tables of the GLOBAL batch (padded_len >= 1, total_len = T).
    global_mask_mod: mask over global token indices in [0, T).
    mask_mod:  mask over (local query slot in [0, S), gathered key slot in [0, C*S)).
    q_index:   [S] int64, global index of each local query slot, -1 for padding.
    kv_index:  [C*S] int64, global index of each gathered key slot, -1 for padding.
    spec:      the built-in rule's options, for kernels that evaluate it inline (None: custom).
    block_mask: Q_LEN = S by KV_LEN = C*S, for the flex backend (None when not built yet:
                use :func:`flex_block_mask`).
    """

    shard: TokenShard
    layout: JaggedLayout
    global_mask_mod: MaskMod
    mask_mod: MaskMod
    q_index: Tensor
    kv_index: Tensor
    spec: MaskSpec | None
    block_mask: BlockMask | None

    @property
    def q_len(self) -> int:
        return self.shard.shard_len

    @property
    def kv_len(self) -> int:
        return self.shard.gathered_len


def _remapped(global_mod: MaskMod, q_index: Tensor, kv_index: Tensor) -> MaskMod:
    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        gq, gk = q_index[q], kv_index[kv]
        real = (gq >= 0) & (gk >= 0)
        return real & global_mod(b, h, gq.clamp(min=0), gk.clamp(min=0))

    mask.__name__ = "cp_" + getattr(global_mod, "__name__", "mask")
    return mask


def _slot_seq(layout: JaggedLayout, index: Tensor) -> Tensor:
    """Sequence id of each slot (global token ``index``; -1 for padding slots)."""
    seq = layout.seq_id[index.clamp(min=0)].long()
    return torch.where(index >= 0, seq, -1)


def cp_block_mask(mask_mod: MaskMod, q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    build = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    return build(mask_mod, 1, None, q_len, kv_len, device=device, BLOCK_SIZE=BLOCK_SIZE)


def build_cp_mask(
    shard: TokenShard,
    *,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    mask_mod: MaskMod | None = None,
    layout: JaggedLayout | None = None,
    with_block_mask: bool = True,
) -> CPMask:
    """The CP mask of one batch (share it across layers). With ``mask_mod`` (a rule over global
    token indices of the unpadded batch, as for ``build_custom_mask``) the HSTU options are unused
    and ``spec`` is None. ``layout`` may be passed when the caller already built the global one."""
    T = shard.total_len
    if layout is None:
        layout = build_layout(
            shard.offsets,
            num_targets=num_targets,
            contextual_len=contextual_len,
            total_len=T,
            padded_len=padded_length(T, shard.offsets.device),  # one compile per bucket
        )
    if mask_mod is None:
        global_mod = hstu_mask(layout, max_attn_len=max_attn_len, full_attn_tail=full_attn_tail)
        spec: MaskSpec | None = MaskSpec(
            contextual_len=layout.contextual_len,
            max_attn_len=max_attn_len,
            full_attn_tail=full_attn_tail if max_attn_len > 0 else 0,
            has_targets=layout.has_targets,
        )
    else:
        global_mod, spec = mask_mod, None
    q_index = F.pad(shard.local_index, (0, shard.shard_len - shard.local_len), value=-1)
    kv_index = shard.slot_index
    local_mod = _remapped(global_mod, q_index, kv_index)
    mask = CPMask(
        shard=shard,
        layout=layout,
        global_mask_mod=global_mod,
        mask_mod=local_mod,
        q_index=q_index,
        kv_index=kv_index,
        spec=spec,
        block_mask=None,
    )
    if with_block_mask:
        mask = dataclasses.replace(mask, block_mask=_build_block_mask(mask))
    return mask


def _build_block_mask(mask: CPMask) -> BlockMask:
    if mask.spec is not None:
        # The built-in rule implies jagged: evaluate only block pairs that can share a sequence,
        # without compiling (see flexgr/masks/sparse.py).
        return jagged_block_mask(
            mask.mask_mod,
            _slot_seq(mask.layout, mask.q_index),
            BLOCK_SIZE,
            kv_seq=_slot_seq(mask.layout, mask.kv_index),
        )
    shard = mask.shard
    return cp_block_mask(mask.mask_mod, shard.shard_len, shard.gathered_len, shard.offsets.device)


_lazy_blocks: "weakref.WeakKeyDictionary[CPMask, BlockMask]" = weakref.WeakKeyDictionary()


def flex_block_mask(mask: CPMask) -> BlockMask:
    """The mask's S x C*S BlockMask for flex: the one built with it, or built now and kept for the
    mask's lifetime (the triton path never needs it, so a mask built for triton skips it until a
    fallback to flex asks)."""
    if mask.block_mask is not None:
        return mask.block_mask
    blocks = _lazy_blocks.get(mask)
    if blocks is None:
        blocks = _lazy_blocks[mask] = _build_block_mask(mask)
    return blocks
