"""Stochastic Length (SL), HSTU paper section 3.2 and Appendix F.1: shorten long histories at
random in training so the expected attention cost per user is O(N^alpha), alpha in (1, 2].

The rule, as the paper states it: "user j has history length n_{c,j}; N_c = max_j n_{c,j}; for
a user with length n the input is the full sequence if n <= N_c^(alpha/2); otherwise a
subsequence of length N_c^(alpha/2) with probability 1 - N_c^alpha / n^2, or the full sequence
with probability N_c^alpha / n^2." The reference code (``common.py::apply_sampling``) reads N as
``max_seq_len`` and rounds the threshold down: ``threshold = int(max_seq_len ** (alpha / 2))``,
truncate ``if length > threshold and rand() < 1 - max_seq_len ** alpha / length ** 2``. These
functions follow that code exactly; ``max_len`` is N, and callers pass either the configured
window or the longest history, as they mean it. Lengths above ``max_len`` are not clipped here.

Which events survive a truncation (Appendix F.1, ``f_i = t_n - t_i`` the age of event i):

- ``recent``: the ``threshold`` most recent events (the paper's "greedy");
- ``random``: a uniform sample without replacement;
- ``weighted``: a sample without replacement with weights ``w_i = 1 - f_i / sum(f)``, drawn as
  successive weighted picks (Efraimidis-Spirakis keys ``log(u) / w``). For long sequences all
  weights are close to 1 (the oldest of n evenly spaced events has w = 1 - 2/n), so this is
  nearly uniform; the paper's NE for the two differs by .001-.002.

The paper does not say that the most recent event must survive; ``recent`` keeps it by
construction, and ``keep_last=True`` forces it for the other two (for a batch builder whose
last event is a target). Kept events stay in their original time order.

Everything is NumPy inside; jagged inputs may be NumPy arrays or CPU/GPU tensors, and random
draws come only from the explicit ``generator`` (``numpy.random.Generator`` or
``torch.Generator``), so a seeded generator gives the same selection every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch

from flexgr.data.errors import DataError

Selection = Literal["recent", "random", "weighted"]
SELECTIONS: tuple[str, ...] = ("recent", "random", "weighted")
RandomSource = np.random.Generator | torch.Generator
Column = TypeVar("Column", np.ndarray, torch.Tensor)


def check_alpha(alpha: float, max_len: int) -> None:
    if not 1.0 < alpha <= 2.0:
        raise DataError(f"alpha must be in (1, 2], got {alpha!r}")
    if max_len < 1:
        raise DataError(f"max_len must be >= 1, got {max_len!r}")


def sl_threshold(max_len: int, alpha: float) -> int:
    """The truncated length ``int(N ** (alpha / 2))``, e.g. 776 for N = 4096, alpha = 1.6."""
    check_alpha(alpha, max_len)
    return int(max_len ** (alpha / 2))


def keep_full_probability(lengths: np.ndarray, max_len: int, alpha: float) -> np.ndarray:
    """float64 [B]: the chance that each sequence is kept whole (1 up to the threshold)."""
    threshold = sl_threshold(max_len, alpha)
    n = np.asarray(lengths, dtype=np.float64)
    with np.errstate(divide="ignore"):  # n = 0 is below any threshold; its ratio is unused
        ratio = np.minimum(float(max_len) ** alpha / n**2, 1.0)
    return np.where(n > threshold, ratio, 1.0)


def sampled_lengths(
    lengths: np.ndarray, *, max_len: int, alpha: float, generator: RandomSource
) -> np.ndarray:
    """int64 [B]: each length after SL, either itself or the threshold (one draw per sequence)."""
    n = np.asarray(lengths, dtype=np.int64)
    threshold = sl_threshold(max_len, alpha)
    draws = uniform(generator, len(n))
    truncate = (n > threshold) & (draws < 1.0 - keep_full_probability(n, max_len, alpha))
    return np.where(truncate, threshold, n)


def expected_lengths(
    lengths: np.ndarray, *, max_len: int, alpha: float, power: int = 1
) -> np.ndarray:
    """float64 [B]: E[length ** power] after SL, exactly (no sampling)."""
    threshold = sl_threshold(max_len, alpha)
    n = np.asarray(lengths, dtype=np.float64)
    keep = keep_full_probability(n, max_len, alpha)
    return keep * n**power + (1.0 - keep) * float(threshold) ** power


@dataclass(frozen=True)
class Subsequences:
    """Which events of a jagged batch SL keeps: ``index`` into its values, in input order."""

    index: np.ndarray | torch.Tensor  # int64 [T']
    offsets: np.ndarray | torch.Tensor  # int64 [B + 1], of the kept events

    def take(self, values: Column) -> Column:
        """The kept rows of any column that shares the batch's offsets (items, times, ...)."""
        return values[self.index]


