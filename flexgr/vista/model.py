"""VISTA ranking (``model.arch = "vista-ranking"``): summarise the history, then score the
candidates against the summary only.

    history tokens u_i = item_emb(item_i) + action_mlp(action_i)                  [H, d]
    stage 1          s = SeedSummariser(u)        S seed outputs per user          [B, S, d]
    stage 2          z = HSTU layers over [s; candidates], target-aware            [C, d]
    predictions        = MultiTaskHead(z)                                          [C, K]

Stage 1 is :class:`flexgr.vista.SeedSummariser` (HSTU SiLU attention under the seed mask, or
quasi-linear attention: ``summary_attention``); stage 2 is :mod:`flexgr.vista.target` (a
candidate sees every summary and itself, never another candidate). Stage 2 never reads the
history, so a stored summary (:mod:`flexgr.vista.cache`) scores exactly as a recomputed one:
:meth:`VistaRanker.score` takes the summary as an input.

Training adds the reconstruction loss (:class:`flexgr.vista.ReconstructionDecoder`, weight
``reconstruction_weight``; 0 turns it off) through the ranking trainer's auxiliary-loss hook:
each training forward stores it in ``aux_loss`` and the trainer adds it to the task loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flexgr.model.embedding import ItemEmbedding
from flexgr.model.hstu.model import HSTULayer
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.modules import ActionEncoder, MultiTaskHead
from flexgr.ranking.tokens import place
from flexgr.vista.qla import StateActivation
from flexgr.vista.reconstruction import ReconstructionConfig, ReconstructionDecoder
from flexgr.vista.summariser import (
    SeedSummariser,
    SummariserConfig,
    SummaryInputs,
    prepare_summary,
)
from flexgr.vista.target import TargetInputs, prepare_targets, target_layer_config


@dataclass
class VistaRankingConfig:
    num_items: int
    max_seq_len: int = 200  # history events (set from data.max_seq_len)
    d_model: int = 32
    num_heads: int = 1
    num_seeds: int = 16  # S: summary tokens per user (the paper: 128)
    summary_layers: int = 2  # stage 1 (the paper: 3)
    # Stage 1's attention: "silu" (HSTU under the seed mask, O(L^2)) or "qla" (O(L)).
    summary_attention: Literal["silu", "qla"] = "silu"
    qla_state: StateActivation = "silu"
    target_layers: int = 1  # stage 2 (the paper: 3)
    dropout: float = 0.2
    reconstruction_weight: float = 0.1  # 0: no reconstruction loss
    reconstruction_layers: int = 1
    action_dim: int = 16
    action_encoding: Literal["categorical", "bits"] = "categorical"
    head_hidden: int = 64
    # "auto": the fastest correct path per device (summariser_config, prepare_targets).
    backend: Literal["auto", "reference", "flex", "triton"] = "auto"
    action_inputs: list[str] = field(default_factory=lambda: ["rating"])
    action_vocab: list[int] = field(default_factory=lambda: [11])
    tasks: list[str] = field(default_factory=lambda: ["like"])
    task_kinds: list[str] = field(default_factory=lambda: ["bce"])

    def summariser_config(self) -> SummariserConfig:
        backend = {"auto": "auto", "reference": "padded", "flex": "flex", "triton": "flex"}
        return SummariserConfig(
            d_model=self.d_model, num_seeds=self.num_seeds, num_layers=self.summary_layers,
            num_heads=self.num_heads, max_history_len=self.max_seq_len, dropout=self.dropout,
            attention=self.summary_attention, qla_state=self.qla_state,
            backend=backend[self.backend],  # type: ignore[arg-type]
        )  # fmt: skip


@dataclass(frozen=True)
class VistaInputs:
    """Per-batch inputs, built outside the forward: stage 1's packing and stage 2's."""

    summary: SummaryInputs
    target: TargetInputs


class VistaRanker(nn.Module):
    """RankingBatch -> [C, K] logits (BCE tasks) or values (MSE tasks)."""

    def __init__(self, cfg: VistaRankingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = ItemEmbedding(cfg.num_items, d)
        self.actions = ActionEncoder(
            cfg.action_inputs, cfg.action_vocab, cfg.action_encoding, cfg.action_dim, d
        )
        summariser = cfg.summariser_config()
        self.summariser = SeedSummariser(summariser)
        self.decoder: ReconstructionDecoder | None = None
        if cfg.reconstruction_weight > 0:
            rec = ReconstructionConfig(cfg.reconstruction_layers, cfg.reconstruction_weight)
            self.decoder = ReconstructionDecoder(summariser, rec)
        layer = target_layer_config(d, cfg.num_heads, cfg.target_layers, cfg.num_seeds, cfg.dropout)
        self.target_layers = nn.ModuleList(HSTULayer(layer) for _ in range(cfg.target_layers))
        # A candidate has no action yet: its token is its item plus this learned action.
        self.placeholder = nn.Parameter(torch.empty(d).normal_(0, 0.02))
        self.head = MultiTaskHead(d, cfg.head_hidden, len(cfg.tasks), cfg.dropout)
        self.aux_loss: Tensor | None = None  # the last training forward's reconstruction loss

    @property
    def output_bias(self) -> Tensor:
        return self.head.output_bias

    def history_tokens(self, batch: RankingBatch) -> Tensor:
        """[H, d]: each history event's item plus action embedding."""
        return self.item_emb(batch.history_items) + self.actions(batch.history_actions)

    def summarise(self, batch: RankingBatch, inputs: SummaryInputs) -> Tensor:
        """Stage 1: the users' summaries [B, S, d]."""
        return self.summariser(self.history_tokens(batch), inputs)

    def score(self, summary_BSD: Tensor, candidates: Tensor, inputs: TargetInputs) -> Tensor:
        """Stage 2: [C, K] from the summaries [B, S, d] and the candidates' item ids [C]."""
        cand_CD = self.item_emb(candidates) + self.placeholder
        x = place(
            [inputs.summary_rows, inputs.candidate_rows],
            [summary_BSD.reshape(-1, self.cfg.d_model).to(cand_CD.dtype), cand_CD],
            inputs.num_tokens,
        )
        for layer in self.target_layers:
            x = layer(x, inputs.layers)
        return self.head(x[inputs.candidate_rows])

    def forward(self, batch: RankingBatch, inputs: VistaInputs) -> Tensor:
        history_TD = self.history_tokens(batch)
        summary_BSD = self.summariser(history_TD, inputs.summary)
        self.aux_loss = None
        if self.training and self.decoder is not None:
            self.aux_loss = self.decoder(summary_BSD, history_TD, inputs.summary)
        return self.score(summary_BSD, batch.candidates, inputs.target)


