"""HSTU (Zhai et al. 2024), the research model behind the public MovieLens and Amazon tables.

Architecture only: the per-batch inputs (mask, position ids, bias tables, the attention call
bound to them) come prepared from :mod:`flexgr.model.hstu.inputs`, so ``HSTU.forward`` is the
same function on one device, under context parallelism and when compiled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexgr.model.drop_path import SequenceDropPath
from flexgr.model.embedding import ItemEmbedding, SequenceInput, l2_normalize
from flexgr.model.hstu.inputs import HSTUInputs
from flexgr.model.hstu.mot import MixtureInputs, gather_latest


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
    # Stochastic depth: each layer's residual branch is dropped for a whole sequence with this
    # probability at training, kept branches scaled by 1 / (1 - p) (flexgr/model/drop_path.py).
    drop_path: float = 0.0
    # Score scale. None: 1.0 for "silu" (the reference HSTU), 1/sqrt(dqk) for "softmax".
    alpha: float | None = None
    # "silu": HSTU's pointwise silu(s) / N; "softmax": the paper's "HSTU w/ softmax" ablation
    # (Table 2), a row softmax over the same mask (flex on CUDA, dense otherwise;
    # docs/long-sequences.md).
    attention: Literal["silu", "softmax"] = "silu"
    norm_affine: bool = False
    norm_eps: float = 1e-6
    concat_ua: bool = False  # production variant: out = W [u, attn, u * LN(attn)]
    rel_bias: bool = True
    num_time_buckets: int = 128
    backend: Literal["auto", "reference", "flex", "triton"] = "auto"
    # The attention mask (docs/attention.md). "hstu": the built-in rule below, which the Triton
    # kernel evaluates inline; "semi_local": ULTRA-HSTU's SLA (evaluated inline by the Triton
    # kernel too, visiting only the blocks its bands reach); any other name: a
    # mask registered with flexgr.masks.register_mask (flex on CUDA, dense on CPU).
    mask: str = "hstu"
    contextual_len: int = 0  # the first c tokens of every sequence see each other in full
    max_attn_len: int = 0  # local window: a query sees the last w keys (0: causal, unbounded)
    full_attn_tail: int = 0  # with a window, the last f rows of a sequence keep full causal rows
    sla_local: int = 256  # semi_local: keys at most this far behind the query
    sla_global: int = 256  # semi_local: the global part's size (see sla_mode)
    # "global_keys": the first sla_global tokens are visible to every row; "tail_rows": the last
    # sla_global rows keep full causal attention (the reference code's reading).
    sla_mode: Literal["global_keys", "tail_rows"] = "global_keys"
    # Attention truncation (ULTRA-HSTU): the first truncate_after layers run on the whole
    # sequence, the rest on its contextual prefix, its truncate_len most recent history tokens
    # and its targets (0 = off). docs/attention.md#attention-truncation.
    truncate_after: int = 0
    truncate_len: int = 0
    # FP8 (e4m3, row-wise scales) for the UVQK and output projections, attention in the
    # compute dtype (flexgr.ops.fp8: torch._scaled_mm on H100/H200, emulated elsewhere).
    fp8: bool = False
    # Mixture of transducers (ULTRA-HSTU): mot_streams > 1 splits each user's events by their
    # item's stream (HSTU.item_stream) into separate stacks of num_layers layers, fused before
    # the heads by "sum" or "concat" (flexgr/model/hstu/mot.py, docs/long-sequences.md).
    mot_streams: int = 1
    mot_fusion: Literal["sum", "concat"] = "sum"

    @property
    def attn_len(self) -> int:
        return self.max_seq_len + self.len_margin

    @property
    def score_scale(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return self.dqk**-0.5 if self.attention == "softmax" else 1.0


class RelativePositionTimeBias(nn.Module):
    """One bias shared by all heads: w_pos[N - 1 + j - i] + w_time[bucket(ts_next[i] - ts[j])].

    Holds the two tables; the per-token tables it is gathered with belong to the batch and come
    with the prepared inputs."""

    def __init__(self, max_len: int, num_buckets: int) -> None:
        super().__init__()
        self.pos_w = nn.Parameter(torch.empty(2 * max_len - 1).normal_(0, 0.02))
        self.ts_w = nn.Parameter(torch.empty(num_buckets + 1).normal_(0, 0.02))

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.pos_w, self.ts_w


class HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, d = cfg.num_heads, cfg.d_model
        self.splits = [H * cfg.dv, H * cfg.dv, H * cfg.dqk, H * cfg.dqk]
        self.uvqk = nn.Parameter(torch.empty(d, sum(self.splits)).normal_(0, 0.02))
        self.input_norm = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        self.attn_norm = nn.LayerNorm(
            H * cfg.dv, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine
        )
        self.out = nn.Linear(H * cfg.dv * (3 if cfg.concat_ua else 1), d)
        nn.init.xavier_uniform_(self.out.weight)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = SequenceDropPath(cfg.drop_path)
        self.rab = (
            RelativePositionTimeBias(cfg.attn_len, cfg.num_time_buckets) if cfg.rel_bias else None
        )

    def project(self, x_TD: Tensor) -> Tensor:
        """silu(LN(x) @ W_uvqk): [T, 2 H dv + 2 H dqk], split in the order u, v, q, k."""
        normed = self.input_norm(x_TD)
        if self.cfg.fp8:
            from flexgr.ops.fp8 import fp8_linear

            return F.silu(fp8_linear(normed, self.uvqk))
        return F.silu(normed @ self.uvqk)

    def output(self, x_TD: Tensor, gated: Tensor, branch_scale_T1: Tensor | None = None) -> Tensor:
        """The residual plus the output projection of the (dropped-out) gated values, that
        branch times ``branch_scale_T1`` where given (:meth:`branch_scale`)."""
        dropped = self.dropout(gated)
        if self.cfg.fp8:
            from flexgr.ops.fp8 import fp8_linear

            branch = fp8_linear(dropped, self.out.weight.t(), self.out.bias)
        else:
            branch = self.out(dropped)
        if branch_scale_T1 is not None:
            branch = branch * branch_scale_T1
        return x_TD + branch

    def branch_scale(self, x_TD: Tensor, inputs: HSTUInputs) -> Tensor | None:
        """[T, 1] stochastic-depth factor of this layer's residual branch for the batch's
        sequences (``model.drop_path``), drawn from the torch RNG; None (and no draw) in eval
        mode or at drop_path = 0. Drawn outside :meth:`gate` so that a recomputed gate reuses
        it."""
        if not self.drop_path.active:
            return None
        return self.drop_path.scale(inputs.offsets, x_TD.shape[0])

    def attend(self, q: Tensor, k: Tensor, v: Tensor, inputs: HSTUInputs) -> Tensor:
        """The batch's attention over [T, H dqk] q, k and [T, H dv] v: [T, H dv]."""
        cfg = self.cfg
        T, H = q.shape[0], cfg.num_heads
        attn_THD = inputs.attention(
            q.reshape(T, H, cfg.dqk),
            k.reshape(T, H, cfg.dqk),
            v.reshape(T, H, cfg.dv),
            max_seq_len=cfg.attn_len,
            alpha=cfg.score_scale,
            bias=self.rab() if self.rab is not None else None,
        )
        return attn_THD.reshape(T, H * cfg.dv)

    def gate(
        self, x_TD: Tensor, u: Tensor, attn: Tensor, branch_scale_T1: Tensor | None = None
    ) -> Tensor:
        """The gated norm u * LN(attn) (concatenated with u and attn under concat_ua), then
        :meth:`output`. Split from :meth:`attend` so that train.recompute = "selective"
        (flexgr/train/recompute.py) can recompute this part alone."""
        gated = u * self.attn_norm(attn)
        if self.cfg.concat_ua:
            gated = torch.cat([u, attn, gated], dim=-1)
        return self.output(x_TD, gated, branch_scale_T1)

    def forward(self, x_TD: Tensor, inputs: HSTUInputs) -> Tensor:
        u, v, q, k = torch.split(self.project(x_TD), self.splits, dim=-1)
        attn = self.attend(q, k, v, inputs)
        return self.gate(x_TD, u, attn, self.branch_scale(x_TD, inputs))