def stochastic_length(
    offsets: Column,
    timestamps: Column,
    *,
    max_len: int,
    alpha: float,
    generator: RandomSource,
    selection: Selection = "recent",
    keep_last: bool = False,
) -> Subsequences:
    """Apply SL to a jagged batch: sequence b is events ``[offsets[b], offsets[b + 1])``, each
    in time order. Draws first the lengths (:func:`sampled_lengths`), then the events."""
    if selection not in SELECTIONS:
        raise DataError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    bounds, times = _numpy(offsets, "offsets"), _numpy(timestamps, "timestamps")
    _check_jagged(bounds, times)
    lengths = np.diff(bounds)
    kept = sampled_lengths(lengths, max_len=max_len, alpha=alpha, generator=generator)
    index = select_events(bounds, times, kept, selection, generator, keep_last=keep_last)
    new_offsets = np.zeros_like(bounds)
    np.cumsum(kept, out=new_offsets[1:])
    if isinstance(offsets, torch.Tensor):
        device = offsets.device
        return Subsequences(
            torch.from_numpy(index).to(device), torch.from_numpy(new_offsets).to(device)
        )
    return Subsequences(index, new_offsets)


def select_events(
    offsets: np.ndarray,
    timestamps: np.ndarray,
    kept_lengths: np.ndarray,
    selection: Selection,
    generator: RandomSource,
    *,
    keep_last: bool = False,
) -> np.ndarray:
    """int64 [sum(kept_lengths)]: the chosen events, ``kept_lengths[b]`` of sequence b, in time
    order. One key per event; each sequence keeps its events with the largest keys."""
    lengths = np.diff(offsets)
    if np.any(kept_lengths > lengths) or np.any(kept_lengths < 0):
        raise DataError("kept_lengths must be between 0 and each sequence's length")
    sequence = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(timestamps)) - offsets[sequence]
    if selection == "recent":
        keys = position.astype(np.float64)
    elif selection == "random":
        keys = uniform(generator, len(timestamps))
    else:
        keys = _weighted_keys(offsets, timestamps, sequence, generator)
    if keep_last:
        keys[offsets[1:][lengths > 0] - 1] = np.inf
    order = np.lexsort((keys, sequence))  # by sequence, then key ascending
    rank_in_sequence = np.arange(len(order)) - offsets[sequence]  # sequence[order] == sequence
    chosen = order[rank_in_sequence >= (lengths - kept_lengths)[sequence]]
    return np.sort(chosen).astype(np.int64)


def _weighted_keys(
    offsets: np.ndarray, timestamps: np.ndarray, sequence: np.ndarray, generator: RandomSource
) -> np.ndarray:
    lengths = np.diff(offsets)
    newest = timestamps[(offsets[1:] - 1)[sequence]]  # only events of non-empty sequences
    age = (newest - timestamps).astype(np.float64)
    total_age = np.bincount(sequence, weights=age, minlength=len(lengths))[sequence]
    # All events at one instant: no age to weigh by, so every weight is 1.
    weight = np.where(total_age > 0, 1.0 - age / np.where(total_age > 0, total_age, 1.0), 1.0)
    log_u = np.log(1.0 - uniform(generator, len(timestamps)))  # in (-inf, 0]; u in (0, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        # Largest log(u) / w first = successive picks with probability proportional to w; an
        # event of weight 0 (the oldest of two) only fills what nothing else can.
        return np.where(weight > 0, log_u / np.where(weight > 0, weight, 1.0), -np.inf)


def uniform(generator: RandomSource, count: int) -> np.ndarray:
    """float64 [count] in [0, 1) from either kind of generator."""
    if isinstance(generator, torch.Generator):
        draws = torch.rand(count, generator=generator, dtype=torch.float64, device=generator.device)
        return draws.cpu().numpy()
    if isinstance(generator, np.random.Generator):
        return generator.random(count)
    raise DataError(
        f"generator must be a numpy.random.Generator or torch.Generator, got {type(generator)}"
    )


