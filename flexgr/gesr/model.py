"""GESR ranking (``model.arch = "gesr-ranking"``): a two-tower ranker whose dot product is the
primary logit, plus a mixture of attention (MoA) over the user's history for each candidate,
fused through multi-logit parameterised gating (MLPG):

    primary_t = <user_t, item_t> / sqrt(d) + b_t                  (the two-tower ranker's logit)
    z         = dropout(LN([match; cross; self; user; item]))     (the configured experts)
    final_t   = primary_t + sum_k lambda_k logit_k,t(z)           (flexgr.gesr.mlpg)

Experts (``experts``, any subset, in this order in z; none leaves MLPG over the towers' outputs
alone, a control):

- ``match``: hard matching counts of the candidate's item in its request's history
  (flexgr.gesr.matching), bucketed and embedded;
- ``cross``: the candidate's item embedding as the query over the history tokens' keys and
  values (flexgr.gesr.cross);
- ``self``: HSTU layers over ``[history; candidates]`` with the target-aware (M-FALCON) mask,
  every candidate seeing its history and itself, read at the candidates' rows.

No expert lets a candidate see another candidate, so a candidate's score does not depend on
which others are scored with it. The towers are a :class:`TwoTowerRanker` (``towers``) whose
item table and history tokens the experts share; with every lambda at 0 the model is exactly
that two-tower ranker. docs/gesr.md has the choices and the measurements.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flexgr.gesr.cross import CrossActivation, CrossAttention, CrossAttentionConfig
from flexgr.gesr.cross_layout import CrossPadding, CrossPairs, cross_padding, cross_pairs
from flexgr.gesr.matching import HardMatchConfig, HardMatchEmbedding, hard_match_features
from flexgr.gesr.mlpg import MLPG, MLPGConfig
from flexgr.model.hstu.inputs import HSTUInputs
from flexgr.model.hstu.inputs import prepare as prepare_hstu
from flexgr.model.hstu.model import HSTUConfig
from flexgr.ranking.baselines import TwoTowerConfig, TwoTowerRanker, validate_common
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.hstu import HSTUStack
from flexgr.ranking.tokens import BatchSegments, TokenRows, place, token_batch, token_rows

Expert = Literal["match", "cross", "self"]
EXPERTS: tuple[str, ...] = ("match", "cross", "self")
# Feature columns the hard matching joins on. Only the item id today: the prepared datasets
# carry no item categories (MovieLens' genres are not read), see docs/gesr.md.
MATCH_COLUMNS = 1


@dataclass
class GESRRankingConfig(TwoTowerConfig):
    """The two-tower settings, the experts' and MLPG's."""

    # The MoA experts; [] leaves MLPG over the towers' outputs alone (a control).
    experts: list[Expert] = field(default_factory=lambda: ["match", "cross", "self"])
    # match: log2 buckets of the count (0 | 1 | 2-3 | 4-7 ...), each an embedding of match_dim;
    # match_buckets = 0 embeds log1p(count) instead. match_half_life (seconds) weighs an event
    # by 0.5 ** (age / half_life); none counts every event as 1.
    match_buckets: int = 8
    match_dim: int = 8
    match_half_life: float | None = None
    # cross: heads of cross_head_dim; softmax (DIN-style) or HSTU's silu / max_seq_len.
    # cross_impl: "padded" (batched matmuls over tiles of a request's candidates, histories
    # padded to max_seq_len) or "pairs" (every candidate with max_seq_len history slots).
    cross_heads: int = 2
    cross_head_dim: int = 16
    cross_activation: CrossActivation = "softmax"
    cross_impl: Literal["padded", "pairs"] = "padded"
    # self: HSTU layers over [history; candidates] (head dim = dqk = dv).
    self_layers: int = 1
    self_heads: int = 1
    self_head_dim: int = 32
    self_rel_bias: bool = True
    # MLPG: K gated secondary logits of width mlpg_hidden, lambdas from mlpg_lambda_init
    # (learned, or fixed with mlpg_learn_lambda = false).
    mlpg_logits: int = 4
    mlpg_hidden: int = 64
    mlpg_lambda_init: float = 1.0
    mlpg_learn_lambda: bool = True
    # Scoring (no gradient) runs the forward under torch.compile with dynamic shapes: one graph
    # for every batch shape (tests/gesr/test_compile.py), fewer launches. The first call compiles
    # (~40 s on a 2-core CPU); training stays eager. Off until it is measured on a GPU.
    compile_scorer: bool = False

    def two_tower_config(self) -> TwoTowerConfig:
        names = {f.name for f in fields(TwoTowerConfig)}
        return TwoTowerConfig(**{k: getattr(self, k) for k in names})

    def hstu_config(self) -> HSTUConfig:
        """The self expert's layer stack: history events plus the candidates' one position."""
        return HSTUConfig(
            num_items=self.num_items,
            d_model=self.d_model,
            num_layers=self.self_layers,
            num_heads=self.self_heads,
            dqk=self.self_head_dim,
            dv=self.self_head_dim,
            max_seq_len=self.max_seq_len + 1,
            dropout=self.dropout,
            input_dropout=self.dropout,
            rel_bias=self.self_rel_bias,
        )

    def match_config(self) -> HardMatchConfig:
        return HardMatchConfig(
            half_life=self.match_half_life, ignore_value=0, num_buckets=self.match_buckets
        )


@dataclass(frozen=True)
class GESRInputs:
    """Per-batch inputs, built outside the forward; an expert that is off has None."""

    history_seq: Tensor  # [H] sequence of each history event
    candidate_seq: Tensor  # [C] sequence of each candidate
    match: Tensor | None  # [C, MATCH_COLUMNS] bucket ids (int64) or log1p counts (float64)
    cross: CrossPairs | CrossPadding | None  # the cross attention's layout (cross_impl)
    rows: TokenRows | None  # the self expert's merged token layout
    hstu: HSTUInputs | None  # its target-aware mask and bias tables


class GESRRanker(nn.Module):
    """RankingBatch -> [C, K] logits (BCE tasks) or values (MSE tasks)."""

    def __init__(self, cfg: GESRRankingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, K = cfg.d_model, len(cfg.tasks)
        self.towers = TwoTowerRanker(cfg.two_tower_config())
        width = 2 * K * d  # the towers' outputs
        self.match: HardMatchEmbedding | None = None
        self.cross: CrossAttention | None = None
        self.encoder: HSTUStack | None = None  # "encoder": the trainer logs its backend
        self.placeholder: nn.Parameter | None = None
        if "match" in cfg.experts:
            self.match = HardMatchEmbedding(MATCH_COLUMNS, cfg.match_dim, cfg.match_buckets)
            width += MATCH_COLUMNS * cfg.match_dim
        if "cross" in cfg.experts:
            self.cross = CrossAttention(
                CrossAttentionConfig(
                    d_model=d,
                    num_heads=cfg.cross_heads,
                    head_dim=cfg.cross_head_dim,
                    activation=cfg.cross_activation,
                    divisor=float(cfg.max_seq_len),
                )
            )
            width += d
        if "self" in cfg.experts:
            self.encoder = HSTUStack(cfg.hstu_config())
            # A candidate has no action yet: its token is its item plus this learned action.
            self.placeholder = nn.Parameter(torch.empty(d).normal_(0, 0.02))
            width += d
        self.fuse = nn.Sequential(nn.LayerNorm(width), nn.Dropout(cfg.dropout))
        self.mlpg = MLPG(
            MLPGConfig(
                d_in=width,
                num_logits=cfg.mlpg_logits,
                hidden=cfg.mlpg_hidden,
                num_tasks=K,
                lambda_init=cfg.mlpg_lambda_init,
                learn_lambda=cfg.mlpg_learn_lambda,
            )
        )

    @property
    def output_bias(self) -> Tensor:
        return self.towers.output_bias

    def experts(
        self, inputs: GESRInputs, history_Hd: Tensor, candidates_Cd: Tensor
    ) -> list[Tensor]:
        """Each configured expert's [C, *] output, in EXPERTS order, over the history tokens
        and the candidates' item embeddings."""
        out: list[Tensor] = []
        if self.match is not None:
            assert inputs.match is not None
            out.append(self.match(inputs.match))
        if self.cross is not None:
            assert inputs.cross is not None
            out.append(self.cross(candidates_Cd, history_Hd, inputs.cross))
        if self.encoder is not None:
            assert inputs.rows is not None and inputs.hstu is not None
            assert self.placeholder is not None
            rows = inputs.rows
            x = place(
                [rows.item_rows, rows.candidate_rows],
                [history_Hd, candidates_Cd + self.placeholder],
                rows.num_tokens,
            )
            out.append(self.encoder(x, inputs.hstu)[rows.candidate_rows])
        return out

    def fused_logits(self, parts: list[Tensor], user_CKd: Tensor, item_CKd: Tensor) -> Tensor:
        """[C, K]: the two-tower logit plus MLPG over z = [experts; user; item]. The forward
        and the cached serving path (flexgr.gesr.falcon) both end here."""
        C = item_CKd.shape[0]
        z = torch.cat([*parts, user_CKd.reshape(C, -1), item_CKd.reshape(C, -1)], dim=-1)
        return self.mlpg(self.fuse(z), self.towers.logits(user_CKd, item_CKd))

    def forward(self, batch: RankingBatch, inputs: GESRInputs) -> Tensor:
        scoring = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if self.cfg.compile_scorer and scoring:
            return compiled_scorer()(self, batch, inputs)
        return self.eager_forward(batch, inputs)

    def eager_forward(self, batch: RankingBatch, inputs: GESRInputs) -> Tensor:
        # The candidates' item embeddings, looked up once for the item tower and the experts.
        candidates_Cd = self.towers.item_emb(batch.candidates)
        user_CKd, item_CKd, history_Hd = self.towers.towers(
            batch, inputs.history_seq, inputs.candidate_seq, candidates_Cd
        )
        parts = self.experts(inputs, history_Hd, candidates_Cd)
        return self.fused_logits(parts, user_CKd, item_CKd)