class HSTU(nn.Module):
    """Jagged in, jagged out: item ids [T] and the batch's prepared inputs -> L2-normalised
    states [T, d]. Inputs come from :func:`flexgr.model.hstu.prepare` (or the model's spec)."""

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = ItemEmbedding(cfg.num_items, cfg.d_model)
        self.input = SequenceInput(cfg.attn_len, cfg.d_model, cfg.input_dropout)
        streams = max(cfg.mot_streams, 1)
        # Under a mixture of transducers, stream s owns layers [s L, (s + 1) L).
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers * streams))
        if streams > 1:
            self.register_buffer("item_stream", torch.arange(cfg.num_items + 1) % streams)
            if cfg.mot_fusion == "concat":
                self.fuse = nn.Linear(streams * cfg.d_model, cfg.d_model, bias=False)

    def set_item_streams(self, item_stream: Tensor) -> None:
        """The stream (0..mot_streams-1) of every item index 0..num_items (an event type or
        category column); saved with the weights."""
        S = self.cfg.mot_streams
        if item_stream.shape != self.item_stream.shape:
            raise ValueError(f"item_stream must be [{self.item_stream.numel()}] (items + 1)")
        if item_stream.numel() and (item_stream.min() < 0 or item_stream.max() >= S):
            raise ValueError(f"item streams must be in [0, {S})")
        self.item_stream.copy_(item_stream)

    def forward(self, item_ids: Tensor, inputs: HSTUInputs | MixtureInputs) -> Tensor:
        """[T, d], or [T', d] for the rows ``inputs.output_rows`` under attention truncation."""
        if isinstance(inputs, MixtureInputs):
            return self._mixture(item_ids, inputs)
        x = self.input(self.item_emb(item_ids), inputs.positions)
        current = inputs
        for index, layer in enumerate(self.layers):
            if inputs.truncation is not None and index == self.cfg.truncate_after:
                x = x[inputs.truncation.keep]
                current = inputs.truncation.inputs
            x = layer(x, current)
        return l2_normalize(x)

    def _mixture(self, item_ids: Tensor, inputs: MixtureInputs) -> Tensor:
        L = self.cfg.num_layers
        emb = self.item_emb(item_ids)
        parts = []
        for s, stream in enumerate(inputs.streams):
            x = self.input(emb[stream.rows], stream.inputs.positions)
            for layer in self.layers[s * L : (s + 1) * L]:
                x = layer(x, stream.inputs)
            parts.append(gather_latest(x, stream.latest))
        fused = self.fuse(torch.cat(parts, dim=-1)) if hasattr(self, "fuse") else sum(parts)
        return l2_normalize(fused)

    def item_embeddings(self, ids: Tensor | None = None) -> Tensor:
        """L2-normalised item embeddings (all items when ids is None)."""
        return self.item_emb.normalized(ids)
