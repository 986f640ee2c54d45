"""HSTU's per-batch inputs, prepared once per batch outside the forward and shared by every layer.

:func:`prepare` turns a :class:`~flexgr.batch.JaggedBatch` into :class:`HSTUInputs`: the
position ids the embedding reads and an attention call with the batch's mask, backend and
per-token bias tables bound. Context parallelism prepares the same object restricted to one
rank's tokens (:mod:`flexgr.model.hstu.parallelize`), so the layers never know which they got.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from flexgr.batch import JaggedBatch
from flexgr.masks.block import (
    HSTUMask,
    build_custom_mask,
    build_hstu_mask,
    build_semi_local_mask,
    padded_length,
    prepare_mode,
)
from flexgr.masks.layout import JaggedLayout, build_layout, seq_ids_and_local
from flexgr.masks.mods import MaskMod, and_masks, jagged
from flexgr.masks.registry import BUILTIN_RULE, kernel_rule, mask_rule
from flexgr.model.hstu.mot import MixtureInputs, StreamInputs, stream_batch
from flexgr.ops.attention import hstu_attention
from flexgr.ops.backends import BackendChoice, choose_backend
from flexgr.ops.rab import RelativeBias, next_timestamps

if TYPE_CHECKING:
    from flexgr.model.hstu.model import HSTU, HSTUConfig
    from flexgr.ops.triton_hstu.launch import MaskTables
    from flexgr.ops.triton_hstu.prepare import BiasInputs

BiasWeights = tuple[Tensor, Tensor]  # (pos_w [2N - 1], ts_w [num_buckets + 1])
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # others: the per-call path


class Attention(Protocol):
    """A batch's attention: q, k, v of the tokens the process computes -> [T, H, Dv]."""

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, max_seq_len: int, alpha: float,
        bias: BiasWeights | None,
    ) -> Tensor: ...


@dataclass(frozen=True)
class BiasTables:
    """The per-token tables the relative bias is gathered with (global under CP)."""

    timestamps: Tensor  # [T] int64
    next_timestamps: Tensor  # [T] int64: the next token's timestamp, or the query time
    positions: Tensor  # [T] int64 HSTU position ids

    def bias(self, weights: BiasWeights | None) -> RelativeBias | None:
        if weights is None:
            return None
        pos_w, ts_w = weights
        return RelativeBias(pos_w, ts_w, self.timestamps, self.next_timestamps, self.positions)


@dataclass(frozen=True)
class LocalAttention:
    """Attention over the whole batch on one device, with its mask built once."""

    offsets: Tensor
    backend: str
    tables: BiasTables
    mask: HSTUMask | None  # None: the dense reference evaluates the built-in rule itself
    num_targets: Tensor | None
    contextual_len: int
    max_attn_len: int
    full_attn_tail: int
    divisor: int | None = None  # replaces the layer's N (the truncated layers' shorter N)
    softmax: bool = False  # model.attention = "softmax" (flexgr.model.hstu.softmax)
    # The Triton kernel's tables (flexgr.ops.triton_hstu.launch.MaskTables), built in prepare:
    # the forward calls the kernel directly (one custom op per layer under torch.compile).
    kernel_tables: MaskTables | None = None

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, max_seq_len: int, alpha: float,
        bias: BiasWeights | None,
    ) -> Tensor:
        if self.softmax:
            from flexgr.model.hstu.softmax import softmax_attention

            return softmax_attention(
                q, k, v, self.offsets, alpha=alpha, mask=self.mask, num_targets=self.num_targets,
                contextual_len=self.contextual_len, max_attn_len=self.max_attn_len,
                full_attn_tail=self.full_attn_tail, rab=self.tables.bias(bias),
            )
        if self.kernel_tables is not None and q.dtype in _KERNEL_DTYPES:
            from flexgr.ops.triton_ops import attention

            pos_w, ts_w = bias if bias is not None else (None, None)
            return attention(
                q, k, v, pos_w, ts_w, self.kernel_tables, float(alpha),
                int(self.divisor or max_seq_len),
            )
        return hstu_attention(
            q, k, v, self.offsets,
            max_seq_len=self.divisor or max_seq_len, alpha=alpha, num_targets=self.num_targets,
            contextual_len=self.contextual_len, max_attn_len=self.max_attn_len,
            full_attn_tail=self.full_attn_tail, rab=self.tables.bias(bias),
            backend=self.backend, mask=self.mask, validate=False,
        )


@dataclass(frozen=True)
class Truncation:
    """Attention truncation: the rows the later layers keep and their own inputs."""

    keep: Tensor  # [T'] rows of the batch, per sequence in order
    offsets: Tensor  # [B + 1] of the kept rows
    inputs: HSTUInputs


