"""Load-balanced Stochastic Length (ULTRA-HSTU's LBSL) for data-parallel training.

Plain SL draws each sequence's length independently, so under data parallelism one rank may
get several whole long sequences while another gets cut ones; the synchronous step then waits
for the slowest rank. LBSL keeps SL's draws but moves every rank's attention cost
``load = sum_i (n_i^2 + beta n_i)`` (``n_i`` its sequences' input tokens) to a common target:

1. **Warm-up.** The first ``warmup`` global steps train with plain SL.
2. **Target.** From step ``warmup`` on, the target ``l`` is the mean per-rank plain-SL load
   over the ``warmup`` steps before the current block; blocks are ``every`` steps long, so the
   target is re-estimated every ``every`` steps.
3. **Per rank.** Start from the plain SL lengths. Above the target, cut the longest sequences
   to a common cap (``n_i = min(sl_i, cap)``, the largest cap whose load is at most ``l``);
   below it, give back events SL removed (``n_i = min(full_i, max(sl_i, cap))``, again the
   largest cap within ``l``). Kept events are chosen as SL chooses them (the most recent for
   ``recent``), and every sequence keeps at least one input.

Everything is a pure function of (seed, epoch, sequence number), as for plain SL
(:mod:`flexgr.train.length_sampling`): every rank and data-loader worker computes the same
targets and the loads of all ranks without communicating (the equivalent of the paper's
periodic all-reduce), a resumed run draws the same, and a rank's lengths depend on its own
sequences and the target only. ``beta`` weighs a token's projection cost against one
attention pair; :func:`flexgr.flops.balance_beta` derives it from the model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from flexgr.train.length_sampling import LengthSampler


def attention_load(lengths: np.ndarray, beta: float) -> float:
    """``sum n^2 + beta n`` of one rank's sequences."""
    n = np.asarray(lengths, dtype=np.float64)
    return float((n * n + beta * n).sum())


def balance_lengths(sl: np.ndarray, full: np.ndarray, target: float, beta: float) -> np.ndarray:
    """int64 [B]: lengths between 1 and ``full`` whose load is at most ``target`` and as close
    to it as a common cap allows (see the module docstring)."""
    sl = np.minimum(np.asarray(sl, dtype=np.int64), full)
    full = np.asarray(full, dtype=np.int64)
    if sl.size == 0:
        return sl
    if attention_load(sl, beta) > target:

        def shape(cap: int) -> np.ndarray:
            return np.minimum(sl, cap)

        lo, hi = 1, int(sl.max())
    else:

        def shape(cap: int) -> np.ndarray:
            return np.minimum(full, np.maximum(sl, cap))

        lo, hi = 0, int(full.max())
    if attention_load(shape(lo), beta) > target:
        return np.maximum(shape(lo), 1)
    while lo < hi:  # the largest cap within the target (the load grows with the cap)
        mid = (lo + hi + 1) // 2
        if attention_load(shape(mid), beta) <= target:
            lo = mid
        else:
            hi = mid - 1
    return np.maximum(shape(lo), 1)


