"""Which rank of a context-parallel group holds which tokens of a packed batch.

Causal attention costs a query in proportion to its position, so giving rank r the r-th contiguous
slice of every sequence would leave the last rank with most of the work. Instead every sequence is
cut into 2C chunks and rank r takes chunks r and 2C-1-r (head-tail, or zig-zag): a cheap chunk
from the head and an expensive one from the tail, the same total on every rank up to rounding.
Sequences shorter than 2C simply leave some chunks empty.

Every rank of the group sees the whole global batch (it is small: ids and a few per-token
integers), so each one computes every rank's token list without communication; only activations
(K and V) travel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flexgr.masks.block import padded_length
from flexgr.masks.layout import seq_ids_and_local

SCHEMES = ("zigzag", "contiguous")


@dataclass(frozen=True)
class TokenShard:
    """One rank's share of a packed batch, plus the layout of the all-gathered key/value buffer.

    local_index:   [T_r] int64, global index of each local token, ascending; local tokens of one
                   sequence stay together, so ``local_offsets`` describes them as a jagged batch.
    local_offsets: [B + 1] int64, this rank's token count per sequence (zero-length allowed).
    shard_len:     S, the length every rank pads its K/V to before the all-gather.
    slot_index:    [C * S] int64, global index of the token in each slot of the gathered buffer
                   (rank-major: slots r*S .. r*S + T_r - 1 hold rank r's tokens), -1 for padding.
    slot_of_token: [T] int64, the inverse: the gathered slot holding each global token.
    """

    cp_rank: int
    cp_size: int
    offsets: Tensor
    total_len: int
    local_index: Tensor
    local_offsets: Tensor
    shard_len: int
    slot_index: Tensor
    slot_of_token: Tensor
    tokens_per_rank: tuple[int, ...]

    @property
    def local_len(self) -> int:
        return self.tokens_per_rank[self.cp_rank]

    @property
    def gathered_len(self) -> int:
        return self.cp_size * self.shard_len

    def pad_to_shard(self, x_SX: Tensor) -> Tensor:
        """This rank's rows [T_r, ...] zero-padded to the S rows every rank sends to the
        all-gather."""
        pad = self.shard_len - x_SX.shape[0]
        return torch.nn.functional.pad(x_SX, (0,) * (2 * (x_SX.dim() - 1)) + (0, pad))

    def take(self, x_T: Tensor) -> Tensor:
        """This rank's rows of a per-token global tensor (labels, weights, ...)."""
        if x_T.shape[0] != self.total_len:
            raise ValueError(
                f"take: expected {self.total_len} rows (the global batch), got {x_T.shape[0]}"
            )
        return x_T[self.local_index]


def token_owner(
    offsets: Tensor, cp_size: int, scheme: str = "zigzag", total_len: int | None = None
) -> Tensor:
    """[T] int64: the context-parallel rank that holds each token of the packed batch.

    Chunk k of a sequence of length L covers in-sequence indices [floor(kL/n), floor((k+1)L/n)),
    n = 2C for zig-zag (rank min(k, 2C-1-k)) and n = C for contiguous (rank k); the closed form
    k = ((i + 1) * n - 1) // L finds it without a search.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    offsets = offsets.to(torch.int64)
    T = int(offsets[-1]) if total_len is None else total_len
    seq, local = seq_ids_and_local(offsets, T)
    lengths = (offsets[1:] - offsets[:-1])[seq.long()]
    chunks = 2 * cp_size if scheme == "zigzag" else cp_size
    chunk = ((local.long() + 1) * chunks - 1) // lengths.clamp(min=1)
    if scheme == "zigzag":
        return torch.minimum(chunk, chunks - 1 - chunk)
    return chunk


def shard_tokens(
    offsets: Tensor,
    cp_size: int,
    cp_rank: int,
    *,
    total_len: int | None = None,
    scheme: str = "zigzag",
) -> TokenShard:
    """Head-tail shard of a packed batch for rank ``cp_rank`` of ``cp_size`` (see module doc).
    ``scheme="contiguous"`` exists to measure what head-tail buys; results are correct either way."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    offsets = offsets.to(torch.int64)
    device = offsets.device
    T = int(offsets[-1]) if total_len is None else total_len
    B = offsets.numel() - 1
    owner = token_owner(offsets, cp_size, scheme, T)
    counts = torch.bincount(owner, minlength=cp_size)
    tokens_per_rank = tuple(int(c) for c in counts.tolist())
    # Rounded like a packed length so that the all-gather and compiled kernels see few shapes.
    shard_len = padded_length(max(tokens_per_rank), device)

    # Sorting by (owner, global index) lists each rank's tokens in global order, rank after rank.
    token = torch.arange(T, device=device)
    order = torch.argsort(owner * T + token)
    starts = torch.cumsum(counts, 0) - counts
    sorted_owner = owner[order]
    slot = sorted_owner * shard_len + (torch.arange(T, device=device) - starts[sorted_owner])
    slot_index = torch.full((cp_size * shard_len,), -1, dtype=torch.int64, device=device)
    slot_index[slot] = order
    slot_of_token = torch.empty(T, dtype=torch.int64, device=device)
    slot_of_token[order] = slot

    mine = owner == cp_rank
    local_index = token[mine]
    seq, _ = seq_ids_and_local(offsets, T)
    per_seq = torch.bincount(seq.long()[mine], minlength=B)
    local_offsets = torch.cat([offsets.new_zeros(1), torch.cumsum(per_seq, 0)])
    return TokenShard(
        cp_rank=cp_rank,
        cp_size=cp_size,
        offsets=offsets,
        total_len=T,
        local_index=local_index,
        local_offsets=local_offsets,
        shard_len=shard_len,
        slot_index=slot_index,
        slot_of_token=slot_of_token,
        tokens_per_rank=tokens_per_rank,
    )
