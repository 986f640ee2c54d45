"""``hstu_attention``: one API over the reference, flex and (on CUDA) triton backends."""

from __future__ import annotations

import torch
from torch import Tensor

from flexgr.masks.block import HSTUMask, build_hstu_mask
from flexgr.ops.rab import RelativeBias
from flexgr.ops.reference import hstu_attention_reference

BACKENDS = ("auto", "reference", "flex", "triton")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def validate_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    *,
    max_seq_len: int,
    num_targets: Tensor | None,
    contextual_len: int,
    max_attn_len: int,
    full_attn_tail: int,
    rab: RelativeBias | None,
) -> None:
    """Raise ValueError naming the offending argument. Syncs with the device once."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(x.dim() == 3, f"{name} must be [T, H, D], got shape {tuple(x.shape)}")
    _check(q.shape == k.shape, f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    _check(v.shape[:2] == q.shape[:2], f"v must be [T, H, Dv] with q's T and H, got {tuple(v.shape)} vs q {tuple(q.shape)}")
    _check(q.dtype == k.dtype == v.dtype, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q.is_floating_point(), f"q, k, v must be floating point, got {q.dtype}")
    _check(q.device == k.device == v.device == offsets.device, "q, k, v and offsets must be on one device")
    _check(offsets.dim() == 1 and offsets.numel() >= 2, f"offsets must be [B + 1] with B >= 1, got shape {tuple(offsets.shape)}")
    _check(not offsets.is_floating_point(), f"offsets must be an integer tensor, got {offsets.dtype}")
    _check(max_seq_len >= 1, f"max_seq_len must be >= 1, got {max_seq_len}")
    _check(contextual_len >= 0, f"contextual_len must be >= 0, got {contextual_len}")
    _check(max_attn_len >= 0, f"max_attn_len must be >= 0, got {max_attn_len}")
    _check(full_attn_tail >= 0, f"full_attn_tail must be >= 0, got {full_attn_tail}")
    T = q.shape[0]
    B = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    stats = [offsets[0], offsets[-1], lengths.min(), lengths.max()]
    if num_targets is not None:
        _check(num_targets.shape == (B,), f"num_targets must be [B] = [{B}], got shape {tuple(num_targets.shape)}")
        _check(not num_targets.is_floating_point(), f"num_targets must be an integer tensor, got {num_targets.dtype}")
        nt = num_targets.to(offsets.device, offsets.dtype)
        stats += [nt.min(), (nt + contextual_len - lengths).max()]
    first, last, min_len, max_len, *rest = torch.stack(stats).tolist()
    _check(first == 0, f"offsets must start at 0, got offsets[0] = {first}")
    _check(min_len >= 0, "offsets must be non-decreasing")
    _check(last == T, f"offsets must end at T = q.shape[0] = {T}, got offsets[-1] = {last}")
    _check(max_len <= max_seq_len, f"max_seq_len = {max_seq_len} is smaller than the longest sequence ({max_len})")
    if rest:
        nt_min, overflow = rest
        _check(nt_min >= 0, "num_targets must be >= 0")
        _check(overflow <= 0, "num_targets is longer than its sequence (minus contextual_len) for some sequence")
    if rab is not None:
        _check(rab.pos_w.dim() == 1 and rab.pos_w.numel() % 2 == 1, f"rab.pos_w must be [2N - 1], got shape {tuple(rab.pos_w.shape)}")
        _check(rab.max_len >= max_len, f"rab.pos_w covers sequences up to {rab.max_len}, but one has {max_len} tokens")
        _check(rab.ts_w.dim() == 1 and rab.ts_w.numel() >= 1, f"rab.ts_w must be [num_buckets + 1], got shape {tuple(rab.ts_w.shape)}")
        for name, t in (("rab.timestamps", rab.timestamps), ("rab.next_timestamps", rab.next_timestamps)):
            _check(t.shape == (T,), f"{name} must be [T] = [{T}], got shape {tuple(t.shape)}")


def default_backend(device: torch.device) -> str:
    """Fastest correct backend for a device: the dense reference on CPU (compiled flex on CPU has
    no LSE and no backward, and eager flex is dense over all T x T pairs)."""
    if device.type != "cuda":
        return "reference"
    from flexgr.ops import triton_backend

    return "triton" if triton_backend.available() else "flex"


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    rab: RelativeBias | None = None,
    backend: str = "auto",
    mask: HSTUMask | None = None,
    validate: bool = True,
) -> Tensor:
    """HSTU pointwise attention over packed sequences.

    out_i = sum_j silu(alpha * q_i . k_j + rab_ij) * mask_ij * v_j / max_seq_len

    q, k: [T, H, Dqk]; v: [T, H, Dv]; offsets: [B + 1]. Returns [T, H, Dv] in v's dtype.
    ``mask`` is a prebuilt :class:`HSTUMask` for this batch (share one across layers); when given,
    it must describe the same offsets and mask options.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if validate:
        validate_inputs(
            q, k, v, offsets,
            max_seq_len=max_seq_len, num_targets=num_targets, contextual_len=contextual_len,
            max_attn_len=max_attn_len, full_attn_tail=full_attn_tail, rab=rab,
        )
    if backend == "auto":
        backend = default_backend(q.device)
    if backend == "flex" and q.device.type != "cuda":
        from flexgr.ops.flex import _warn_cpu_fallback, cpu_needs_fallback

        tensors = (q, k, v) + ((rab.pos_w, rab.ts_w) if rab is not None else ())
        if cpu_needs_fallback(*tensors):
            _warn_cpu_fallback()
            backend = "reference"
    # Custom rules and semi-local attention: the dense oracle of the mask's own mask_mod (the
    # keyword options describe the built-in rule only).
    if (
        backend == "reference"
        and mask is not None
        and (mask.spec is None or mask.spec.semi_local)
    ):
        from flexgr.ops.reference import hstu_attention_custom_mask

        return hstu_attention_custom_mask(
            q, k, v, mask, max_seq_len=max_seq_len, alpha=alpha, rab=rab
        )
    if backend == "reference":
        return hstu_attention_reference(
            q, k, v, offsets,
            max_seq_len=max_seq_len, alpha=alpha, num_targets=num_targets,
            contextual_len=contextual_len, max_attn_len=max_attn_len,
            full_attn_tail=full_attn_tail, rab=rab,
        )
    if mask is None:
        mask = build_hstu_mask(
            offsets, num_targets=num_targets, contextual_len=contextual_len,
            max_attn_len=max_attn_len, full_attn_tail=full_attn_tail, total_len=q.shape[0],
        )
    if backend == "triton":
        from flexgr.ops import triton_backend

        return triton_backend.hstu_attention_triton(
            q, k, v, mask, max_seq_len=max_seq_len, alpha=alpha, rab=rab
        )
    from flexgr.ops.flex import hstu_attention_flex

    return hstu_attention_flex(q, k, v, mask, max_seq_len=max_seq_len, alpha=alpha, rab=rab)
