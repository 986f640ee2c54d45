"""Random jagged attention problems shared by the ops tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgr.ops.rab import RelativeBias
from tests.conftest import make_offsets


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    offsets: torch.Tensor
    num_targets: torch.Tensor | None
    contextual_len: int
    max_attn_len: int
    full_attn_tail: int
    rab: RelativeBias | None
    max_seq_len: int
    alpha: float

    def kwargs(self) -> dict:
        return dict(
            max_seq_len=self.max_seq_len, alpha=self.alpha, num_targets=self.num_targets,
            contextual_len=self.contextual_len, max_attn_len=self.max_attn_len,
            full_attn_tail=self.full_attn_tail, rab=self.rab,
        )

    def leaves(self) -> list[torch.Tensor]:
        out = [self.q, self.k, self.v]
        if self.rab is not None:
            out += [self.rab.pos_w, self.rab.ts_w]
        return out


def random_problem(
    lengths: list[int],
    *,
    heads: int = 2,
    dqk: int = 16,
    dv: int = 8,
    contextual_len: int = 0,
    targets: bool = False,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    use_rab: bool = False,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
    requires_grad: bool = False,
) -> Problem:
    g = torch.Generator().manual_seed(seed)
    lengths = [max(L, contextual_len + 1) for L in lengths]
    offsets = make_offsets(lengths, device)
    T = sum(lengths)
    max_seq_len = max(lengths) + 3

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)
        return x.requires_grad_(requires_grad)

    q, k, v = rnd(T, heads, dqk, scale=0.5), rnd(T, heads, dqk, scale=0.5), rnd(T, heads, dv)
    nt = None
    if targets:
        nt = torch.tensor(
            [int(torch.randint(0, L - contextual_len + 1, (1,), generator=g)) for L in lengths], device=device
        )
    rab = None
    if use_rab:
        steps = torch.randint(0, 200_000, (T,), generator=g)
        ts = torch.cumsum(steps, 0).to(device)
        query = (ts[offsets[1:] - 1] + 1000).to(device)
        rab = RelativeBias.from_timestamps(
            rnd(2 * max_seq_len - 1, scale=0.3), rnd(129, scale=0.3), ts, offsets, query
        )
    return Problem(q, k, v, offsets, nt, contextual_len, max_attn_len, full_attn_tail, rab, max_seq_len, 0.7)


def cast(p: Problem, dtype: torch.dtype, requires_grad: bool = True) -> Problem:
    """Detached copy in another dtype (leaves require grad). Bias tables stay at least fp32, as
    model parameters do under autocast."""

    def c(x: torch.Tensor, dt: torch.dtype = dtype) -> torch.Tensor:
        return x.detach().to(dt).requires_grad_(requires_grad)

    rab = None
    if p.rab is not None:
        tdt = torch.promote_types(dtype, torch.float32)
        rab = RelativeBias(
            c(p.rab.pos_w, tdt), c(p.rab.ts_w, tdt), p.rab.timestamps, p.rab.next_timestamps,
            p.rab.positions,
        )
    return Problem(
        c(p.q), c(p.k), c(p.v), p.offsets, p.num_targets, p.contextual_len, p.max_attn_len,
        p.full_attn_tail, rab, p.max_seq_len, p.alpha,
    )
