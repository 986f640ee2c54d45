"""Training batches: one jagged sequence per user, supervised at every position by the next event.

For a user whose training events are ``e_0 .. e_{n-1}`` (the split's training range only), the
sequence keeps the most recent ``max_seq_len + 1`` of them; the model reads all but the last and
position t is supervised by the event after it. So every target is a training event, and no
validation or test event is ever read or predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from flexgr.batch import JaggedBatch
from flexgr.data import InteractionData, Split
from flexgr.eval.batches import concat_ranges
from flexgr.train.length_sampling import LengthSampler


@dataclass(frozen=True)
class TrainBatch:
    """One step's sequences on this process, and where their tokens sit in the step's whole
    batch: tokens ``[row_offset, row_offset + T)`` of ``row_total`` (data-parallel replicas'
    shares laid end to end; one process holds all of them: offset 0, total T)."""

    item_ids: Tensor  # [T] int64, the inputs
    offsets: Tensor  # [B + 1] int64
    timestamps: Tensor  # [T] int64
    # [B] timestamp of each sequence's last target: the last position's "next timestamp" in the
    # time bias, as every other position reads its successor's (= its target's) timestamp.
    query_time: Tensor
    targets: Tensor  # [T] int64, the item that follows each position
    users: Tensor  # [B] int64
    row_offset: int = 0
    row_total: int = -1  # -1: this batch is the whole step (row_total = T)
    # Tokens before graph padding (flexgr.train.graphs appends dummy sequences after them);
    # -1: not padded.
    real_tokens: int = -1

    def __post_init__(self) -> None:
        if self.row_total < 0:
            object.__setattr__(self, "row_total", self.item_ids.shape[0])

    def _map(self, fn) -> TrainBatch:  # noqa: ANN001 - Tensor -> Tensor
        tensors = {f.name: fn(getattr(self, f.name)) for f in fields(self) if f.name in _TENSORS}
        return TrainBatch(
            **tensors,
            row_offset=self.row_offset,
            row_total=self.row_total,
            real_tokens=self.real_tokens,
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> TrainBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TrainBatch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return self._map(lambda t: t.pin_memory())

    @property
    def num_tokens(self) -> int:
        return self.item_ids.shape[0]

    @property
    def num_real_tokens(self) -> int:
        """Tokens of real sequences (all of them unless graph padding appended dummies)."""
        return self.num_tokens if self.real_tokens < 0 else self.real_tokens

    @property
    def jagged(self) -> JaggedBatch:
        """The model's view of the batch (inputs only)."""
        return JaggedBatch(self.item_ids, self.offsets, self.timestamps, self.query_time)


_TENSORS = ("item_ids", "offsets", "timestamps", "query_time", "targets", "users")


@dataclass(frozen=True)
class BatchRows:
    """The sequences of one step that this process trains on, and where their tokens sit among
    the step's tokens (every replica's share laid end to end; see :class:`TrainBatch`)."""

    rows: list[int]
    row_offset: int = 0
    row_total: int = -1  # -1: the rows are the whole step
    epoch: int = 0  # Stochastic Length draws per (seed, epoch, sequence)