@dataclass(frozen=True, eq=False)  # compared by identity: it holds arrays and caches
class BalancedLengthSampler(LengthSampler):
    """A :class:`LengthSampler` whose per-rank loads follow the LBSL target.

    ``full_lengths`` are every sequence's input tokens without SL; ``order`` gives an epoch's
    permutation of the sequences (``EpochBatches.order``), cut into ``batch_size`` batches and
    each batch into ``dp_size`` contiguous parts, as the data-parallel sampler cuts them."""

    full_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    batch_size: int = 1
    dp_size: int = 1
    warmup: int = 20
    every: int = 100
    beta: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup < 1 or self.every < 1:
            raise ValueError("the LBSL warm-up and re-estimation interval must be >= 1 step")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")

    # ------------------------------------------------------------ where a batch sits

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.full_lengths) // self.batch_size)

    @functools.cached_property
    def _orders(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return {}

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation, inverse) of ``epoch``, as EpochBatches draws them."""
        if epoch not in self._orders:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.full_lengths))
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            self._orders.clear()  # one epoch at a time is enough
            self._orders[epoch] = (order, inverse)
        return self._orders[epoch]

    def global_step(self, epoch: int, batch: int) -> int:
        return max(epoch - 1, 0) * self.batches_per_epoch + batch

    def parts(self, step: int) -> tuple[int, list[np.ndarray]]:
        """(epoch, each rank's rows) of global step ``step``."""
        epoch, batch = step // self.batches_per_epoch + 1, step % self.batches_per_epoch
        order, _ = self._order(epoch)
        rows = order[batch * self.batch_size : (batch + 1) * self.batch_size]
        return epoch, np.array_split(rows, self.dp_size)

    # ------------------------------------------------------------ loads and targets

    def plain_lengths(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        return LengthSampler.input_lengths(self, rows, self.full_lengths[rows], epoch)

    def plain_loads(self, step: int) -> list[float]:
        epoch, parts = self.parts(step)
        return [attention_load(self.plain_lengths(p, epoch), self.beta) for p in parts]

    @functools.cached_property
    def _targets(self) -> dict[int, float]:
        return {}

    def target(self, block_start: int) -> float:
        """The mean per-rank plain-SL load over the ``warmup`` steps before ``block_start``."""
        if block_start not in self._targets:
            steps = range(block_start - self.warmup, block_start)
            loads = [x for s in steps for x in self.plain_loads(s)]
            self._targets[block_start] = float(np.mean(loads))
        return self._targets[block_start]

    def target_at(self, step: int) -> float | None:
        """The target of global step ``step`` (None in the warm-up: plain SL)."""
        if step < self.warmup:
            return None
        return self.target(self.warmup + self.every * ((step - self.warmup) // self.every))

    def input_lengths(self, rows: np.ndarray, full: np.ndarray, epoch: int) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        sl = LengthSampler.input_lengths(self, rows, full, epoch)
        if rows.size == 0:
            return sl
        _, inverse = self._order(epoch)
        target = self.target_at(self.global_step(epoch, int(inverse[rows[0]]) // self.batch_size))
        return sl if target is None else balance_lengths(sl, full, target, self.beta)

    def rank_loads(self, step: int, balanced: bool = True) -> list[float]:
        """Every rank's load at global step ``step`` (LBSL's, or plain SL's)."""
        if not balanced:
            return self.plain_loads(step)
        epoch, parts = self.parts(step)
        return [
            attention_load(self.input_lengths(p, self.full_lengths[p], epoch), self.beta)
            for p in parts
        ]


def load_ratio(loads: list[float]) -> float:
    """max / mean of the ranks' loads (1 = perfectly balanced)."""
    mean = float(np.mean(loads)) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def balanced_sampler(
    t: object, max_len: int, full_lengths: np.ndarray, dp_size: int, model_cfg: object
) -> BalancedLengthSampler:
    """The run's sampler from its [train] settings (``sl_*``); ``sl_balance_beta < 0`` takes
    beta from the model's FLOPs (:func:`flexgr.flops.balance_beta`, 0 for models it cannot
    count)."""
    beta = float(t.sl_balance_beta)  # type: ignore[attr-defined]
    if beta < 0:
        from flexgr.flops import balance_beta

        fields = ("d_model", "num_heads", "dqk", "dv")
        beta = balance_beta(model_cfg) if all(hasattr(model_cfg, f) for f in fields) else 0.0
    return BalancedLengthSampler(
        alpha=t.sl_alpha,  # type: ignore[attr-defined]
        max_len=max_len,
        selection=t.sl_selection,  # type: ignore[attr-defined]
        seed=t.seed,  # type: ignore[attr-defined]
        full_lengths=np.asarray(full_lengths, dtype=np.int64),
        batch_size=t.batch_size,  # type: ignore[attr-defined]
        dp_size=dp_size,
        warmup=t.sl_balance_warmup,  # type: ignore[attr-defined]
        every=t.sl_balance_every,  # type: ignore[attr-defined]
        beta=beta,
    )