def prepare_stage2(model: VistaRanker, candidate_offsets: Tensor, num_candidates: int):
    """Stage 2's inputs alone (scoring stored summaries)."""
    backend = model.cfg.backend
    return prepare_targets(model.cfg.num_seeds, candidate_offsets, num_candidates, backend)


def prepare(model: VistaRanker, batch: RankingBatch) -> VistaInputs:
    """Stage 1's packing and mask (one host sync on CPU: the longest history) and stage 2's."""
    summary = prepare_summary(model.summariser.cfg, batch.history_offsets)
    target = prepare_stage2(model, batch.candidate_offsets, batch.num_candidates)
    return VistaInputs(summary, target)


def validate(options: dict[str, Any]) -> None:
    for key in (
        "d_model", "num_heads", "num_seeds", "summary_layers", "target_layers",
        "reconstruction_layers", "action_dim", "head_hidden",
    ):  # fmt: skip
        if options[key] < 1:
            raise ValueError(f"model.{key} must be >= 1")
    if options["d_model"] % options["num_heads"]:
        raise ValueError("model.d_model must be divisible by model.num_heads")
    if options["reconstruction_weight"] < 0:
        raise ValueError("model.reconstruction_weight must be >= 0 (0: off)")
    if options["summary_attention"] not in ("silu", "qla"):
        raise ValueError("model.summary_attention must be 'silu' or 'qla'")
    if options["qla_state"] not in ("silu", "identity"):
        raise ValueError("model.qla_state must be 'silu' or 'identity'")