def scoring_forward(model: GESRRanker, batch: RankingBatch, inputs: GESRInputs) -> Tensor:
    """The eager forward as a function of the model, so that one compiled function serves every
    model (dynamo guards on the module's structure, not its identity)."""
    return model.eager_forward(batch, inputs)


@functools.cache
def compiled_scorer(
    backend: str | Callable = "inductor",
) -> Callable[[GESRRanker, RankingBatch, GESRInputs], Tensor]:
    """:func:`scoring_forward` under ``torch.compile(dynamic=True)``, built once per process."""
    return torch.compile(scoring_forward, dynamic=True, backend=backend)


def prepare(model: GESRRanker, batch: RankingBatch) -> GESRInputs:
    """The experts' per-batch inputs: the match features, the cross attention's layout and the
    self expert's token rows and HSTU inputs, from one set of segment ids. Nothing here reads a
    tensor's value on the host: the bounds are the config's (the item vocabulary for the match
    join's keys, ``max_seq_len`` for the cross layouts) and the sizes the shapes'."""
    cfg = model.cfg
    segs = BatchSegments.of(batch)
    match = cross = rows = hstu = None
    if model.match is not None:
        match = hard_match_features(
            cfg.match_config(),
            batch.history_items.unsqueeze(1),
            batch.history_offsets,
            batch.candidates.unsqueeze(1),
            batch.candidate_offsets,
            batch.history_timestamps,
            batch.query_time,
            value_range=(0, cfg.num_items),  # item ids, 0 the padding id
            segs=segs,
        )
    if model.cross is not None:
        layout = cross_pairs if cfg.cross_impl == "pairs" else cross_padding
        cross = layout(batch.history_offsets, segs, max_history=cfg.max_seq_len)
    if model.encoder is not None:
        rows, hstu = self_expert_inputs(model.encoder, batch, segs)
    return GESRInputs(segs.history_seq, segs.candidate_seq, match, cross, rows, hstu)  # type: ignore[arg-type]


