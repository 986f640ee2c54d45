"""SASRec (Kang & McAuley 2018): the softmax causal Transformer baseline, pre-LN with an FFN.

Architecture only; its per-batch inputs come from :mod:`flexgr.model.sasrec.inputs`."""

from __future__ import annotations

from dataclasses import dataclass

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
        cfg = self.cfg
        T, d = x_TD.shape
        H = cfg.num_heads
        qkv = to_padded(self.qkv(self.norm1(x_TD)), offsets, max_len)  # [B, N, 3d]
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3, H, d // H).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, dh]
        # Right-padded sequences: causal attention never lets a real row see padding.
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=cfg.attn_dropout if self.training else 0.0
        )
        attn_TD = to_jagged(attn.transpose(1, 2).reshape(B, N, d), offsets, T)
        x_TD = x_TD + self.dropout(self.proj(attn_TD))
        return x_TD + self.dropout(self.ffn(self.norm2(x_TD)))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.num_heads:
            raise ValueError(f"d_model ({cfg.d_model}) must be divisible by num_heads ({cfg.num_heads})")
        self.cfg = cfg
        self.item_emb = ItemEmbedding(cfg.num_items, cfg.d_model)
        self.input = SequenceInput(cfg.attn_len, cfg.d_model, cfg.input_dropout)
        self.layers = nn.ModuleList(SASRecLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=1e-8)

    def forward(self, item_ids: Tensor, inputs: SASRecInputs) -> Tensor:
        x = self.input(self.item_emb(item_ids), inputs.positions)
        for layer in self.layers:
            x = layer(x, inputs.offsets, inputs.max_len)
        return l2_normalize(self.final_norm(x))

    def item_embeddings(self, ids: Tensor | None = None) -> Tensor:
        return self.item_emb.normalized(ids)