@dataclass(frozen=True)
class HSTUInputs:
    """What :class:`~flexgr.model.hstu.HSTU` reads besides the item ids."""

    positions: Tensor  # [T] position ids of the tokens this process computes
    attention: Attention
    truncation: Truncation | None = None
    # [B + 1] token offsets of the sequences these T tokens form (model.drop_path draws per
    # sequence); None where the tokens are not whole sequences (context parallelism, caches).
    offsets: Tensor | None = None

    @property
    def output_rows(self) -> Tensor | None:
        """Rows of the batch the model's outputs belong to (None: all of them, in order)."""
        return self.truncation.keep if self.truncation is not None else None

    @property
    def output_offsets(self) -> Tensor | None:
        return self.truncation.offsets if self.truncation is not None else None


def backend_choice(
    cfg: HSTUConfig, device: torch.device, *, training: bool, strict: bool = False
) -> BackendChoice:
    """The backend this model's batches run on ``device`` (:func:`flexgr.ops.choose_backend`,
    the one resolver: a run logs this choice before its first step). Softmax attention runs on
    flex (CUDA) or the dense path: the Triton kernel is pointwise SiLU only."""
    requested = cfg.backend
    if cfg.attention == "softmax":
        if requested == "triton":
            raise ValueError(
                "model.attention='softmax' cannot run on model.backend='triton' (the kernel is "
                "pointwise SiLU only); use model.backend='auto', 'flex' or 'reference'"
            )
        if requested == "auto":
            requested = "flex" if device.type == "cuda" else "reference"
    return choose_backend(
        requested,
        device,
        builtin_mask=kernel_rule(cfg.mask),
        head_dim=max(cfg.dqk, cfg.dv),
        training=training,
        strict=strict,
    )


def batch_layout(cfg: HSTUConfig, batch: JaggedBatch) -> JaggedLayout:
    """Per-token tables of the whole batch: sequence ids, HSTU position ids, targets, at the
    masks' padded length (padding rows past the batch's tokens): on CUDA the compiled block mask
    and flex kernels guard on the shapes of the tables a mask_mod captures, and the padded length
    is bucketed, so batches of one bucket share one compile."""
    return build_layout(
        batch.offsets,
        num_targets=batch.num_targets,
        contextual_len=cfg.contextual_len,
        total_len=batch.num_tokens,
        padded_len=padded_length(batch.num_tokens, batch.device),
    )


def custom_mask_mod(cfg: HSTUConfig, layout: JaggedLayout) -> MaskMod:
    """The configured named rule over global token indices, never across sequences."""
    return and_masks(jagged(layout), mask_rule(cfg.mask)(layout, cfg))


def bias_tables(batch: JaggedBatch, positions: Tensor) -> BiasTables:
    T = batch.num_tokens
    timestamps = batch.timestamps
    if timestamps is None:
        timestamps = torch.zeros(T, dtype=torch.int64, device=batch.device)
    next_ts = next_timestamps(timestamps, batch.offsets, batch.query_time)
    return BiasTables(timestamps.to(torch.int64), next_ts, positions)


def prepare(model: HSTU, batch: JaggedBatch) -> HSTUInputs | MixtureInputs:
    """The inputs of one batch on one device (any backend, any configured mask); under a
    mixture of transducers (``mot_streams > 1``) one set per stream."""
    cfg = model.cfg
    if cfg.mot_streams > 1:
        return prepare_streams(model, batch)
    inputs = _prepare(model.cfg, batch)
    if cfg.truncate_after <= 0 or cfg.truncate_len <= 0:
        return inputs
    keep, offsets = truncation_rows(cfg, batch)
    short = JaggedBatch(
        batch.item_ids[keep],
        offsets,
        batch.timestamps[keep] if batch.timestamps is not None else None,
        batch.query_time,
        batch.num_targets,
    )
    later = _prepare(cfg, short, divisor=truncated_divisor(cfg))
    return dataclasses.replace(inputs, truncation=Truncation(keep, offsets, later))


def prepare_streams(model: HSTU, batch: JaggedBatch) -> MixtureInputs:
    """Each stream's rows as their own jagged batch (flexgr.model.hstu.mot)."""
    if batch.num_targets is not None:
        raise ValueError("a mixture of transducers does not take targets (num_targets) yet")
    stream_of_row = model.item_stream[batch.item_ids]
    streams = []
    for s in range(model.cfg.mot_streams):
        rows, sub, latest = stream_batch(batch, stream_of_row, s)
        streams.append(StreamInputs(rows, _prepare(model.cfg, sub), latest))
    return MixtureInputs(tuple(streams))


def truncated_divisor(cfg: HSTUConfig) -> int:
    """N of the truncated layers: the longest sequence they can see, plus the model's margin
    (as for the full layers), capped by the full N."""
    return min(cfg.attn_len, cfg.contextual_len + cfg.truncate_len + cfg.len_margin)


