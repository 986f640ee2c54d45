"""HSTU attention under context parallelism: local queries against all-gathered keys and values.

HSTU attention is a plain sum over keys (no softmax), so a query's output over the full key set is
exactly what one call over the gathered keys returns: no log-sum-exp merge is needed.

K and V are exchanged with one all-gather per layer (backward: reduce-scatter) rather than a ring:
per-sequence head-tail shards make every rank's queries need keys from every other rank, the
gathered K/V of the model sizes here are small next to the O(T^2) attention work, and it keeps
one kernel call per layer that any backend can serve (docs/distributed.md has the cost model).

Backends: ``reference`` (dense per sequence, any device; the CPU/gloo path), ``flex``
(FlexAttention with Q_LEN = S and KV_LEN = C*S, masks and bias remapped to global indices) and
``triton`` (the single-device kernel over the global token axis, rows restricted to this rank's
queries: :mod:`flexgr.distributed.cp_triton`). Triton takes the built-in rule only; a custom
mask_mod falls back to flex with a one-time warning.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from flexgr.distributed.collectives import all_gather_tokens
from flexgr.distributed.cp_dense import attend_gathered_reference
from flexgr.distributed.cp_flex import attend_gathered_flex
from flexgr.distributed.cp_mask import CPMask, build_cp_mask
from flexgr.distributed.cp_triton import attend_gathered_triton, gather_attend_triton
from flexgr.distributed.sharding import TokenShard
from flexgr.ops.attention import BACKENDS
from flexgr.ops.flex import cpu_needs_fallback
from flexgr.ops.rab import RelativeBias

# ---------------------------------------------------------------- backend choice


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def resolve_cp_backend(backend: str, device: torch.device, *tensors: Tensor | None) -> str:
    """The backend that will actually run a CP call (warning once when it is not the one asked)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from flexgr.ops import triton_backend

    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        backend = "triton" if triton_backend.available() else "flex"
    if backend == "triton" and not triton_backend.available():
        _warn_once(
            "flexgr: the triton kernels cannot run here (no CUDA, or triton missing); "
            "context-parallel attention uses flex instead."
        )
        backend = "flex"
    if backend == "flex" and device.type != "cuda" and cpu_needs_fallback(*tensors):
        _warn_once(
            "flexgr: FlexAttention has no backward on CPU; context-parallel attention uses the "
            "dense reference instead (same result)."
        )
        backend = "reference"
    return backend


def attend_gathered(
    q: Tensor,
    k_all: Tensor,
    v_all: Tensor,
    mask: CPMask,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
    backend: str = "auto",
) -> Tensor:
    """Backend-agnostic attention of local queries [T_r, H, D] against gathered keys and values
    [C*S, H, D] (slots as in ``mask.kv_index``). No communication: the all-gather is the caller's."""
    tensors = (q, k_all, v_all) + ((rab.pos_w, rab.ts_w) if rab is not None else ())
    backend = resolve_cp_backend(backend, q.device, *tensors)
    kw = {"max_seq_len": max_seq_len, "alpha": alpha, "rab": rab}
    if backend == "reference":
        return attend_gathered_reference(q, k_all, v_all, mask, **kw)
    if backend == "triton" and mask.spec is None:
        _warn_once(
            "flexgr: the triton kernel evaluates the built-in HSTU rule only; context-parallel "
            "attention with a custom mask_mod uses flex instead."
        )
        backend = "flex"
    if backend == "triton":
        return attend_gathered_triton(q, k_all, v_all, mask, **kw)
    return attend_gathered_flex(q, k_all, v_all, mask, **kw)


def _check(q: Tensor, k: Tensor, v: Tensor, mask: CPMask, rab: RelativeBias | None) -> None:
    shard = mask.shard
    if not (q.shape[0] == k.shape[0] == v.shape[0] == shard.local_len):
        raise ValueError(
            f"q, k, v must hold this rank's {shard.local_len} tokens, got {q.shape[0]}, "
            f"{k.shape[0]}, {v.shape[0]}"
        )
    if rab is not None:
        T = shard.total_len
        for name, t in (
            ("timestamps", rab.timestamps),
            ("next_timestamps", rab.next_timestamps),
            ("positions", rab.positions),
        ):
            if t is not None and t.shape != (T,):
                raise ValueError(
                    f"under context parallelism rab.{name} must cover the GLOBAL batch [{T}], "
                    f"got shape {tuple(t.shape)}"
                )


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: CPMask,
    group: ProcessGroup,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
    backend: str = "auto",
) -> Tensor:
    """HSTU attention of this rank's tokens (q, k, v: [T_r, H, D], in ``mask.shard`` order).

    ``rab`` carries the GLOBAL per-token tables (timestamps, next_timestamps, positions: [T]);
    ``max_seq_len`` is the global divisor N. Returns [T_r, H, Dv]. Every rank of ``group`` must
    call it with the same batch (collective).
    """
    _check(q, k, v, mask, rab)
    tensors = (q, k, v) + ((rab.pos_w, rab.ts_w) if rab is not None else ())
    if resolve_cp_backend(backend, q.device, *tensors) == "triton":
        out = gather_attend_triton(
            q, k, v, mask, group, max_seq_len=max_seq_len, alpha=alpha, rab=rab
        )
        if out is not None:
            return out
    dqk = k.shape[-1]
    kv_SHX = mask.shard.pad_to_shard(torch.cat([k, v], dim=-1))
    kv_all = all_gather_tokens(kv_SHX, group)  # one collective for K and V together
    k_all, v_all = kv_all[..., :dqk], kv_all[..., dqk:]
    return attend_gathered(
        q, k_all, v_all, mask, max_seq_len=max_seq_len, alpha=alpha, rab=rab, backend=backend
    )


def cp_hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    shard: TokenShard,
    group: ProcessGroup,
    *,
    max_seq_len: int,
    alpha: float,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    rab: RelativeBias | None = None,
    backend: str = "auto",
) -> Tensor:
    """``hstu_attention`` for one rank's shard: builds the CP mask, then
    :func:`context_parallel_attention`. Build the mask once with ``build_cp_mask`` when several
    layers share a batch."""
    tensors = (q, k, v) + ((rab.pos_w, rab.ts_w) if rab is not None else ())
    resolved = resolve_cp_backend(backend, q.device, *tensors)
    mask = build_cp_mask(
        shard,
        num_targets=num_targets,
        contextual_len=contextual_len,
        max_attn_len=max_attn_len,
        full_attn_tail=full_attn_tail,
        with_block_mask=resolved == "flex",
    )
    return context_parallel_attention(
        q, k, v, mask, group, max_seq_len=max_seq_len, alpha=alpha, rab=rab, backend=backend
    )
