"""VISTA stage 1: S learned seeds read a user's history through HSTU layers; their outputs are
the user's summary ``[B, S, d]``.

Each user's tokens are packed as ``[seeds; history]`` (no padding) and run through
:class:`flexgr.model.hstu.HSTULayer`. The layers' attention (``SummariserConfig.attention``):

- ``"silu"``: HSTU's pointwise attention under :func:`flexgr.vista.mask.seed_summary_mask`
  (seeds see everything, history rows are causal and never see seeds), O(L^2);
- ``"qla"``: quasi-linear attention (:func:`flexgr.vista.qla.qla`), history rows causal through
  a ``d_k x d_v`` state, each seed reading the whole history's state plus its own diagonal term
  (the seeds are QLA's "candidates": they do not see each other), O(L).

The per-batch inputs (packing order, positions, the attention call with its mask bound) come
from :func:`prepare_summary`, outside the forward, as for HSTU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from flexgr.masks.block import HSTUMask, build_custom_mask, padded_length
from flexgr.masks.layout import seq_ids_and_local
from flexgr.model.embedding import SequenceInput
from flexgr.model.hstu.inputs import Attention, BiasWeights, HSTUInputs
from flexgr.model.hstu.model import HSTUConfig, HSTULayer
from flexgr.ops.attention import hstu_attention
from flexgr.ops.jagged import to_jagged, to_padded
from flexgr.vista.mask import dense_seed_mask, packed_offsets, seed_flags, seed_summary_mask
from flexgr.vista.qla import StateActivation, qla


@dataclass
class SummariserConfig:
    d_model: int = 64
    num_seeds: int = 128  # the paper's S (128 seeds x 256-d in production)
    num_layers: int = 3  # the paper's 3 summarisation layers
    num_heads: int = 1
    max_history_len: int = 200  # the position table; N = num_seeds + max_history_len
    dropout: float = 0.0
    # "silu": HSTU attention under the seed mask (O(L^2)); "qla": quasi-linear attention (O(L)),
    # the seeds reading the history's state (module docstring).
    attention: Literal["silu", "qla"] = "silu"
    qla_state: StateActivation = "silu"  # QLA's activation on the state (flexgr.vista.qla)
    # silu attention only. "auto": flex on CUDA, "padded" elsewhere (dense per user, B N^2);
    # "reference": the dense [P, P] oracle of the mask_mod (tests). The Triton kernel evaluates
    # only the built-in HSTU rule, not this mask.
    backend: Literal["auto", "reference", "padded", "flex"] = "auto"

    def layer_config(self) -> HSTUConfig:
        """The HSTU layer options: no relative bias (seeds have no position or time)."""
        d = self.d_model
        return HSTUConfig(
            num_items=1, d_model=d, num_layers=self.num_layers, num_heads=self.num_heads,
            dqk=d // self.num_heads, dv=d // self.num_heads,
            max_seq_len=self.num_seeds + self.max_history_len, len_margin=0,
            dropout=self.dropout, input_dropout=self.dropout, rel_bias=False,
        )  # fmt: skip

    def validate(self) -> None:
        for name in ("d_model", "num_seeds", "num_layers", "num_heads", "max_history_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"vista.{name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"vista.d_model ({self.d_model}) must be a multiple of vista.num_heads "
                f"({self.num_heads})"
            )
        if self.attention not in ("silu", "qla"):
            raise ValueError(f"vista.attention must be 'silu' or 'qla', got {self.attention!r}")
        if self.qla_state not in ("silu", "identity"):
            raise ValueError(
                f"vista.qla_state must be 'silu' or 'identity', got {self.qla_state!r}"
            )
        if self.backend not in ("auto", "reference", "padded", "flex"):
            raise ValueError(
                f"vista.backend must be auto, reference, padded or flex, got {self.backend!r}"
            )


@dataclass(frozen=True)
class SummaryAttention:
    """HSTU attention over the packed batch with the seed mask bound (an HSTU ``Attention``)."""

    offsets: Tensor  # [B + 1] of the packed segments
    mask: HSTUMask
    backend: str

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, max_seq_len: int, alpha: float,
        bias: BiasWeights | None,
    ) -> Tensor:  # fmt: skip
        return hstu_attention(
            q, k, v, self.offsets, max_seq_len=max_seq_len, alpha=alpha, backend=self.backend,
            mask=self.mask, validate=False,
        )  # fmt: skip


@dataclass(frozen=True)
class PaddedSummaryAttention:
    """HSTU attention one user at a time on a padded [B, N, N] seed mask (the CPU path)."""

    offsets: Tensor  # [B + 1] of the packed segments
    mask_BNN: Tensor  # bool, flexgr.vista.mask.dense_seed_mask
    max_len: int  # N: the longest packed segment

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, max_seq_len: int, alpha: float,
        bias: BiasWeights | None,
    ) -> Tensor:  # fmt: skip
        T = q.shape[0]
        q_BNHD, k_BNHD, v_BNHD = (to_padded(x, self.offsets, self.max_len) for x in (q, k, v))
        s_BHNN = torch.einsum("bnhd,bmhd->bhnm", q_BNHD, k_BNHD) * alpha
        keep = self.mask_BNN.unsqueeze(1).to(s_BHNN.dtype)
        p_BHNN = torch.nn.functional.silu(s_BHNN) * keep / max_seq_len
        return to_jagged(torch.einsum("bhnm,bmhd->bnhd", p_BHNN, v_BNHD), self.offsets, T)


@dataclass(frozen=True)
class QLASummaryAttention:
    """Quasi-linear attention over the packed batch: each segment reordered to
    ``[history; seeds]`` so that the seeds are QLA's candidates (the last ``S`` rows)."""

    offsets: Tensor  # [B + 1] of the packed segments (the reordering keeps their lengths)
    to_qla: Tensor  # [P]: packed row of each QLA-order row
    from_qla: Tensor  # [P]: QLA-order row of each packed row
    num_targets: Tensor  # [B], all S
    state_activation: StateActivation

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, max_seq_len: int, alpha: float,
        bias: BiasWeights | None,
    ) -> Tensor:  # fmt: skip
        # The layer's q and k are SiLU'd already (phi); alpha scales q, as it scales the scores.
        out = qla(
            q[self.to_qla] * alpha, k[self.to_qla], v[self.to_qla], self.offsets,
            divisor=float(max_seq_len), num_targets=self.num_targets,
            state_activation=self.state_activation, feature_map="identity",
        )  # fmt: skip
        return out[self.from_qla]


