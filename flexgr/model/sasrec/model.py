"""SASRec (Kang & McAuley 2018): the softmax causal Transformer baseline, in two block layouts:
``pre_ln`` (a standard pre-LN Transformer block and a final LayerNorm) and ``reference`` (the
block of the original SASRec and of the reference HSTU trainer's SASRec baseline).

Architecture only; its per-batch inputs come from :mod:`flexgr.model.sasrec.inputs`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexgr.model.embedding import ItemEmbedding, SequenceInput, l2_normalize
from flexgr.model.sasrec.inputs import SASRecInputs
from flexgr.ops.jagged import to_jagged, to_padded


@dataclass
class SASRecConfig:
    num_items: int
    d_model: int = 50
    num_layers: int = 2
    num_heads: int = 1
    ffn_dim: int = 50
    max_seq_len: int = 200
    len_margin: int = 11
    dropout: float = 0.2
    attn_dropout: float = 0.2
    input_dropout: float = 0.2
    # "pre_ln": x + attn(LN(x)), then x + FFN(LN(x)), a final LayerNorm, PyTorch's default
    # init. "reference": the reference trainer's block (ReferenceSASRecLayer), no final norm,
    # xavier-normal weights and its positional init (docs/reference-differences.md).
    layout: Literal["pre_ln", "reference"] = "pre_ln"

    @property
    def attn_len(self) -> int:
        return self.max_seq_len + self.len_margin


class SASRecLayer(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d, eps=1e-8)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.ffn_dim, d)
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_TD: Tensor, offsets: Tensor, max_len: int) -> Tensor:
        p = self.cfg.attn_dropout if self.training else 0.0
        attn_TD = _causal_attention(self.qkv(self.norm1(x_TD)), offsets, max_len, self.cfg, p)
        x_TD = x_TD + self.dropout(self.proj(attn_TD))
        return x_TD + self.dropout(self.ffn(self.norm2(x_TD)))


def _causal_attention(
    qkv_T3D: Tensor, offsets: Tensor, max_len: int, cfg: SASRecConfig, p: float
) -> Tensor:
    """Causal multi-head softmax attention of jagged rows (queries, keys and values packed side
    by side, as one projection makes them), through padded SDPA."""
    T, d = qkv_T3D.shape[0], cfg.d_model
    H = cfg.num_heads
    qkv = to_padded(qkv_T3D, offsets, max_len)  # [B, N, 3d]
    B, N, _ = qkv.shape
    q, k, v = qkv.view(B, N, 3, H, d // H).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, dh]
    # Right-padded sequences: causal attention never lets a real row see padding.
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
    return to_jagged(attn.transpose(1, 2).reshape(B, N, d), offsets, T)


class ReferenceSASRecLayer(nn.Module):
    """The original SASRec block, as the reference trainer's SASRec baseline builds it: queries
    from LN(x) but keys and values from x itself, then z = LN(LN(x) + attention) and z + FFN(z).
    Its layer norms have no affine weights (eps 1e-8), the attention output has no dropout (the
    attention weights do), and every weight matrix starts xavier-normal (the packed q/k/v
    projection as one [3d, d] matrix, as ``nn.MultiheadAttention`` holds it) with zero
    attention biases."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.in_proj = nn.Linear(d, 3 * d)  # rows: q, k, v
        self.proj = nn.Linear(d, d)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ffn_dim, d),
            nn.Dropout(cfg.dropout),
        )
        for weight in (
            self.in_proj.weight,
            self.proj.weight,
            self.ffn[0].weight,
            self.ffn[3].weight,
        ):
            nn.init.xavier_normal_(weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x_TD: Tensor, offsets: Tensor, max_len: int) -> Tensor:
        d = self.cfg.d_model
        normed = F.layer_norm(x_TD, (d,), eps=1e-8)
        w, b = self.in_proj.weight, self.in_proj.bias
        q = F.linear(normed, w[:d], b[:d])
        kv = F.linear(x_TD, w[d:], b[d:])
        p = self.cfg.attn_dropout if self.training else 0.0
        attn = _causal_attention(torch.cat([q, kv], dim=-1), offsets, max_len, self.cfg, p)
        z = F.layer_norm(normed + self.proj(attn), (d,), eps=1e-8)
        return z + self.ffn(z)


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.num_heads:
            raise ValueError(
                f"d_model ({cfg.d_model}) must be divisible by num_heads ({cfg.num_heads})"
            )
        self.cfg = cfg
        self.item_emb = ItemEmbedding(cfg.num_items, cfg.d_model)
        self.input = SequenceInput(cfg.attn_len, cfg.d_model, cfg.input_dropout)
        if cfg.layout not in ("pre_ln", "reference"):
            raise ValueError(f"layout must be 'pre_ln' or 'reference', not {cfg.layout!r}")
        block = ReferenceSASRecLayer if cfg.layout == "reference" else SASRecLayer
        self.layers = nn.ModuleList(block(cfg) for _ in range(cfg.num_layers))
        self.final_norm: nn.Module = nn.LayerNorm(cfg.d_model, eps=1e-8)
        if cfg.layout == "reference":
            # The reference leaves its input module's own init in place for SASRec: positions
            # truncated-normal with std sqrt(1/d), cut at 2 std; and no norm before the L2 norm.
            std = math.sqrt(1.0 / cfg.d_model)
            nn.init.trunc_normal_(self.input.pos, std=std, a=-2 * std, b=2 * std)
            self.final_norm = nn.Identity()

    def forward(self, item_ids: Tensor, inputs: SASRecInputs) -> Tensor:
        x = self.input(self.item_emb(item_ids), inputs.positions)
        for layer in self.layers:
            x = layer(x, inputs.offsets, inputs.max_len)
        return l2_normalize(self.final_norm(x))

    def item_embeddings(self, ids: Tensor | None = None) -> Tensor:
        return self.item_emb.normalized(ids)
