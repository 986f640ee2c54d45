"""Exact HSTU attention through FlexAttention.

FlexAttention always normalises with a softmax. With a score_mod that returns log(w(s)) for a
positive weight w, it returns o = sum m w v / sum m w and lse = log sum m w, so o * exp(lse) is
the unnormalised sum we need. SiLU is not positive, so two calls are combined:

- ``split`` (default): w+ = max(silu, 0) and w- = max(-silu, 0), out = S+ - S-. Both sums are of
  positive terms, so bf16 rounding stays close to a plain eager computation.
- ``shift``: w = silu + c with c > -min(silu) = 0.2785, and a second, uniform call gives the masked
  sum of V: out = S_w - c * sum(v). One call is cheap, but the subtraction cancels, so bf16 error
  is about twice that of eager.

Clamping (not -inf) keeps every row's lse finite and the backward free of NaN; the clamped weight
silu(1e-20) ~ 5e-21 is far below any rounding error.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from flexgr.masks.block import HSTUMask
from flexgr.ops.rab import RelativeBias
from flexgr.ops.rab_grad import with_table_grads

SHIFT_C = 0.3
_TINY = 1e-20
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


@functools.cache
def _compiled_flex() -> Callable[..., object]:
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def _flex(device: torch.device) -> Callable[..., object]:
    if device.type == "cuda":
        return _compiled_flex()
    return _eager_flex


def cpu_needs_fallback(*tensors: Tensor) -> bool:
    """FlexAttention has no backward on CPU (eager or compiled): such calls use the reference."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.cache
def _warn_cpu_fallback() -> None:
    warnings.warn(
        "flexgr: FlexAttention has no backward on CPU; backend='flex' computes this call with the "
        "dense reference instead (same result). Forward-only CPU calls use eager flex.",
        stacklevel=3,
    )


def _eager_flex(*args: object, **kwargs: object) -> object:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(*args, **kwargs)


BiasFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def table_bias(
    rab: RelativeBias, pos_q: Tensor, next_ts_q: Tensor, pos_k: Tensor, ts_k: Tensor
) -> BiasFn:
    """score -> score + rab(q, kv) from per-query-slot and per-key-slot tables (the same tables on
    one device; slot tables under context parallelism), every gather index clamped in range."""
    # Detached: flex's own captured-buffer backward does not compile for these gathers on
    # torch 2.11; the table gradients come from a bridge (rab_grad, cp_flex) instead.
    pos_w, ts_w = rab.pos_w.detach().float(), rab.ts_w.detach().float()
    N, nb, div = rab.max_len, rab.num_buckets, rab.bucket_divisor

    def add_bias(s: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        rel = (N - 1 + pos_k[kv] - pos_q[q]).clamp(0, 2 * N - 2)
        mag = (next_ts_q[q] - ts_k[kv]).abs().clamp(min=1).to(torch.float32)
        bucket = (torch.log(mag) / div).to(torch.int64).clamp(0, nb)
        return s + pos_w[rel] + ts_w[bucket]

    return add_bias


def _bias_fn(rab: RelativeBias | None, mask: HSTUMask) -> BiasFn:
    if rab is None:
        return lambda s, q, kv: s
    P, T = mask.padded_len, mask.total_len
    if rab.positions is not None:
        local = F.pad(rab.positions.to(torch.int64), (0, P - T))
    else:
        local = mask.layout.local
    ts = F.pad(rab.timestamps.to(torch.int64), (0, P - T))
    nxt = F.pad(rab.next_timestamps.to(torch.int64), (0, P - T))
    return table_bias(rab, local, nxt, local, ts)


def _positive_log(x: Tensor) -> Tensor:
    """log(max(silu(x), 0)), clamped at silu(1e-20)."""
    xp = x.clamp(min=_TINY)
    return torch.log(xp) - F.softplus(-xp)


def _negative_log(x: Tensor) -> Tensor:
    """log(max(-silu(x), 0)), clamped likewise: -silu(x) = (-x) * sigmoid(-(-x))."""
    xn = (-x).clamp(min=_TINY)
    return torch.log(xn) - F.softplus(xn)


def _unnormalised(
    q4: Tensor, k4: Tensor, v4: Tensor, score_mod: ScoreMod, block_mask: BlockMask, alpha: float,
    kernel_options: dict | None = None,
) -> Tensor:
    out, aux = _flex(q4.device)(
        q4, k4, v4, score_mod=score_mod, block_mask=block_mask, scale=alpha,
        return_aux=AuxRequest(lse=True), kernel_options=kernel_options,
    )
    return out.float() * aux.lse.exp().unsqueeze(-1)


def shift_sum(
    q4: Tensor, k4: Tensor, v4: Tensor, add_bias: BiasFn, block_mask: BlockMask, alpha: float,
    kernel_options: dict | None = None,
) -> Tensor:
    """sum_j silu(alpha q.k + bias) v_j in fp32, [1, H, Q, Dv], by the shift transform: softmax
    over log(silu(s) + c) gives exp(lse) * out = sum (silu + c) v; a uniform call removes c sum v."""

    def shift_mod(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
        x = add_bias(s, qi, kv)
        return torch.log(x * torch.sigmoid(x) + SHIFT_C)

    def uniform_mod(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
        return s * 0.0

    acc = _unnormalised(q4, k4, v4, shift_mod, block_mask, alpha, kernel_options)
    # Scores do not matter in the uniform call: keep q/k out of its backward.
    vsum = _unnormalised(q4.detach(), k4.detach(), v4, uniform_mod, block_mask, alpha)
    return acc - SHIFT_C * vsum


def hstu_attention_flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: HSTUMask,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
    method: str = "shift",
) -> Tensor:
    T, H, _ = q.shape
    P = mask.padded_len

    def to_flex(x: Tensor) -> Tensor:  # [T, H, D] -> [1, H, P, D]
        return F.pad(x, (0, 0, 0, 0, 0, P - T)).transpose(0, 1).unsqueeze(0)

    q4, k4, v4 = to_flex(q), to_flex(k), to_flex(v)
    add_bias = _bias_fn(rab, mask)
    # With bias tables captured, the default 16-bit tile configs can exceed shared memory.
    opts = {"BLOCK_M": 64, "BLOCK_N": 64} if rab is not None and q.device.type == "cuda" else None

    if method == "split":

        def pos_mod(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
            return _positive_log(add_bias(s, qi, kv))

        def neg_mod(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
            return _negative_log(add_bias(s, qi, kv))

        acc = _unnormalised(q4, k4, v4, pos_mod, mask.block_mask, alpha, opts)
        acc = acc - _unnormalised(q4, k4, v4, neg_mod, mask.block_mask, alpha, opts)
    elif method == "shift":
        acc = shift_sum(q4, k4, v4, add_bias, mask.block_mask, alpha, opts)
    else:
        raise ValueError(f"method must be 'split' or 'shift', got {method!r}")
    out_THD = (acc[0].transpose(0, 1)[:T] / max_seq_len).to(v.dtype)
    if rab is not None:
        out_THD = with_table_grads(
            out_THD, q, k, v, rab, mask, mask.offsets, alpha=alpha, max_seq_len=max_seq_len
        )
    return out_THD
