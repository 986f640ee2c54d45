"""HSTU (Zhai et al. 2024), the research model behind the public MovieLens and Amazon tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexgr.masks.block import HSTUMask, build_hstu_mask
from flexgr.masks.layout import build_layout
from flexgr.model.embedding import ItemEmbedding, SequenceInput, l2_normalize
from flexgr.ops.attention import default_backend, hstu_attention
from flexgr.ops.rab import RelativeBias, next_timestamps


AttentionFn = Callable[..., Tensor]
"""Called like :func:`hstu_attention`. A seam for code that runs the layers differently (context
parallelism passes one bound to its shard); the model itself always uses ``hstu_attention``."""


@dataclass
class HSTUConfig:
    num_items: int
    d_model: int = 50
    num_layers: int = 2
    num_heads: int = 1
    dqk: int = 50
    dv: int = 50
    max_seq_len: int = 200
    # The reference pads to max_seq_len + gr_output_length + 1 (= 211 on ML-1M); that length is
    # both the attention divisor N and the size of the position tables.
    len_margin: int = 11
    dropout: float = 0.2
    input_dropout: float = 0.2
    alpha: float | None = None  # None means 1.0, as in the reference; 1/sqrt(dqk) is an option
    norm_affine: bool = False
    norm_eps: float = 1e-6
    concat_ua: bool = False  # production variant: out = W [u, attn, u * LN(attn)]
    rel_bias: bool = True
    num_time_buckets: int = 128
    backend: str = "auto"

    @property
    def attn_len(self) -> int:
        return self.max_seq_len + self.len_margin


@dataclass(frozen=True)
class HSTUTokens:
    """Per-token tables of one packed batch: [T] positions (HSTU position ids), timestamps and
    next timestamps, plus what the attention call needs besides q, k, v."""

    offsets: Tensor
    positions: Tensor
    timestamps: Tensor
    next_ts: Tensor
    num_targets: Tensor | None
    mask: HSTUMask | None
    backend: str


class RelativePositionTimeBias(nn.Module):
    """One bias shared by all heads: w_pos[N - 1 + j - i] + w_time[bucket(ts_next[i] - ts[j])]."""

    def __init__(self, max_len: int, num_buckets: int) -> None:
        super().__init__()
        self.pos_w = nn.Parameter(torch.empty(2 * max_len - 1).normal_(0, 0.02))
        self.ts_w = nn.Parameter(torch.empty(num_buckets + 1).normal_(0, 0.02))

    def forward(self, timestamps: Tensor, next_ts: Tensor, positions: Tensor) -> RelativeBias:
        return RelativeBias(self.pos_w, self.ts_w, timestamps, next_ts, positions)


class HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, d = cfg.num_heads, cfg.d_model
        self.splits = [H * cfg.dv, H * cfg.dv, H * cfg.dqk, H * cfg.dqk]
        self.uvqk = nn.Parameter(torch.empty(d, sum(self.splits)).normal_(0, 0.02))
        self.input_norm = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        self.attn_norm = nn.LayerNorm(H * cfg.dv, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        self.out = nn.Linear(H * cfg.dv * (3 if cfg.concat_ua else 1), d)
        nn.init.xavier_uniform_(self.out.weight)
        self.dropout = nn.Dropout(cfg.dropout)
        self.rab = RelativePositionTimeBias(cfg.attn_len, cfg.num_time_buckets) if cfg.rel_bias else None

    def forward(
        self,
        x_TD: Tensor,
        offsets: Tensor,
        *,
        timestamps: Tensor,
        next_ts: Tensor,
        positions: Tensor,
        num_targets: Tensor | None,
        mask: HSTUMask | None,
        backend: str,
        attention: AttentionFn = hstu_attention,
    ) -> Tensor:
        cfg = self.cfg
        T, H = x_TD.shape[0], cfg.num_heads
        u, v, q, k = torch.split(F.silu(self.input_norm(x_TD) @ self.uvqk), self.splits, dim=-1)
        rab = self.rab(timestamps, next_ts, positions) if self.rab is not None else None
        attn_THD = attention(
            q.reshape(T, H, cfg.dqk),
            k.reshape(T, H, cfg.dqk),
            v.reshape(T, H, cfg.dv),
            offsets,
            max_seq_len=cfg.attn_len,
            alpha=1.0 if cfg.alpha is None else cfg.alpha,
            num_targets=num_targets,
            rab=rab,
            backend=backend,
            mask=mask,
            validate=False,
        )
        attn = attn_THD.reshape(T, H * cfg.dv)
        gated = u * self.attn_norm(attn)
        if cfg.concat_ua:
            gated = torch.cat([u, attn, gated], dim=-1)
        return x_TD + self.out(self.dropout(gated))


class HSTU(nn.Module):
    """Jagged in, jagged out: item ids [T] with offsets [B + 1] -> L2-normalised states [T, d]."""

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = ItemEmbedding(cfg.num_items, cfg.d_model)
        self.input = SequenceInput(cfg.attn_len, cfg.d_model, cfg.input_dropout)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers))

    def forward(
        self,
        item_ids: Tensor,
        offsets: Tensor,
        timestamps: Tensor | None = None,
        query_time: Tensor | None = None,
        num_targets: Tensor | None = None,
    ) -> Tensor:
        tokens = self.token_tables(item_ids, offsets, timestamps, query_time, num_targets)
        return self.encode(item_ids, tokens)

    def token_tables(
        self,
        item_ids: Tensor,
        offsets: Tensor,
        timestamps: Tensor | None = None,
        query_time: Tensor | None = None,
        num_targets: Tensor | None = None,
    ) -> HSTUTokens:
        """The per-token tables of one packed batch, shared by every layer."""
        T = item_ids.shape[0]
        backend = self.cfg.backend
        if backend == "auto":
            backend = default_backend(item_ids.device)
        mask = None
        if backend == "reference":
            layout = build_layout(offsets, num_targets=num_targets, total_len=T)
        else:
            mask = build_hstu_mask(offsets, num_targets=num_targets, total_len=T)
            layout = mask.layout
        # HSTU position ids: equal to the in-sequence index, except that all candidates share the
        # first candidate's position (so they are interchangeable).
        positions = layout.pos_id[:T].long()
        if timestamps is None:
            timestamps = torch.zeros(T, dtype=torch.int64, device=item_ids.device)
        next_ts = next_timestamps(timestamps, offsets, query_time)
        return HSTUTokens(offsets, positions, timestamps, next_ts, num_targets, mask, backend)

    def encode(
        self, item_ids: Tensor, tokens: HSTUTokens, attention: AttentionFn = hstu_attention
    ) -> Tensor:
        """Embeddings, layers and the output norm over ``item_ids`` described by ``tokens``."""
        x = self.input(self.item_emb(item_ids), tokens.positions)
        for layer in self.layers:
            x = layer(
                x, tokens.offsets, timestamps=tokens.timestamps, next_ts=tokens.next_ts,
                positions=tokens.positions, num_targets=tokens.num_targets, mask=tokens.mask,
                backend=tokens.backend, attention=attention,
            )
        return l2_normalize(x)

    def item_embeddings(self, ids: Tensor | None = None) -> Tensor:
        """L2-normalised item embeddings (all items when ids is None)."""
        return self.item_emb.normalized(ids)
