"""Where GESR's cross attention finds each candidate's history: per-batch layouts, built once
outside the forward (flexgr.gesr.cross runs the attention over them).

Both layouts come from the offsets' shapes and the caller's ``max_history`` bound alone (the
model's ``max_seq_len``), never from a value read on the host, so building them never waits for
the device: no pair count, no longest length. A history longer than the bound fails a
device-side assert (on CPU it raises at once).

- :class:`CrossPairs`: every (candidate, history slot) pair, ``max_history`` slots per
  candidate, the slots past a history sent to a discarded output row;
- :class:`CrossPadding`: tiles of ``tile_size`` candidates of one request each, every tile's
  history padded to ``max_history`` slots. The tile count is a bound from the shapes: a request
  of M_b candidates fills ceil(M_b / T) tiles, so M + B (T - 1) slots always suffice (the
  tiles past the last used one are padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flexgr.ranking.tokens import BatchSegments


def check_history_bound(history_len: Tensor, max_history: int) -> None:
    """Fail where a history is longer than the layouts' bound, without waiting for the device
    (a device-side assert; on CPU it raises at once)."""
    if history_len.numel():
        torch._assert_async(
            (history_len <= max_history).all(),
            f"cross attention: a history is longer than max_history ({max_history})",
        )


def spread_padding(num_rows: int, max_history: int, history_offsets: Tensor) -> Tensor:
    """[num_rows, max_history] the history row each slot of a layout reads if it is padding:
    its flat slot index modulo the batch's history rows (row 0 of the one zero row that
    :func:`flexgr.gesr.cross.readable` adds when there are none).

    Any row would do (padding slots are masked, so their gradient is zero), but not one row for
    all: the backward of the gather sums each row's duplicates serially on CUDA (indexing's
    sort-based backward), and with every padding slot on row 0 that one row took 89 ms of a
    97 ms training step on an H200 (synthetic-ranking-gesr, histories padded to 1,024 slots).
    Spread by the flat index, not the slot alone (which would crowd rows 0..max_history - 1),
    each row gets about (slots in all) / (history rows) duplicates. A non-finite key or value
    in any history row can then reach other requests' padded outputs (0 * NaN); the trainer
    stops on a non-finite loss either way."""
    flat = torch.arange(num_rows * max_history, device=history_offsets.device)
    return (flat % history_offsets[-1].clamp_min(1)).view(num_rows, max_history)


@dataclass(frozen=True)
class CrossPairs:
    """Every (candidate, history slot) pair, ``max_history`` slots per candidate: a per-batch
    input, built once outside the forward."""

    candidate: Tensor  # [P] candidate row of each pair (its query)
    history: Tensor  # [P] history row of each pair (spread_padding past its history)
    target: Tensor  # [P] output row: the candidate's, or M (discarded) for a slot past it


def cross_pairs(history_offsets: Tensor, segs: BatchSegments, *, max_history: int) -> CrossPairs:
    """The pairs of each candidate with the ``max_history`` slots of its request's history
    (every history at most ``max_history`` long); ``segs`` are the batch's segment ids."""
    num_candidates = segs.candidate_seq.shape[0]
    check_history_bound(segs.history_len, max_history)
    seq, device = segs.candidate_seq, history_offsets.device
    slot_MS = torch.arange(max_history, device=device).expand(num_candidates, -1)
    padding_MS = slot_MS >= segs.history_len[seq].unsqueeze(1)
    row = torch.arange(num_candidates, device=device).unsqueeze(1)
    history_MS = torch.where(
        padding_MS,
        spread_padding(num_candidates, max_history, history_offsets),
        history_offsets[seq].unsqueeze(1) + slot_MS,
    )
    target_MS = row.masked_fill(padding_MS, num_candidates)
    return CrossPairs(
        row.expand(-1, max_history).reshape(-1), history_MS.reshape(-1), target_MS.reshape(-1)
    )


@dataclass(frozen=True)
class CrossPadding:
    """Where every candidate and history row goes in the padded layout: a per-batch input,
    built once outside the forward. A tile holds up to ``tile_size`` candidates of one request
    and that request's history, padded to ``max_history`` slots; tiles past the last used one
    are all padding."""

    history_rows: Tensor  # [N, max_history] history row of each slot (spread_padding if none)
    history_padding: Tensor  # [N, max_history] bool: the slot holds no history row
    candidate_tile: Tensor  # [M] tile of each candidate
    candidate_slot: Tensor  # [M] its slot in the tile
    tile_size: int


def tile_size_for(num_candidates: int, num_sequences: int) -> int:
    """Candidates per tile T: a power of two (few distinct shapes), at most the mean m per
    request and at most sqrt(32 m). A request of M_b candidates fills ceil(M_b / T) tiles, so
    M + B (T - 1) slots always suffice, at most (1 + T / m) M; a larger T pads more, a smaller
    one reads each history's keys and values for more tiles. sqrt(32 m) balances the two for
    head dims near 16: on CPU (16 requests of 50 events) it picks the fastest or a tie at 8, 64
    and 512 candidates per request (docs/gesr.md)."""
    mean = num_candidates // max(num_sequences, 1)
    bound = min(mean, math.isqrt(32 * mean))
    return 1 << max(bound.bit_length() - 1, 0)


def cross_padding(
    history_offsets: Tensor, segs: BatchSegments, *, max_history: int
) -> CrossPadding:
    """The tiled layout for histories of at most ``max_history`` events; ``segs`` are the
    batch's segment ids. The tile count is a bound from the shapes (:func:`tile_size_for`)."""
    B, M = history_offsets.shape[0] - 1, segs.candidate_seq.shape[0]
    device = history_offsets.device
    check_history_bound(segs.history_len, max_history)
    T = tile_size_for(M, B)
    if T == 1:  # a tile per candidate, in candidate order
        candidate_tile = torch.arange(M, device=device)
        candidate_slot = torch.zeros(M, dtype=torch.int64, device=device)
        tile_seq = segs.candidate_seq
    else:
        # Tiles of request b: [tiles_end[b] - ceil(M_b / T), tiles_end[b]).
        tiles_of_request = (segs.candidate_len + (T - 1)) // T
        tiles_end = torch.cumsum(tiles_of_request, 0)
        first_tile = tiles_end - tiles_of_request
        candidate_tile = first_tile[segs.candidate_seq] + segs.candidate_local // T
        candidate_slot = segs.candidate_local % T
        # The request of each tile; unused tiles (past the last request's) take request B - 1.
        num_tiles = (M + B * (T - 1)) // T
        tiles = torch.arange(num_tiles, device=device)
        tile_seq = torch.searchsorted(tiles_end, tiles, right=True).clamp_max(B - 1)
    slots = torch.arange(max_history, device=device)
    padding = slots >= segs.history_len[tile_seq].unsqueeze(1)
    rows = torch.where(
        padding,
        spread_padding(tile_seq.shape[0], max_history, history_offsets),
        history_offsets[tile_seq].unsqueeze(1) + slots,
    )
    return CrossPadding(rows, padding, candidate_tile, candidate_slot, T)


def one_request_padding(
    history_len: int, num_candidates: int, device: torch.device
) -> CrossPadding:
    """The layout of one request (serving: its lengths are the host's): one tile of all its
    candidates over its whole history, no padding, nothing uploaded."""
    rows = torch.arange(history_len, device=device).unsqueeze(0)
    return CrossPadding(
        rows,
        torch.zeros(1, history_len, dtype=torch.bool, device=device),
        torch.zeros(num_candidates, dtype=torch.int64, device=device),
        torch.arange(num_candidates, device=device),
        num_candidates,
    )
