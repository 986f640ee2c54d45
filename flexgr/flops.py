"""Analytic FLOPs of an HSTU stack: projections, attention under each mask, truncation, layouts.

What is counted (docs/long-sequences.md#flop-accounting): matrix-multiply FLOPs, 2 per
multiply-add, of one HSTU layer (Eq. 1-3 of the HSTU paper):

- ``uvqk``: the fused projection, ``2 T d (2 H dv + 2 H dqk)``;
- ``attention``: ``q k^T`` and ``A v`` over the allowed (query, key) pairs only,
  ``2 P H dqk + 2 P H dv`` (a kernel that skips masked blocks does this work, rounded up to
  its tiles; a dense kernel does ``T^2``);
- ``output``: ``2 T (H dv or 3 H dv with concat_ua) d``.

Elementwise work (SiLU, LayerNorm, the gating, the bias gathers) is left out: it is O(T d) and
well under 1% at the shapes of interest. Training counts the backward as twice the forward
(the usual 3x for GEMMs); recomputation adds what the backward runs again
(``train.recompute``): ``"layers"`` one whole forward, ``"selective"`` the projections only
(UVQK and the output projection, flexgr/train/recompute.py), never the attention.

P, the allowed pairs, is counted exactly per sequence from the mask rule in O(n log n) per
sequence (:func:`row_keys`), for the built-in rule (causal, contextual prefix, local window,
trailing full rows, targets) and both SLA readings; tests check it against the actual mask_mods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Layout = Literal["merged", "interleaved"]
Recompute = Literal["none", "layers", "selective"]


@dataclass(frozen=True)
class MaskShape:
    """The mask rule of a layer (the [model] keys of the same names)."""

    mask: str = "hstu"  # "hstu" (the built-in rule) or "semi_local"
    contextual_len: int = 0
    max_attn_len: int = 0
    full_attn_tail: int = 0
    sla_local: int = 0
    sla_global: int = 0
    sla_mode: str = "global_keys"

    @staticmethod
    def of(cfg: object) -> MaskShape:
        names = [f for f in MaskShape.__dataclass_fields__ if hasattr(cfg, f)]
        return MaskShape(**{f: getattr(cfg, f) for f in names})


def row_keys(n: int, mask: MaskShape, num_targets: int = 0) -> np.ndarray:
    """int64 [n]: how many keys each query row of one sequence of ``n`` tokens may attend."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    i = np.arange(n, dtype=np.int64)
    if mask.mask == "semi_local":
        k1, k2 = mask.sla_local, mask.sla_global
        local = i - np.maximum(0, i - k1) + 1
        if mask.sla_mode == "tail_rows":
            return np.where(i >= n - k2, i + 1, local)
        glob = np.minimum(k2, i + 1)
        overlap = np.maximum(0, np.minimum(i, glob - 1) - np.maximum(0, i - k1) + 1)
        return local + glob - overlap
    if mask.mask != "hstu":
        raise ValueError(f"no closed-form count for mask {mask.mask!r} (use count_pairs_dense)")
    c, w, f = mask.contextual_len, mask.max_attn_len, mask.full_attn_tail
    # HSTU position ids as the reference defines them: contextual rows share id 0, all
    # targets share the first target's id; a row sees smaller ids (and itself).
    ids = np.maximum(i - c + 1, 0) if c > 0 else i.copy()
    max_id = n - (c - 1 if c > 0 else 0) - num_targets
    if num_targets:
        ids = np.minimum(ids, max_id)
    below = np.searchsorted(ids, ids, side="left")  # keys with a smaller id
    lo = np.zeros(n, dtype=np.int64)
    if w > 0:
        lo = np.searchsorted(ids, ids - w, side="left")
        if f > 0:
            lo = np.where(ids >= max_id - f, 0, lo)
    counts = below - lo + 1
    if c > 0:
        ctx = np.searchsorted(ids, max_id, side="left") if max_id > 0 else 1
        counts = np.where(ids == 0, max(int(ctx), 1), counts)
    return counts


def attention_pairs(
    lengths: Sequence[int] | np.ndarray, mask: MaskShape, num_targets: Sequence[int] | None = None
) -> int:
    """Allowed (query, key) pairs of a batch: the sum of :func:`row_keys` over its sequences."""
    targets = num_targets if num_targets is not None else [0] * len(lengths)
    return int(sum(int(row_keys(int(n), mask, int(t)).sum()) for n, t in zip(lengths, targets)))


@dataclass(frozen=True)
class LayerFlops:
    tokens: int
    pairs: int
    uvqk: float
    attention: float
    output: float

    @property
    def total(self) -> float:
        return self.uvqk + self.attention + self.output


