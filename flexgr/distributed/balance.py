"""How evenly context parallelism spreads attention work: pairs (query, visible key) per rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flexgr.distributed.sharding import token_owner
from flexgr.masks.layout import JaggedLayout, build_layout


def pairs_per_query(
    layout: JaggedLayout, *, max_attn_len: int = 0, full_attn_tail: int = 0
) -> Tensor:
    """[T] int64: how many keys each query may see under the HSTU rule (see ``hstu_mask``).

    Closed form on position ids p, so it costs O(T) where counting the mask costs O(sum L^2):
    a row sees itself, every key with lo <= p(j) < p(i) (lo = p(i) - max_attn_len inside a window,
    0 otherwise), where id 0 is shared by the c contextual tokens; contextual rows (p = 0, c > 0)
    see every non-candidate token of their sequence instead.
    """
    T = layout.total_len
    p = layout.pos_id[:T].long()
    max_id = layout.max_id[:T].long()
    c = layout.contextual_len
    zero = torch.zeros_like(p)
    lo = zero
    if max_attn_len > 0:
        lo = (p - max_attn_len).clamp(min=0)
        if full_attn_tail > 0:
            lo = torch.where(p >= max_id - full_attn_tail, zero, lo)
    pairs = 1 + (p - lo)
    if c > 0:
        shares_id0 = (lo == 0) & (p >= 1)
        pairs = pairs + shares_id0.long() * (c - 1)
        # max_id = L - t - (c - 1), so the sequence has max_id + c - 1 non-candidate tokens.
        pairs = torch.where(p == 0, max_id + c - 1, pairs)
    return pairs


@dataclass(frozen=True)
class BalanceReport:
    scheme: str
    tokens_per_rank: tuple[int, ...]
    pairs_per_rank: tuple[int, ...]

    @property
    def imbalance(self) -> float:
        """max / mean pairs: 1.0 is perfect; the slowest rank sets the step time."""
        mean = sum(self.pairs_per_rank) / len(self.pairs_per_rank)
        return max(self.pairs_per_rank) / mean if mean > 0 else 1.0

    def __str__(self) -> str:
        return (
            f"{self.scheme}: pairs/rank {list(self.pairs_per_rank)}, tokens/rank "
            f"{list(self.tokens_per_rank)}, max/mean {self.imbalance:.3f}"
        )


def balance_report(
    offsets: Tensor,
    cp_size: int,
    *,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    scheme: str = "zigzag",
) -> BalanceReport:
    """Attention pairs and tokens per context-parallel rank for one packed batch. ``scheme`` is
    "zigzag" (what :func:`shard_tokens` does) or "contiguous" (rank r takes the r-th of C equal
    slices of every sequence), to show what the head-tail split buys."""
    offsets = offsets.to(torch.int64)
    T = int(offsets[-1])
    layout = build_layout(
        offsets, num_targets=num_targets, contextual_len=contextual_len, total_len=T
    )
    pairs = pairs_per_query(layout, max_attn_len=max_attn_len, full_attn_tail=full_attn_tail)
    owner = token_owner(offsets, cp_size, scheme, T)
    pairs_r = torch.zeros(cp_size, dtype=torch.int64, device=offsets.device).index_add_(
        0, owner, pairs
    )
    tokens_r = torch.bincount(owner, minlength=cp_size)
    return BalanceReport(
        scheme=scheme,
        tokens_per_rank=tuple(int(x) for x in tokens_r.tolist()),
        pairs_per_rank=tuple(int(x) for x in pairs_r.tolist()),
    )
