"""HSTU masks as FlexAttention ``mask_mod``s over packed (jagged) sequences.

Every factory returns ``mask_mod(b, h, q_idx, kv_idx) -> bool`` over *global* token indices of one
packed batch (B = 1 in FlexAttention terms). Factories that need per-sequence information take the
batch ``offsets`` (or a prebuilt :class:`JaggedLayout`, which is cheaper when several masks share
one batch). Combine them with :func:`and_masks` / :func:`or_masks`.

Distances use HSTU position ids (see :func:`build_layout`), which equal in-sequence indices unless
contextual tokens or targets are present.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor
from torch.nn.attention.flex_attention import and_masks, or_masks

from flexgr.masks.layout import JaggedLayout, build_layout

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "MaskMod",
    "and_masks",
    "or_masks",
    "jagged",
    "causal",
    "targets",
    "contextual",
    "local_window",
    "semi_local",
    "hstu_mask",
]


def _layout(
    src: Tensor | JaggedLayout,
    *,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    padded_len: int | None = None,
) -> JaggedLayout:
    if isinstance(src, JaggedLayout):
        return src
    return build_layout(src, num_targets=num_targets, contextual_len=contextual_len, padded_len=padded_len)


def _named(fn: MaskMod, name: str) -> MaskMod:
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def jagged(offsets: Tensor | JaggedLayout, *, padded_len: int | None = None) -> MaskMod:
    """Query and key belong to the same sequence (padding tokens belong to none)."""
    seq = _layout(offsets, padded_len=padded_len).seq_id

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (seq[q] == seq[kv]) & (seq[q] >= 0)

    return _named(mask, "jagged")


def causal() -> MaskMod:
    """Key index <= query index. Inside one sequence this is the usual causal mask."""

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return q >= kv

    return _named(mask, "causal")


def targets(
    offsets: Tensor | JaggedLayout, num_targets: Tensor | None = None, *, padded_len: int | None = None
) -> MaskMod:
    """The last ``num_targets[b]`` tokens of sequence b are candidates: a candidate never sees
    another candidate (it still sees itself). Combine with ``causal`` so candidates see the history."""
    is_target = _layout(offsets, num_targets=num_targets, padded_len=padded_len).is_target

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return ~(is_target[q] & is_target[kv]) | (q == kv)

    return _named(mask, "targets")


def contextual(
    offsets: Tensor | JaggedLayout,
    n: int | None = None,
    *,
    num_targets: Tensor | None = None,
    padded_len: int | None = None,
) -> MaskMod:
    """The first ``n`` tokens of every sequence are contextual (user features). Contextual rows
    see every non-candidate token of their sequence, earlier or later. Use it in ``or_masks``."""
    lay = _layout(offsets, num_targets=num_targets, contextual_len=n or 0, padded_len=padded_len)
    if lay.contextual_len <= 0:
        raise ValueError(f"contextual: n must be > 0, got {lay.contextual_len}")
    seq, pos, max_id = lay.seq_id, lay.pos_id, lay.max_id

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        same = (seq[q] == seq[kv]) & (seq[q] >= 0)
        return same & (pos[q] == 0) & (pos[kv] < max_id[q])

    return _named(mask, f"contextual_{lay.contextual_len}")


def local_window(
    offsets: Tensor | JaggedLayout,
    w: int,
    full_tail: int = 0,
    *,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    padded_len: int | None = None,
) -> MaskMod:
    """Key at most ``w`` position ids behind the query. With ``full_tail > 0`` the rows whose id is
    within ``full_tail`` of the sequence's last history id (and the candidates) are exempt and keep
    full attention. Does not enforce causality by itself: combine with ``causal``."""
    if w <= 0:
        raise ValueError(f"local_window: w must be > 0, got {w}")
    if full_tail < 0:
        raise ValueError(f"local_window: full_tail must be >= 0, got {full_tail}")
    lay = _layout(offsets, num_targets=num_targets, contextual_len=contextual_len, padded_len=padded_len)
    pos, max_id = lay.pos_id, lay.max_id

    if full_tail > 0:

        def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return (pos[q] - pos[kv] <= w) | (pos[q] >= max_id[q] - full_tail)

    else:

        def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return pos[q] - pos[kv] <= w

    return _named(mask, f"local_window_{w}" + (f"_tail{full_tail}" if full_tail else ""))


def semi_local(
    offsets: Tensor | JaggedLayout,
    local: int,
    global_: int,
    *,
    mode: str = "global_keys",
    padded_len: int | None = None,
) -> MaskMod:
    """ULTRA-HSTU semi-local attention (SLA), causal and per sequence. A key is visible when it is
    at most ``local`` tokens behind the query, or:

    - ``mode="global_keys"``: it is one of the first ``global_`` tokens of the sequence (global key
      columns, sink-style: every row sees the sequence start);
    - ``mode="tail_rows"``: the query is one of the last ``global_`` tokens of the sequence (those
      rows get full causal attention; the reading that matches HSTU's ``full_attn_tail``).
    """
    if local < 0 or global_ < 0:
        raise ValueError(f"semi_local: local and global_ must be >= 0, got {local}, {global_}")
    if mode not in ("global_keys", "tail_rows"):
        raise ValueError(f"semi_local: mode must be 'global_keys' or 'tail_rows', got {mode!r}")
    lay = _layout(offsets, padded_len=padded_len)
    seq, idx, seq_len = lay.seq_id, lay.local, lay.seq_len

    if mode == "global_keys":

        def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            same = (seq[q] == seq[kv]) & (seq[q] >= 0) & (q >= kv)
            return same & ((idx[q] - idx[kv] <= local) | (idx[kv] < global_))

    else:

        def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            same = (seq[q] == seq[kv]) & (seq[q] >= 0) & (q >= kv)
            return same & ((idx[q] - idx[kv] <= local) | (idx[q] >= seq_len[q] - global_))

    return _named(mask, f"semi_local_{mode}_{local}_{global_}")


def hstu_mask(
    offsets: Tensor | JaggedLayout,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    *,
    padded_len: int | None = None,
) -> MaskMod:
    """The mask of the reference HSTU: jagged, causal, target-aware, with optional contextual
    prefix and local window. Row i sees column j iff they share a sequence and

        (i == j or p(i) > p(j)) and (max_attn_len == 0 or p(i) - p(j) <= max_attn_len
                                     or (full_attn_tail > 0 and p(i) >= max_id - full_attn_tail))
        or (contextual_len > 0 and p(i) == 0 and p(j) < max_id)
    """
    lay = _layout(
        offsets, num_targets=num_targets, contextual_len=contextual_len, padded_len=padded_len
    )
    # Causal in position ids, not token order: contextual tokens share id 0 and targets one id,
    # so two of them never see each other through this part (targets included: no separate
    # targets rule is needed), only through the contextual clause, as in the reference's rule.
    # Token order differs from it in one case: a sequence shorter than contextual_len +
    # num_targets (max_id <= 0), where the reference lets each token see only itself.
    pos = lay.pos_id

    def by_position(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (pos[q] > pos[kv]) | (q == kv)

    attend = [_named(by_position, "causal_ids")]
    if max_attn_len > 0:
        attend.append(local_window(lay, max_attn_len, full_attn_tail))
    rule = and_masks(*attend) if len(attend) > 1 else attend[0]
    if lay.contextual_len > 0:
        rule = or_masks(rule, contextual(lay))
    mod = and_masks(jagged(lay), rule)
    parts = ["hstu"]
    if lay.has_targets:
        parts.append("targets")
    if lay.contextual_len:
        parts.append(f"ctx{lay.contextual_len}")
    if max_attn_len:
        parts.append(f"win{max_attn_len}")
    if full_attn_tail:
        parts.append(f"tail{full_attn_tail}")
    return _named(mod, "_".join(parts))