def layer_flops(cfg: object, tokens: int, pairs: int) -> LayerFlops:
    """Forward FLOPs of one layer of ``cfg`` (d_model, num_heads, dqk, dv, concat_ua)."""
    d, H = cfg.d_model, cfg.num_heads  # type: ignore[attr-defined]
    dqk, dv = cfg.dqk, cfg.dv  # type: ignore[attr-defined]
    out_in = H * dv * (3 if getattr(cfg, "concat_ua", False) else 1)
    return LayerFlops(
        tokens=tokens,
        pairs=pairs,
        uvqk=2.0 * tokens * d * (2 * H * dv + 2 * H * dqk),
        attention=2.0 * pairs * H * (dqk + dv),
        output=2.0 * tokens * out_in * d,
    )


@dataclass(frozen=True)
class ModelFlops:
    layers: list[LayerFlops]  # forward, per layer
    passes: float  # 1 forward; 3 training (forward + a backward of twice its FLOPs)
    recompute: Recompute = "none"  # what the backward runs again (training only)

    @property
    def forward(self) -> float:
        return sum(layer.total for layer in self.layers)

    @property
    def recomputed(self) -> float:
        """FLOPs the backward recomputes: a whole forward, or the projections alone."""
        if self.recompute == "layers":
            return self.forward
        if self.recompute == "selective":
            return sum(layer.uvqk + layer.output for layer in self.layers)
        return 0.0

    @property
    def total(self) -> float:
        return self.passes * self.forward + self.recomputed

    def share(self, part: str) -> float:
        return sum(getattr(layer, part) for layer in self.layers) / max(self.forward, 1.0)


def model_flops(
    cfg: object,
    lengths: Sequence[int] | np.ndarray,
    num_targets: Sequence[int] | None = None,
    *,
    training: bool = False,
    recompute: Recompute = "none",
) -> ModelFlops:
    """FLOPs of ``cfg``'s layer stack (an HSTUConfig or anything with its fields) on a batch of
    sequences of ``lengths`` tokens (``num_targets`` of them targets). Attention truncation
    (``truncate_after``/``truncate_len``) runs the later layers on the kept rows."""
    lengths = [int(n) for n in lengths]
    targets = [int(t) for t in (num_targets or [0] * len(lengths))]
    mask = MaskShape.of(cfg)
    full = layer_flops(cfg, sum(lengths), attention_pairs(lengths, mask, targets))
    after = getattr(cfg, "truncate_after", 0) if getattr(cfg, "truncate_len", 0) else 0
    layers = [full] * (after or cfg.num_layers)  # type: ignore[attr-defined]
    if after:
        c, keep = mask.contextual_len, cfg.truncate_len  # type: ignore[attr-defined]
        kept = [min(n, c + keep + t) for n, t in zip(lengths, targets)]
        short = layer_flops(cfg, sum(kept), attention_pairs(kept, mask, targets))
        layers += [short] * (cfg.num_layers - after)  # type: ignore[attr-defined]
    if recompute not in ("none", "layers", "selective"):
        raise ValueError(f"recompute must be 'none', 'layers' or 'selective', got {recompute!r}")
    return ModelFlops(layers, 3.0 if training else 1.0, recompute if training else "none")


def layout_tokens(events: int, layout: Layout, candidates: int = 0) -> tuple[int, int]:
    """(tokens, targets) of one user: ``merged`` is one token per event (item + action
    embedding), ``interleaved`` two (item, then action); candidates are one token each."""
    if layout not in ("merged", "interleaved"):
        raise ValueError(f"layout must be 'merged' or 'interleaved', got {layout!r}")
    per_event = 1 if layout == "merged" else 2
    return per_event * events + candidates, candidates


def sl_expected_flops(
    cfg: object, lengths: Sequence[int], *, alpha: float, max_len: int, training: bool = True
) -> float:
    """Expected FLOPs per batch under Stochastic Length (flexgr.train.stochastic_length): each
    sequence longer than the threshold is whole with probability N^alpha / n^2, else cut."""
    from flexgr.train.stochastic_length import keep_full_probability, sl_threshold

    threshold = sl_threshold(max_len, alpha)
    total = 0.0
    for n in lengths:
        p = float(keep_full_probability(np.array([n]), max_len, alpha)[0])
        whole = model_flops(cfg, [n], training=training).total
        cut = model_flops(cfg, [min(n, threshold)], training=training).total
        total += p * whole + (1 - p) * cut
    return total


def balance_beta(cfg: object) -> float:
    """beta of the load-balancing cost ``n^2 + beta n`` (flexgr.train.load_balance): the FLOPs
    of a token's projections over those of a causal pair's attention, doubled (a causal
    sequence of n tokens has about n^2 / 2 pairs)."""
    one = layer_flops(cfg, 1, 1)
    return 2.0 * (one.uvqk + one.output) / one.attention
