"""One BlockMask per packed batch.

Built-in HSTU masks are built without compilation by evaluating the rule only on block pairs that
share a sequence (:mod:`flexgr.masks.sparse`), and so are custom ones that promise to imply the
jagged mask (``build_custom_mask(..., jagged=True)``). Other mask_mods go through
``create_block_mask``: compiled on CUDA (eager needs O(T^2) memory: about 100 GiB at T = 73k),
with ``dynamic=False``, which recompiles for every new length. So on CUDA the packed length is
rounded up to a few buckets per octave; padding tokens belong to no sequence, so their blocks are
empty and cost no attention work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from flexgr.masks.band import BandTables, band_tables, block_mask_of, compiled_band_tables
from flexgr.masks.layout import JaggedLayout, build_layout
from flexgr.masks.mods import MaskMod, and_masks, hstu_mask, jagged, semi_local
from flexgr.masks.sparse import jagged_block_mask
from flexgr.ops.kernel_options import kernel_options

BLOCK_SIZE = 128


@dataclass(frozen=True)
class MaskSpec:
    """The built-in HSTU rule, or ULTRA-HSTU's semi-local attention, in a form a kernel can
    evaluate inline.

    With ``semi_local`` (:func:`semi_local_spec`) the window is on even at ``max_attn_len = 0``
    (the diagonal only), and its exemption is either ``full_attn_tail`` rows ("tail_rows") or
    ``global_len`` global prefix keys ("global_keys": keys whose position id is below it)."""

    contextual_len: int = 0
    max_attn_len: int = 0
    full_attn_tail: int = 0
    has_targets: bool = False
    semi_local: bool = False
    global_len: int = 0

    @property
    def has_window(self) -> bool:
        return self.max_attn_len > 0 or self.semi_local


def semi_local_spec(local: int, global_: int, mode: str) -> MaskSpec:
    """The spec of ``and_masks(jagged(...), semi_local(..., local, global_, mode=mode))``: a
    window of ``local`` keys, plus ``global_`` tail rows (``"tail_rows"``, the built-in rule's
    ``full_attn_tail``) or ``global_`` prefix keys (``"global_keys"``)."""
    if local < 0 or global_ < 0:
        raise ValueError(f"semi_local: local and global_ must be >= 0, got {local}, {global_}")
    if mode == "tail_rows":
        return MaskSpec(max_attn_len=local, full_attn_tail=global_, semi_local=True)
    if mode == "global_keys":
        return MaskSpec(max_attn_len=local, global_len=global_, semi_local=True)
    raise ValueError(f"semi_local: mode must be 'global_keys' or 'tail_rows', got {mode!r}")


@dataclass(frozen=True)
class HSTUMask:
    """A batch's mask: the BlockMask plus what produced it.

    ``spec`` is None for arbitrary user mask_mods; kernels that evaluate the rule inline need it.
    """

    block_mask: BlockMask
    mask_mod: MaskMod
    layout: JaggedLayout
    spec: MaskSpec | None
    offsets: Tensor

    @property
    def total_len(self) -> int:
        return self.layout.total_len

    @property
    def padded_len(self) -> int:
        return self.layout.padded_len


def bucket_length(total_len: int, block_size: int = BLOCK_SIZE) -> int:
    """Round up to a multiple of ``block_size``, then to one of four sizes per octave."""
    blocks = max(1, -(-total_len // block_size))
    if blocks > 8:
        step = 1 << (blocks.bit_length() - 3)
        blocks = -(-blocks // step) * step
    return blocks * block_size


def padded_length(total_len: int, device: torch.device, block_size: int = BLOCK_SIZE) -> int:
    if device.type == "cuda":
        return bucket_length(total_len, block_size)
    return max(1, -(-total_len // block_size)) * block_size


@functools.cache
def _compiled_create_block_mask():
    # Distinct buckets and mask options each compile once; allow more than the default 8.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(create_block_mask, dynamic=False)


def block_mask_from_mod(
    mask_mod: MaskMod, padded_len: int, device: torch.device, block_size: int = BLOCK_SIZE
) -> BlockMask:
    if device.type == "cuda":
        build = _compiled_create_block_mask()
    else:
        build = create_block_mask
    return build(mask_mod, 1, None, padded_len, padded_len, device=device, BLOCK_SIZE=block_size)


def build_hstu_mask(
    offsets: Tensor,
    *,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    total_len: int | None = None,
    padded_len: int | None = None,
    block_size: int = BLOCK_SIZE,
    max_len: int | None = None,
) -> HSTUMask:
    """Build the HSTU mask of one packed batch (see :func:`hstu_mask` for the rule).

    With ``max_len`` (no sequence is longer; the model's attention length) the block tables
    come from per-block statistics over a fixed band (:mod:`flexgr.masks.band`): no host sync;
    on CUDA two Triton launches by default (``kernel.prepare``, :func:`prepare_mode`). Without
    it, the rule is evaluated on every block pair that shares a sequence."""
    device = offsets.device
    if total_len is None:
        total_len = int(offsets[-1])
    if padded_len is None:
        padded_len = padded_length(total_len, device, block_size)
    spec = mask_spec(num_targets, contextual_len, max_attn_len, full_attn_tail)
    if max_len is not None:
        if padded_len % block_size:
            raise ValueError(f"padded length {padded_len} is not a multiple of block_size {block_size}")
        build = band_builder(prepare_mode(device, block_size))
        tables = build(
            offsets, num_targets, total_len, padded_len, contextual_len, max_attn_len,
            spec.full_attn_tail, max_len, block_size,
        )
        return mask_of_band(
            tables, offsets, spec, max_attn_len=max_attn_len, full_attn_tail=full_attn_tail,
            total_len=total_len, padded_len=padded_len, block_size=block_size,
        )
    layout = build_layout(
        offsets,
        num_targets=num_targets,
        contextual_len=contextual_len,
        total_len=total_len,
        padded_len=padded_len,
    )
    mod = hstu_mask(layout, max_attn_len=max_attn_len, full_attn_tail=full_attn_tail)
    # The rule implies jagged, so only block pairs that share a sequence need evaluating;
    # without contextual rows (which see later tokens) it is also causal.
    block_mask = jagged_block_mask(mod, layout.seq_id, block_size, causal=contextual_len == 0)
    return HSTUMask(block_mask=block_mask, mask_mod=mod, layout=layout, spec=spec, offsets=offsets)


def build_semi_local_mask(
    offsets: Tensor,
    local: int,
    global_: int,
    *,
    mode: str = "global_keys",
    total_len: int | None = None,
    padded_len: int | None = None,
    block_size: int = BLOCK_SIZE,
    max_len: int | None = None,
) -> HSTUMask:
    """ULTRA-HSTU semi-local attention over one packed batch, with a spec the Triton kernel
    evaluates inline: the rule of ``and_masks(jagged(offsets), semi_local(offsets, local,
    global_, mode=mode))`` (in-sequence indices; no targets, no contextual prefix).

    With ``max_len`` the block tables come from the band statistics (no host sync, as
    :func:`build_hstu_mask`); without it the rule is evaluated on every block pair that shares a
    sequence. Either way a key block is listed only when the local window, the global prefix
    keys or the tail rows can reach it, so the kernel's work is O((local + global_) L) per
    sequence of L tokens ("global_keys"), not O(L^2)."""
    device = offsets.device
    if total_len is None:
        total_len = int(offsets[-1])
    if padded_len is None:
        padded_len = padded_length(total_len, device, block_size)
    spec = semi_local_spec(local, global_, mode)
    if max_len is not None:
        if padded_len % block_size:
            raise ValueError(
                f"padded length {padded_len} is not a multiple of block_size {block_size}"
            )
        build = band_builder(prepare_mode(device, block_size))
        tables = build(
            offsets, None, total_len, padded_len, 0, spec.max_attn_len, spec.full_attn_tail,
            max_len, block_size, spec.global_len, True,
        )
        return mask_of_band(
            tables, offsets, spec, max_attn_len=spec.max_attn_len,
            full_attn_tail=spec.full_attn_tail, total_len=total_len, padded_len=padded_len,
            block_size=block_size,
        )
    layout = build_layout(offsets, total_len=total_len, padded_len=padded_len)
    mod = rule_of(layout, spec)
    block_mask = jagged_block_mask(mod, layout.seq_id, block_size, causal=True)
    return HSTUMask(block_mask=block_mask, mask_mod=mod, layout=layout, spec=spec, offsets=offsets)


def rule_of(layout: JaggedLayout, spec: MaskSpec) -> MaskMod:
    """The mask_mod a spec stands for, over ``layout`` (which must carry the spec's targets and
    contextual prefix)."""
    if spec.semi_local:
        mode, glob = (
            ("tail_rows", spec.full_attn_tail) if spec.full_attn_tail else
            ("global_keys", spec.global_len)
        )
        return and_masks(jagged(layout), semi_local(layout, spec.max_attn_len, glob, mode=mode))
    return hstu_mask(layout, max_attn_len=spec.max_attn_len, full_attn_tail=spec.full_attn_tail)


def mask_spec(
    num_targets: Tensor | None, contextual_len: int, max_attn_len: int, full_attn_tail: int
) -> MaskSpec:
    """The built-in rule's spec (the tail only counts with a window)."""
    return MaskSpec(
        contextual_len=contextual_len,
        max_attn_len=max_attn_len,
        full_attn_tail=full_attn_tail if max_attn_len > 0 else 0,
        has_targets=num_targets is not None,
    )


PrepareMode = Literal["triton", "compiled", "eager"]


def prepare_mode(device: torch.device, block_size: int = BLOCK_SIZE) -> PrepareMode:
    """How a batch's band tables are built on ``device``: ``kernel.prepare`` on CUDA, where
    "triton" becomes "compiled" when the Triton kernels cannot run (no triton, or a block
    size they do not take); always "eager" elsewhere, where compiling costs more than it saves
    and the tables are a few dozen cheap CPU ops."""
    if device.type != "cuda":
        return "eager"
    mode = kernel_options().prepare
    if mode == "triton" and not _triton_prepare_takes(block_size):
        return "compiled"
    return mode


@functools.cache
def _triton_prepare_takes(block_size: int) -> bool:
    try:
        from flexgr.ops.triton_hstu.prepare import supports_block_size
    except ImportError:  # triton is optional
        return False
    return supports_block_size(block_size)


def band_builder(mode: PrepareMode) -> Callable[..., BandTables]:
    """The :func:`flexgr.masks.band.band_tables` of ``mode``: the two Triton launches of
    :mod:`flexgr.ops.triton_hstu.prepare`, the compiled graph or the eager ops (one result)."""
    if mode == "triton":
        from flexgr.ops.triton_hstu.prepare import band_tables as triton_band_tables

        return triton_band_tables
    return compiled_band_tables() if mode == "compiled" else band_tables


def mask_of_band(
    tables: BandTables,
    offsets: Tensor,
    spec: MaskSpec,
    *,
    max_attn_len: int,
    full_attn_tail: int,
    total_len: int,
    padded_len: int,
    block_size: int,
) -> HSTUMask:
    """The HSTUMask of a batch's band tables (no launches: the tensors are wrapped)."""
    layout = JaggedLayout(
        *tables[:6], total_len=total_len, padded_len=padded_len,
        contextual_len=spec.contextual_len, has_targets=spec.has_targets,
    )
    if spec.semi_local:
        mod = rule_of(layout, spec)
    else:
        mod = hstu_mask(layout, max_attn_len=max_attn_len, full_attn_tail=full_attn_tail)
    block_mask = block_mask_of(tables[6:], padded_len, block_size, mod)
    return HSTUMask(block_mask=block_mask, mask_mod=mod, layout=layout, spec=spec, offsets=offsets)


def build_custom_mask(
    mask_mod: MaskMod,
    offsets: Tensor,
    *,
    total_len: int | None = None,
    padded_len: int | None = None,
    block_size: int = BLOCK_SIZE,
    jagged: bool = False,
) -> HSTUMask:
    """Wrap any mask_mod over global token indices of the unpadded batch, for example
    ``and_masks(jagged(offsets, padded_len=P), semi_local(offsets, 64, 8, padded_len=P))`` with
    ``P = padded_length(T, offsets.device)`` passed here as ``padded_len`` too. Padding tokens are masked out and
    indices are clamped, so the mask_mod's tables need not cover the padding.

    On CUDA the block mask and flex_attention compile once per padded length (``padded_len``,
    bucketed): the last real index is captured as a 0-d tensor, not a Python int, which the
    compiled code would guard on and recompile for at every new batch length. The mask_mod's
    own tables should have the padded length too (``jagged(offsets, padded_len=P)``,
    ``build_layout(..., padded_len=P)``): a captured table's shape is guarded the same way.

    ``jagged=True`` promises that the mask_mod implies ``jagged(offsets)`` (a query sees only
    keys of its own sequence). The block mask is then built from the block pairs that share a
    sequence alone (:func:`flexgr.masks.sparse.jagged_block_mask`), with no compile and
    O(per-sequence pairs) work instead of ``create_block_mask``'s P^2: at P = 135k (VISTA's
    summariser on synthetic-ranking) the compiled P^2 pass took 50 ms of a 72 ms step on an
    H200."""
    device = offsets.device
    if total_len is None:
        total_len = int(offsets[-1])
    if padded_len is None:
        padded_len = padded_length(total_len, device, block_size)
    last = torch.tensor(total_len - 1, dtype=torch.int32, device=device)

    def padded_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        inside = (q <= last) & (kv <= last)
        return inside & mask_mod(b, h, torch.minimum(q, last), torch.minimum(kv, last))

    padded_mod.__name__ = getattr(mask_mod, "__name__", "custom")
    layout = build_layout(offsets, total_len=total_len, padded_len=padded_len)
    if jagged:
        block_mask = jagged_block_mask(padded_mod, layout.seq_id, block_size)
    else:
        block_mask = block_mask_from_mod(padded_mod, padded_len, device, block_size)
    return HSTUMask(
        block_mask=block_mask, mask_mod=padded_mod, layout=layout, spec=None, offsets=offsets
    )
