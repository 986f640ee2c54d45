"""HSTU masks as FlexAttention mask_mods over packed sequences, and the per-batch BlockMask."""

from flexgr.masks.block import (
    BLOCK_SIZE,
    HSTUMask,
    MaskSpec,
    bucket_length,
    build_custom_mask,
    build_hstu_mask,
    build_semi_local_mask,
    padded_length,
)
from flexgr.masks.dense import dense_hstu_mask
from flexgr.masks.layout import PAD_SEQ, JaggedLayout, build_layout
from flexgr.masks.registry import mask_names, register_mask
from flexgr.masks.mods import (
    MaskMod,
    and_masks,
    causal,
    contextual,
    hstu_mask,
    jagged,
    local_window,
    or_masks,
    semi_local,
    targets,
)

__all__ = [
    "BLOCK_SIZE",
    "HSTUMask",
    "JaggedLayout",
    "MaskMod",
    "MaskSpec",
    "PAD_SEQ",
    "and_masks",
    "bucket_length",
    "build_custom_mask",
    "build_hstu_mask",
    "build_layout",
    "build_semi_local_mask",
    "causal",
    "contextual",
    "dense_hstu_mask",
    "hstu_mask",
    "jagged",
    "local_window",
    "mask_names",
    "or_masks",
    "padded_length",
    "register_mask",
    "semi_local",
    "targets",
]