def self_expert_inputs(
    encoder: HSTUStack, batch: RankingBatch, segs: BatchSegments | None = None
) -> tuple[TokenRows, HSTUInputs]:
    """The self expert's merged token rows and HSTU inputs (target-aware mask, positions, bias
    tables): every candidate a target of its request's history."""
    rows = token_rows(batch, "merged", segs)
    tokens = token_batch(rows, batch)
    return rows, prepare_hstu(encoder, tokens)  # type: ignore[arg-type,return-value]


def validate(options: dict[str, Any]) -> None:
    validate_common(options)
    experts = options["experts"]
    if len(set(experts)) != len(experts):
        raise ValueError(f"model.experts must name each of {', '.join(EXPERTS)} at most once")
    for key in (
        "match_dim",
        "cross_heads",
        "cross_head_dim",
        "self_layers",
        "self_heads",
        "self_head_dim",
        "mlpg_logits",
        "mlpg_hidden",
    ):
        if options[key] < 1:
            raise ValueError(f"model.{key} must be >= 1")
    if options["match_buckets"] < 0:
        raise ValueError("model.match_buckets must be >= 0 (0: log1p counts)")
    if not isinstance(options["compile_scorer"], bool):
        raise ValueError("model.compile_scorer must be true or false")
    half_life = options["match_half_life"]
    if half_life is not None and not half_life > 0:
        raise ValueError("model.match_half_life must be > 0 seconds, or none")