class TrainSequences(Dataset[TrainBatch]):
    """Indexed by :class:`BatchRows` (or a plain list of sequence numbers: a whole step), so
    workers build batches whole."""

    def __init__(
        self,
        data: InteractionData,
        split: Split,
        max_seq_len: int,
        sampler: LengthSampler | None = None,
    ) -> None:
        self.sampler = sampler  # Stochastic Length (flexgr.train.length_sampling), or None
        starts = data.user_offsets[:-1].astype(np.int64)
        ends = split.train_end.astype(np.int64)
        # A sequence needs two training events: one to read and one to predict.
        keep = ends - starts >= 2
        self.users = np.flatnonzero(keep)
        self.window_start = np.maximum(starts, ends - (max_seq_len + 1))[keep]
        self.window_end = ends[keep]
        self.items = data.items
        self.timestamps = data.timestamps

    def __len__(self) -> int:
        return len(self.users)

    @property
    def num_tokens(self) -> int:
        """Input tokens in one epoch (every sequence once)."""
        return int(self.lengths.sum())

    @property
    def lengths(self) -> np.ndarray:
        """[N] input tokens of each sequence's full window."""
        return self.window_end - self.window_start - 1

    def lengths_in(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        """Input tokens of sequences ``rows`` in ``epoch`` (shorter under Stochastic Length)."""
        full = self.lengths[rows]
        return full if self.sampler is None else self.sampler.input_lengths(rows, full, epoch)

    def __getitem__(self, part: BatchRows | list[int]) -> TrainBatch:  # type: ignore[override]
        if not isinstance(part, BatchRows):
            part = BatchRows(list(part))
        rows_array = np.asarray(part.rows, dtype=np.int64)
        start, end = self.window_start[rows_array], self.window_end[rows_array]
        if self.sampler is None:
            inputs, offsets = concat_ranges(start, end - 1)
            targets = inputs + 1
        else:
            # The kept events of each window; position t is supervised by the next kept one.
            kept, kept_offsets = self.sampler.events(
                rows_array, start, end, self.timestamps, part.epoch
            )
            last = np.zeros(len(kept), dtype=bool)
            last[kept_offsets[1:] - 1] = True
            first = np.zeros(len(kept), dtype=bool)
            first[kept_offsets[:-1]] = True
            inputs, targets = kept[~last], kept[~first]
            offsets = kept_offsets - np.arange(len(kept_offsets))
        return TrainBatch(
            item_ids=torch.from_numpy(self.items[inputs].astype(np.int64)),
            offsets=torch.from_numpy(offsets),
            timestamps=torch.from_numpy(self.timestamps[inputs].astype(np.int64)),
            query_time=torch.from_numpy(self.timestamps[end - 1].astype(np.int64)),
            targets=torch.from_numpy(self.items[targets].astype(np.int64)),
            users=torch.from_numpy(self.users[rows_array]),
            row_offset=part.row_offset,
            row_total=part.row_total,
        )


class EpochBatches(Sampler[list[int]]):
    """Batches of sequence numbers in an order fixed by (seed, epoch) alone.

    A resumed run regenerates the same permutation and skips the batches it already trained on
    (``start_batch``), so it sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, num_sequences: int, batch_size: int, seed: int) -> None:
        self.num_sequences = num_sequences
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_sequences // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        for b in range(self.start_batch, self.batches_per_epoch):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)


class ReplicaBatches(Sampler[BatchRows]):
    """Each global batch of ``batches`` cut into ``dp_size`` contiguous parts (sizes differing by
    at most one; a part may be empty when the batch has fewer sequences than replicas); yields
    part ``dp_rank``. ``train.batch_size`` therefore stays the global batch: every replica count
    trains on the same batches in the same order, and resume works as for one process. With one
    replica the part is the whole batch."""

    def __init__(
        self,
        batches: EpochBatches,
        lengths: np.ndarray | Callable[[np.ndarray, int], np.ndarray],
        dp_size: int = 1,
        dp_rank: int = 0,
    ) -> None:
        """``lengths``: input tokens per sequence, or ``(rows, epoch) -> tokens`` when they
        change by epoch (:meth:`TrainSequences.lengths_in` under Stochastic Length)."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.batches = batches
        if callable(lengths):
            self.lengths_in = lengths
        else:
            fixed = np.asarray(lengths, dtype=np.int64)
            self.lengths_in = lambda rows, epoch: fixed[rows]
        self.dp_size = dp_size
        self.dp_rank = dp_rank

    @property
    def seed(self) -> int:
        return self.batches.seed

    def __iter__(self) -> Iterator[BatchRows]:
        for rows in self.batches:
            epoch = self.batches.epoch
            if self.dp_size == 1:
                # The part is the whole batch: offset 0 and row_total = its own token count,
                # which the built batch knows, so its lengths need not be computed twice here.
                yield BatchRows(rows=rows, epoch=epoch)
                continue
            parts = np.array_split(np.asarray(rows, dtype=np.int64), self.dp_size)
            tokens = [int(self.lengths_in(part, epoch).sum()) for part in parts]
            yield BatchRows(
                rows=parts[self.dp_rank].tolist(),
                row_offset=sum(tokens[: self.dp_rank]),
                row_total=sum(tokens),
                epoch=epoch,
            )

    def __len__(self) -> int:
        return len(self.batches)


class InlineLoader:
    """The batches of ``batches`` built in this process, in order, as a DataLoader with no
    workers builds them (then pinned if ``pin_memory``), without its per-batch machinery
    (fetcher, conversion, profiler range): that was a quarter of the loader's time per batch on
    CPU (0.11 of 0.42 ms, ml-1m-hstu-large; BENCHMARKS.md)."""

    def __init__(
        self, sequences: Dataset, batches: EpochBatches | ReplicaBatches, pin_memory: bool
    ) -> None:
        self.sequences, self.batches, self.pin_memory = sequences, batches, pin_memory

    def __iter__(self) -> Iterator[TrainBatch]:
        for part in self.batches:
            batch = self.sequences[part]
            yield batch.pin_memory() if self.pin_memory else batch

    def __len__(self) -> int:
        return len(self.batches)


def train_loader(
    sequences: Dataset,
    batches: EpochBatches | ReplicaBatches,
    *,
    num_workers: int,
    pin_memory: bool,
) -> DataLoader | InlineLoader:
    """Worker processes build the batches when ``num_workers > 0``; otherwise this process."""
    if num_workers == 0:
        return InlineLoader(sequences, batches, pin_memory)
    return DataLoader(
        sequences,
        sampler=batches,
        batch_size=None,  # the sampler yields whole batches; __getitem__ builds them
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=True,
        prefetch_factor=4,
        # A private generator: otherwise each new iterator draws its worker seed from the global
        # torch RNG, and a resumed run would consume that RNG differently from an unbroken one.
        generator=torch.Generator().manual_seed(batches.seed),
    )