def _qla_attention(cfg: SummariserConfig, offsets: Tensor, packed: Tensor) -> Attention:
    S, B = cfg.num_seeds, offsets.numel() - 1
    P = int(offsets[-1]) + S * B
    seq, local = seq_ids_and_local(packed, P)
    seq, local = seq.long(), local.long()
    lengths = (offsets[1:] - offsets[:-1])[seq]
    # QLA row (segment b, index l): history row l while l < n_b, else seed l - n_b.
    to_qla = packed[seq] + torch.where(local < lengths, local + S, local - lengths)
    from_qla = torch.empty_like(to_qla)
    from_qla[to_qla] = torch.arange(P, device=offsets.device)
    num_targets = torch.full((B,), S, dtype=torch.int64, device=offsets.device)
    return QLASummaryAttention(packed, to_qla, from_qla, num_targets, cfg.qla_state)


def _silu_attention(cfg: SummariserConfig, offsets: Tensor, packed: Tensor) -> Attention:
    S, B = cfg.num_seeds, offsets.numel() - 1
    backend = cfg.backend
    if backend == "auto":
        backend = "flex" if offsets.device.type == "cuda" else "padded"
    if backend == "padded":
        lengths = offsets[1:] - offsets[:-1]
        N = S + (int(lengths.max()) if B else 0)  # one host sync, outside the forward
        return PaddedSummaryAttention(packed, dense_seed_mask(lengths, S, N), N)
    total = int(offsets[-1]) + S * B
    # The tables' length from the batch size alone, not from its total: flex and the block mask
    # compile once per padded length on CUDA (a fwd + bwd compile took ~100 s on an H200), and
    # ML-1M's totals spread over several buckets, so its run trained no logged step in 530 s.
    # The padding rows see nothing, so their blocks are skipped, not computed.
    P = padded_length(B * (S + cfg.max_history_len), offsets.device)
    mask = build_custom_mask(
        seed_summary_mask(offsets, S, P), packed, total_len=total, padded_len=P, jagged=True
    )
    return SummaryAttention(packed, mask, backend)