def _numpy(column: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    array = column.detach().cpu().numpy() if isinstance(column, torch.Tensor) else column
    array = np.asarray(array)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{name} must be a 1-D integer array, got {array.dtype} {array.shape}")
    return array.astype(np.int64, copy=False)


def _check_jagged(offsets: np.ndarray, timestamps: np.ndarray) -> None:
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(timestamps):
        raise DataError(f"offsets must run from 0 to len(timestamps) ({len(timestamps)})")
    if np.any(np.diff(offsets) < 0):
        raise DataError("offsets must be non-decreasing")
    backwards = np.diff(timestamps) < 0
    starts = offsets[1:-1]
    # A new sequence may start earlier than the previous one ended.
    backwards[starts[(starts > 0) & (starts < len(timestamps))] - 1] = False
    if backwards.any():
        raise DataError("timestamps must be non-decreasing within each sequence")


@dataclass(frozen=True)
class SparsityRow:
    alpha: float
    max_len: int
    sparsity: float  # 1 - E[mean length] / N, the paper's Table 3
    attention_sparsity: float  # 1 - E[mean length^2] / N^2, the share of attention pairs saved


def sl_sparsity(lengths: np.ndarray, *, max_len: int, alpha: float) -> SparsityRow:
    """Expected sparsity of histories ``lengths`` cut to the ``max_len`` most recent events,
    then shortened by SL; alpha = 2 gives the truncation alone (Table 3's "no SL" row)."""
    window = np.minimum(np.asarray(lengths, dtype=np.int64), max_len)
    mean = expected_lengths(window, max_len=max_len, alpha=alpha).mean()
    square = expected_lengths(window, max_len=max_len, alpha=alpha, power=2).mean()
    return SparsityRow(alpha, max_len, 1.0 - mean / max_len, 1.0 - square / max_len**2)


def sparsity_table(
    lengths: np.ndarray, alphas: list[float], max_lens: list[int]
) -> list[SparsityRow]:
    return [sl_sparsity(lengths, max_len=n, alpha=a) for a in alphas for n in max_lens]


def format_sparsity_table(rows: list[SparsityRow], attention: bool = False) -> str:
    """Markdown, one row per alpha and one column per N, as the paper's Table 3."""
    alphas = sorted({row.alpha for row in rows})
    max_lens = sorted({row.max_len for row in rows})
    value = {(r.alpha, r.max_len): r.attention_sparsity if attention else r.sparsity for r in rows}
    lines = [
        "| alpha | " + " | ".join(f"N={n}" for n in max_lens) + " |",
        "| --- |" + " --- |" * len(max_lens),
    ]
    for a in alphas:
        cells = " | ".join(f"{100 * value[a, n]:.1f}%" for n in max_lens)
        lines.append(f"| {a:.1f}{' (no SL)' if a == 2.0 else ''} | {cells} |")
    return "\n".join(lines)


# A log-normal history length, exp(7.93 + 0.46 z) (median about 2,780 events), fitted by least
# squares to the paper's "2.0 (no SL)" row of Table 3 alone; the SL rows then follow from the
# rule, within 4.5 points of the published ones (docs/stochastic-length.md).
TABLE3_LOG_MEAN, TABLE3_LOG_STD = 7.93, 0.46
TABLE3_ALPHAS = [1.6, 1.7, 1.8, 1.9, 2.0]
TABLE3_MAX_LENS = [1024, 2048, 4096, 8192]


def lognormal_lengths(log_mean: float, log_std: float, count: int = 20_000) -> np.ndarray:
    """int64 [count]: evenly spaced quantiles of a log-normal length (no sampling noise)."""
    from statistics import NormalDist

    quantiles = (np.arange(count) + 0.5) / count
    normal = np.array([NormalDist().inv_cdf(q) for q in quantiles])
    return np.floor(np.exp(log_mean + log_std * normal)).astype(np.int64)


def main() -> None:
    """``python -m flexgr.train.stochastic_length``: the Table 3 shape for the synthetic-long
    lengths and for the log-normal fitted to the paper's no-SL row."""
    from flexgr.data.synthetic import generate, synthetic_params

    stream = generate(synthetic_params("synthetic-long"))
    lengths = np.bincount(stream.events.users.cast("int64").to_numpy())
    named = {
        "synthetic-long (256 users, log-uniform 256..16384)": lengths,
        f"log-normal exp({TABLE3_LOG_MEAN} + {TABLE3_LOG_STD} z)": lognormal_lengths(
            TABLE3_LOG_MEAN, TABLE3_LOG_STD
        ),
    }
    for title, values in named.items():
        rows = sparsity_table(values, TABLE3_ALPHAS, TABLE3_MAX_LENS)
        for attention in (False, True):
            kind = "attention sparsity s2" if attention else "sparsity (Table 3)"
            print(f"\n{title}: {kind}\n\n{format_sparsity_table(rows, attention)}")


if __name__ == "__main__":
    main()
