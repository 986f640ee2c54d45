"""HSTU ranking: actions as tokens, candidates as targets of the history (target-aware).

The layer stack is HSTU's own (:class:`flexgr.model.hstu.HSTULayer` with its prepared
inputs); this module only decides what the tokens are (:mod:`flexgr.ranking.tokens`) and reads
the candidates' outputs through a multi-task head. Architecture only: :func:`prepare` builds
the per-batch inputs (token rows, the HSTU mask and bias tables) outside the forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flexgr.model.embedding import ItemEmbedding, SequenceInput
from flexgr.model.hstu.inputs import HSTUInputs
from flexgr.model.hstu.inputs import prepare as prepare_hstu
from flexgr.model.hstu.model import HSTUConfig, HSTULayer
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.modules import ActionEncoder, MultiTaskHead
from flexgr.ranking.tokens import TokenLayout, TokenRows, place, token_batch, token_rows


@dataclass
class HSTURankingConfig(HSTUConfig):
    """HSTU's settings (``max_seq_len`` counts events, not tokens) plus the ranking ones."""

    layout: TokenLayout = "interleaved"
    # merged layout: the action part of a candidate's token, which has no action yet: a learned
    # vector (the reference's DLRM-v3) or zeros (the ULTRA-HSTU paper).
    candidate_action: Literal["learned", "zero"] = "learned"
    action_dim: int = 16  # embedding size of each action input before the action MLP
    action_encoding: Literal["categorical", "bits"] = "categorical"
    head_hidden: int = 64
    # Set from the dataset and [ranking]: the action inputs, their table sizes, the tasks.
    action_inputs: list[str] = field(default_factory=lambda: ["rating"])
    action_vocab: list[int] = field(default_factory=lambda: [11])
    tasks: list[str] = field(default_factory=lambda: ["like"])
    task_kinds: list[str] = field(default_factory=lambda: ["bce"])

    def hstu_config(self) -> HSTUConfig:
        """The layer stack's config: its length in tokens (2 per event when interleaved) plus
        the candidates' one shared position."""
        names = {f.name for f in dataclasses.fields(HSTUConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        per_event = 2 if self.layout == "interleaved" else 1
        values["max_seq_len"] = per_event * self.max_seq_len + 1
        return HSTUConfig(**values)


class HSTUStack(nn.Module):
    """Input positions and HSTU layers over ready token embeddings; ``cfg`` is what HSTU's
    ``prepare`` reads."""

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input = SequenceInput(cfg.attn_len, cfg.d_model, cfg.input_dropout)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x_TD: Tensor, inputs: HSTUInputs) -> Tensor:
        x_TD = self.input(x_TD, inputs.positions)
        for layer in self.layers:
            x_TD = layer(x_TD, inputs)
        return x_TD


@dataclass(frozen=True)
class HSTURankingInputs:
    rows: TokenRows
    hstu: HSTUInputs


class HSTURanker(nn.Module):
    """RankingBatch -> [C, K] per-candidate task logits (BCE tasks) or values (MSE tasks)."""

    def __init__(self, cfg: HSTURankingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.encoder = HSTUStack(cfg.hstu_config())
        self.item_emb = ItemEmbedding(cfg.num_items, d)
        self.actions = ActionEncoder(
            cfg.action_inputs, cfg.action_vocab, cfg.action_encoding, cfg.action_dim, d
        )
        self.placeholder: nn.Parameter | None = None
        if cfg.layout == "merged" and cfg.candidate_action == "learned":
            self.placeholder = nn.Parameter(torch.empty(d).normal_(0, 0.02))
        self.head = MultiTaskHead(d, cfg.head_hidden, len(cfg.tasks), cfg.dropout)

    @property
    def output_bias(self) -> Tensor:
        return self.head.output_bias

    def candidate_tokens(self, candidates: Tensor) -> Tensor:
        """[C, d] candidate tokens: the item embedding (merged: plus the placeholder action)."""
        tokens = self.item_emb(candidates)
        return tokens + self.placeholder if self.placeholder is not None else tokens

    def tokens(self, batch: RankingBatch, rows: TokenRows) -> Tensor:
        """[T, d] the batch's token embeddings in the layout's order."""
        items = self.item_emb(batch.history_items)
        actions = self.actions(batch.history_actions)
        candidates = self.candidate_tokens(batch.candidates)
        if rows.action_rows is not None:  # interleaved: an action token after each item
            return place(
                [rows.item_rows, rows.action_rows, rows.candidate_rows],
                [items, actions, candidates],
                rows.num_tokens,
            )
        # merged: item + action in one token; candidates got the placeholder action
        return place(
            [rows.item_rows, rows.candidate_rows], [items + actions, candidates], rows.num_tokens
        )

    def forward(self, batch: RankingBatch, inputs: HSTURankingInputs) -> Tensor:
        rows = inputs.rows
        states = self.encoder(self.tokens(batch, rows), inputs.hstu)
        return self.head(states[rows.candidate_rows])


def prepare(model: HSTURanker, batch: RankingBatch) -> HSTURankingInputs:
    """Token rows and the HSTU inputs (target-aware mask, positions, bias tables) of a batch:
    every candidate sees its sequence's history and itself, at the history's end position
    and the request time."""
    rows = token_rows(batch, model.cfg.layout)
    tokens = token_batch(rows, batch)
    return HSTURankingInputs(rows, prepare_hstu(model.encoder, tokens))


def validate(options: dict[str, Any]) -> None:
    from flexgr.model.hstu.spec import validate as validate_hstu

    validate_hstu(options)
    if options["contextual_len"]:
        raise ValueError(
            "model.contextual_len is not supported by hstu-ranking (no context tokens)"
        )
    if options["truncate_after"]:
        raise ValueError("attention truncation (model.truncate_after) is not supported by ranking")
    if options["action_dim"] < 1 or options["head_hidden"] < 1:
        raise ValueError("model.action_dim and model.head_hidden must be >= 1")