@dataclass(frozen=True)
class SummaryInputs:
    """One batch's packing: ``packed = cat([history, seeds repeated B times])[order]``."""

    order: Tensor  # [P] int64
    seed_rows: Tensor  # [B * S] packed rows of the seeds, user-major
    history_rows: Tensor  # [T] packed rows of the history tokens, in order
    positions: Tensor  # [T] in-history index of every history token
    layers: HSTUInputs  # what the HSTU layers read (the attention call)
    num_users: int
    history_offsets: Tensor  # [B + 1] of the histories
    packed_offsets: Tensor  # [B + 1] of the packed [seeds; history] segments


def prepare_summary(cfg: SummariserConfig, offsets: Tensor) -> SummaryInputs:
    """The packing and the mask of a batch of histories with ``offsets`` [B + 1]."""
    cfg.validate()
    offsets = offsets.to(torch.int64)
    S, B, T = cfg.num_seeds, offsets.numel() - 1, int(offsets[-1])
    lengths = offsets[1:] - offsets[:-1]
    if B and int(lengths.max()) > cfg.max_history_len:
        raise ValueError(
            f"a history of {int(lengths.max())} events exceeds vista.max_history_len "
            f"({cfg.max_history_len})"
        )
    seq, is_seed = seed_flags(offsets, S)
    rows = torch.arange(T + B * S, device=offsets.device)
    seed_rows, history_rows = rows[is_seed], rows[~is_seed]
    order = torch.empty_like(rows)
    order[history_rows] = torch.arange(T, device=offsets.device)
    order[seed_rows] = T + torch.arange(B * S, device=offsets.device)
    packed = packed_offsets(offsets, S)
    positions = history_rows - packed[seq[history_rows]] - S
    if cfg.attention == "qla":
        attention = _qla_attention(cfg, offsets, packed)
    else:
        attention = _silu_attention(cfg, offsets, packed)
    return SummaryInputs(
        order, seed_rows, history_rows, positions, HSTUInputs(positions, attention), B,
        offsets, packed,
    )  # fmt: skip


class SeedSummariser(nn.Module):
    """History embeddings [T, d] (jagged) -> the user summaries [B, S, d]."""

    def __init__(self, cfg: SummariserConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        layer_cfg = cfg.layer_config()
        self.seeds = nn.Parameter(torch.empty(cfg.num_seeds, cfg.d_model).normal_(0, 0.02))
        self.input = SequenceInput(cfg.max_history_len, cfg.d_model, cfg.dropout)
        self.layers = nn.ModuleList(HSTULayer(layer_cfg) for _ in range(cfg.num_layers))

    def encode(self, history_TD: Tensor, inputs: SummaryInputs) -> Tensor:
        """The packed states [P, d] after the last layer (seed and history rows)."""
        history = self.input(history_TD, inputs.positions)
        seeds = self.seeds.unsqueeze(0).expand(inputs.num_users, -1, -1)
        x = torch.cat([history, seeds.reshape(-1, self.cfg.d_model).to(history.dtype)])
        x = x[inputs.order]
        for layer in self.layers:
            x = layer(x, inputs.layers)
        return x

    def forward(self, history_TD: Tensor, inputs: SummaryInputs) -> Tensor:
        states = self.encode(history_TD, inputs)
        return states[inputs.seed_rows].view(inputs.num_users, self.cfg.num_seeds, -1)