def truncation_rows(cfg: HSTUConfig, batch: JaggedBatch) -> tuple[Tensor, Tensor]:
    """(kept rows, their offsets): per sequence its contextual prefix, its ``truncate_len``
    most recent history tokens and its targets, in order. One host sync (the kept count)."""
    offsets = batch.offsets.to(torch.int64)
    T = batch.num_tokens
    seq, local = seq_ids_and_local(offsets, T)
    seq, local = seq.long(), local.long()
    lengths = (offsets[1:] - offsets[:-1])[seq]
    targets = batch.num_targets.to(torch.int64)[seq] if batch.num_targets is not None else 0
    tail = lengths - (cfg.truncate_len + targets)
    kept = (local < cfg.contextual_len) | (local >= tail)
    keep = kept.nonzero().squeeze(1)
    counts = torch.zeros(offsets.numel() - 1, dtype=torch.int64, device=offsets.device)
    counts.index_add_(0, seq, kept.long())
    return keep, torch.cat([offsets[:1], counts.cumsum(0)])


def _prepare(cfg: HSTUConfig, batch: JaggedBatch, divisor: int | None = None) -> HSTUInputs:
    T = batch.num_tokens
    backend = backend_choice(cfg, batch.device, training=torch.is_grad_enabled()).backend
    mask: HSTUMask | None = None
    fused: BiasInputs | None = None
    if cfg.mask != BUILTIN_RULE:
        layout = batch_layout(cfg, batch)
        if backend == "triton" and kernel_rule(cfg.mask):
            # Semi-local attention: the kernel evaluates it inline and visits only the key
            # blocks its two bands reach (block tables from the band statistics, no host sync).
            mask = build_semi_local_mask(
                batch.offsets, cfg.sla_local, cfg.sla_global, mode=cfg.sla_mode, total_len=T,
                max_len=cfg.attn_len,
            )
        else:
            mask = build_custom_mask(
                custom_mask_mod(cfg, layout), batch.offsets, total_len=T,
                padded_len=layout.padded_len,
            )
    elif backend == "reference":
        layout = build_layout(
            batch.offsets, num_targets=batch.num_targets, contextual_len=cfg.contextual_len,
            total_len=T,
        )
    elif backend == "triton" and prepare_mode(batch.device) == "triton":
        # The mask and the per-token bias tables from the same two Triton launches.
        from flexgr.ops.triton_hstu.prepare import hstu_mask_and_bias

        mask, fused = hstu_mask_and_bias(
            batch.offsets, num_targets=batch.num_targets, timestamps=batch.timestamps,
            query_time=batch.query_time, contextual_len=cfg.contextual_len,
            max_attn_len=cfg.max_attn_len, full_attn_tail=cfg.full_attn_tail, total_len=T,
            max_len=cfg.attn_len,
        )
        layout = mask.layout
    else:
        mask = build_hstu_mask(
            batch.offsets, num_targets=batch.num_targets, contextual_len=cfg.contextual_len,
            max_attn_len=cfg.max_attn_len, full_attn_tail=cfg.full_attn_tail, total_len=T,
            max_len=cfg.attn_len,  # block tables from a fixed band: no host sync
        )
        layout = mask.layout
    # HSTU position ids: the in-sequence index, except that contextual tokens share 0 and all
    # candidates share the first candidate's position (so they are interchangeable).
    if fused is None:
        positions = layout.pos_id[:T].long()
        tables = bias_tables(batch, positions)
    else:
        positions = fused.positions
        tables = BiasTables(fused.timestamps, fused.next_timestamps, positions)
    attention = LocalAttention(
        offsets=batch.offsets,
        backend=backend,
        tables=tables,
        mask=mask,
        num_targets=batch.num_targets,
        contextual_len=cfg.contextual_len,
        max_attn_len=cfg.max_attn_len,
        full_attn_tail=cfg.full_attn_tail,
        divisor=divisor,
        softmax=cfg.attention == "softmax",
        kernel_tables=_kernel_tables(cfg, mask, tables, fused) if backend == "triton" else None,
    )
    return HSTUInputs(positions=positions, attention=attention, offsets=batch.offsets)


def _kernel_tables(
    cfg: HSTUConfig, mask: HSTUMask | None, tables: BiasTables, fused: BiasInputs | None
) -> MaskTables | None:
    """The Triton kernel's tables for this batch, or None where the kernel would not
    take the call (an empty batch; the per-call path then decides)."""
    if mask is None or mask.spec is None or mask.total_len == 0:
        return None
    from flexgr.ops.rab import BUCKET_DIVISOR
    from flexgr.ops.triton_hstu import launch, prepare

    if fused is not None:  # already in the kernel's dtypes: no conversions
        return prepare.kernel_tables(
            mask, fused, rel_bias=cfg.rel_bias, rab_n=cfg.attn_len,
            num_buckets=cfg.num_time_buckets, bucket_divisor=BUCKET_DIVISOR,
        )

    if not cfg.rel_bias:
        return launch.bias_tables(mask)
    return launch.bias_tables(
        mask,
        positions=tables.positions,
        timestamps=tables.timestamps,
        next_timestamps=tables.next_timestamps,
        rab_n=cfg.attn_len,
        num_buckets=cfg.num_time_buckets,
        bucket_divisor=BUCKET_DIVISOR,
    )
