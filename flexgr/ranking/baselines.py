"""Ranking baselines in the same harness as HSTU ranking: same batches, heads, losses, metrics.

- :class:`SASRecRanker`: SASRec's causal softmax Transformer over the history's merged
  (item + action) tokens; the last state meets each candidate late, in the head
  (``[u, e, u * e]``), so a candidate never influences the encoder.
- :class:`TwoTowerRanker`: a user tower (mean of the history's item + action embeddings, then an
  MLP) and an item tower (an MLP of the item embedding); each task's logit is the dot product of
  the two towers' outputs for that task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flexgr.model.embedding import ItemEmbedding, SequenceInput
from flexgr.model.sasrec.model import SASRecConfig, SASRecLayer
from flexgr.ops.jagged import lengths_of
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.modules import ActionEncoder, MultiTaskHead
from flexgr.ranking.tokens import segments


@dataclass(frozen=True)
class HistoryInputs:
    """Per-batch tables of a history-only encoder."""

    positions: Tensor  # [H] index of each event in its history
    last_rows: Tensor  # [B] the last history event of each sequence
    candidate_seq: Tensor  # [C] the sequence of each candidate
    history_seq: Tensor  # [H] the sequence of each history event
    max_len: int  # longest history (SASRec's padded attention)


def prepare_history(model: nn.Module, batch: RankingBatch) -> HistoryInputs:
    H, C = batch.num_history, batch.num_candidates
    h_seq, h_local = segments(batch.history_offsets, H)
    c_seq, _ = segments(batch.candidate_offsets, C)
    offsets = batch.history_offsets
    # SASRec pads its attention to the longest history: the one host sync of its batch, outside
    # the forward. The two-tower model reads no max_len, so it skips the sync (0); anything
    # else (SASRec, or a model wrapped by DDP or torch.compile) gets the real value.
    max_len = 0
    if not isinstance(model, TwoTowerRanker) and offsets.numel() > 1:
        max_len = int(lengths_of(offsets).max())
    return HistoryInputs(h_local.long(), offsets[1:] - 1, c_seq, h_seq, max_len)


@dataclass
class SASRecRankingConfig(SASRecConfig):
    action_dim: int = 16
    action_encoding: Literal["categorical", "bits"] = "categorical"
    head_hidden: int = 64
    action_inputs: list[str] = field(default_factory=lambda: ["rating"])
    action_vocab: list[int] = field(default_factory=lambda: [11])
    tasks: list[str] = field(default_factory=lambda: ["like"])
    task_kinds: list[str] = field(default_factory=lambda: ["bce"])


class SASRecRanker(nn.Module):
    def __init__(self, cfg: SASRecRankingConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.num_heads:
            raise ValueError(f"d_model ({cfg.d_model}) must be divisible by num_heads")
        if cfg.layout != "pre_ln":
            raise ValueError("the SASRec ranking baseline has only layout 'pre_ln'")
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = ItemEmbedding(cfg.num_items, d)
        self.actions = ActionEncoder(
            cfg.action_inputs, cfg.action_vocab, cfg.action_encoding, cfg.action_dim, d
        )
        self.input = SequenceInput(cfg.attn_len, d, cfg.input_dropout)
        self.layers = nn.ModuleList(SASRecLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)
        self.head = MultiTaskHead(3 * d, cfg.head_hidden, len(cfg.tasks), cfg.dropout)

    @property
    def output_bias(self) -> Tensor:
        return self.head.output_bias

    def forward(self, batch: RankingBatch, inputs: HistoryInputs) -> Tensor:
        tokens = self.item_emb(batch.history_items) + self.actions(batch.history_actions)
        x = self.input(tokens, inputs.positions)
        for layer in self.layers:
            x = layer(x, batch.history_offsets, inputs.max_len)
        user = self.final_norm(x)[inputs.last_rows][inputs.candidate_seq]
        item = self.item_emb(batch.candidates)
        return self.head(torch.cat([user, item, user * item], dim=-1))


@dataclass
class TwoTowerConfig:
    num_items: int
    max_seq_len: int = 200
    d_model: int = 64
    hidden: int = 128
    dropout: float = 0.2
    action_dim: int = 16
    action_encoding: Literal["categorical", "bits"] = "categorical"
    action_inputs: list[str] = field(default_factory=lambda: ["rating"])
    action_vocab: list[int] = field(default_factory=lambda: [11])
    tasks: list[str] = field(default_factory=lambda: ["like"])
    task_kinds: list[str] = field(default_factory=lambda: ["bce"])


def _tower(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, d_out)
    )


class TwoTowerRanker(nn.Module):
    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, K = cfg.d_model, len(cfg.tasks)
        self.item_emb = ItemEmbedding(cfg.num_items, d)
        self.actions = ActionEncoder(
            cfg.action_inputs, cfg.action_vocab, cfg.action_encoding, cfg.action_dim, d
        )
        self.user_tower = _tower(d, cfg.hidden, K * d, cfg.dropout)
        self.item_tower = _tower(d, cfg.hidden, K * d, cfg.dropout)
        self.bias = nn.Parameter(torch.zeros(K))

    @property
    def output_bias(self) -> Tensor:
        return self.bias

    def towers(
        self,
        batch: RankingBatch,
        history_seq: Tensor,
        candidate_seq: Tensor,
        candidates_Cd: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(user [C, K, d]: the user tower of each candidate's sequence, item [C, K, d], the
        history tokens [H, d] it pooled). GESR reads them beside the dot product, and passes
        the candidates' item embeddings [C, d] it looked up already."""
        d, K, B = self.cfg.d_model, len(self.cfg.tasks), batch.num_sequences
        tokens = self.item_emb(batch.history_items) + self.actions(batch.history_actions)
        summed = tokens.new_zeros(B, d).index_add(0, history_seq, tokens)
        counts = (batch.history_offsets[1:] - batch.history_offsets[:-1]).clamp_min(1)
        user = self.user_tower(summed / counts.unsqueeze(1).to(tokens.dtype)).view(B, K, d)
        if candidates_Cd is None:
            candidates_Cd = self.item_emb(batch.candidates)
        item = self.item_tower(candidates_Cd).view(-1, K, d)
        return user[candidate_seq], item, tokens

    def logits(self, user_CKd: Tensor, item_CKd: Tensor) -> Tensor:
        """[C, K]: each task's scaled dot product plus its output bias."""
        return (user_CKd * item_CKd).sum(-1) / math.sqrt(self.cfg.d_model) + self.bias

    def forward(self, batch: RankingBatch, inputs: HistoryInputs) -> Tensor:
        user, item, _ = self.towers(batch, inputs.history_seq, inputs.candidate_seq)
        return self.logits(user, item)


def validate_common(options: dict[str, Any]) -> None:
    if options["action_dim"] < 1:
        raise ValueError("model.action_dim must be >= 1")
    for key in ("head_hidden", "hidden", "d_model", "num_layers", "num_heads"):
        if key in options and options[key] < 1:
            raise ValueError(f"model.{key} must be >= 1")
