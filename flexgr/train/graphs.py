"""CUDA-graph replay of the whole retrieval training step (``train.cuda_graphs``).

A small model's step is launch-bound: on one H200 the ML-1M HSTU-large step spent ~8 ms of
device time in ~33 ms of host time, most of it launching the ~700 kernels of the forward,
backward and optimizer (BENCHMARKS.md, 2026-12-04). Capturing the step once per shape and
replaying it makes the host's cost one launch per step (22.2 -> 8.7 ms a step, 2026-12-05).

A graph replays fixed shapes, so every batch is padded to a bucket (:class:`GraphPadding`):

- the packed length T is rounded up to a multiple of ``train.graph_bucket`` tokens and the
  sequence count to a fixed ``batch_size + spare`` by appending dummy sequences, each at most
  the model's longest sequence (the attention kernel's block tables assume that band);
- dummy tokens read and predict item 1 at timestamp 0, so every op sees ordinary values, and
  their losses weigh 0: the step's loss is sum(per-token loss * weight) with weight 1 / T on
  the T real tokens. Sequences never attend across each other and every other op is per token,
  so the real tokens' outputs, loss and gradients are those of the unpadded step (up to the
  float rounding of a different reduction order).

Per bucket (:class:`StepGraphs`): the first batch runs the step eagerly on the bucket's static
buffers (it trains, and it warms Triton's autotuner, which syncs, and the optimizer's state);
the second is captured and every later one copies its batch into the buffers and replays.
The graphs share one memory pool; each replay's loss is copied out before the next replay, as
another bucket's intermediates may reuse its memory. Gradients and the optimizer's state
(AdamW with ``capturable=True`` and a tensor learning rate, set before each replay) live
outside the graphs, so every bucket updates the same tensors.

What a graph cannot do, the run does eagerly, with one warning and a metrics record: a capture
that fails (an op that syncs with the host) switches the rest of the run to the eager step on
the same padded batches. Random draws (dropout, negatives) come from the graph-safe generator,
so a graphed run is not bit-identical to an eager one, and a resumed run captures again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from flexgr.train.batches import TrainBatch

# Dummy tokens read and predict this item: a real row of every item table (0 is padding).
PAD_ITEM = 1


@dataclass(frozen=True)
class GraphPadding:
    """How batches are padded to a graph's shape: T to a multiple of ``bucket`` tokens, the
    sequence count to ``num_sequences``, no dummy sequence longer than ``max_len``."""

    bucket: int
    num_sequences: int
    max_len: int

    @classmethod
    def for_batches(cls, batch_size: int, bucket: int, max_len: int) -> GraphPadding:
        """Room for ``batch_size`` real sequences plus enough dummy ones to hold the tokens of
        any padding: fewer than ``bucket`` beyond one token per dummy sequence."""
        if bucket < 1 or max_len < 2 or batch_size < 1:
            raise ValueError(
                f"graph padding needs bucket >= 1, max_len >= 2 and batch_size >= 1, got "
                f"{bucket}, {max_len}, {batch_size}"
            )
        spare = math.ceil(bucket / (max_len - 1))
        return cls(bucket, batch_size + spare, max_len)

    def padded_tokens(self, num_tokens: int, num_sequences: int) -> int:
        dummies = self.num_sequences - num_sequences
        return -(-(num_tokens + dummies) // self.bucket) * self.bucket

    def pad(self, batch: TrainBatch) -> TrainBatch:
        """``batch`` (one process's whole step) with dummy sequences appended."""
        if batch.row_offset != 0 or batch.row_total != batch.num_tokens:
            raise ValueError("graph padding takes a whole step's batch (one process)")
        T, B = batch.num_tokens, batch.offsets.numel() - 1
        dummies = self.num_sequences - B
        if dummies < 1:
            raise ValueError(f"a batch of {B} sequences does not fit {self.num_sequences - 1}")
        padding = self.padded_tokens(T, B) - T
        # One token per dummy sequence, the rest filled up to max_len from the first one on.
        fill = padding - dummies
        j = torch.arange(dummies, dtype=torch.int64)
        lengths = 1 + (fill - j * (self.max_len - 1)).clamp(0, self.max_len - 1)
        offsets = torch.cat([batch.offsets, T + lengths.cumsum(0)])

        def tail(values: Tensor, count: int, fill_value: int) -> Tensor:
            return torch.cat([values, values.new_full((count,), fill_value)])

        return TrainBatch(
            item_ids=tail(batch.item_ids, padding, PAD_ITEM),
            offsets=offsets,
            timestamps=tail(batch.timestamps, padding, 0),
            query_time=tail(batch.query_time, dummies, 0),
            targets=tail(batch.targets, padding, PAD_ITEM),
            users=tail(batch.users, dummies, 0),
            real_tokens=T,
        )


def token_weights(batch: TrainBatch, device: torch.device | None = None) -> Tensor:
    """[T] float32 weight of each token's loss in the step's mean: 1 / T_real on real tokens,
    0 on padding; built on ``device`` (default: the batch's) from the host's count, no copy."""
    T, real = batch.num_tokens, batch.num_real_tokens
    rows = torch.arange(T, device=device or batch.item_ids.device)
    return (rows < real).to(torch.float32) / max(real, 1)


class PaddedSequences(Dataset[TrainBatch]):
    """A batch dataset whose batches come out padded (in the loader, before pinning)."""

    def __init__(self, sequences: Dataset, padding: GraphPadding) -> None:
        self.sequences, self.padding = sequences, padding

    def __getitem__(self, part: object) -> TrainBatch:
        return self.padding.pad(self.sequences[part])

    def __len__(self) -> int:
        return len(self.sequences)  # type: ignore[arg-type]


# (padded batch on the device, token weights [T]) -> the step's loss (0-d, detached)
StepFn = Callable[[TrainBatch, Tensor], Tensor]


class _Bucket:
    """One padded shape's static inputs, and its graph once captured."""

    def __init__(self, example: TrainBatch, device: torch.device) -> None:
        self.batch = example.to(device)  # tensors with fixed addresses, refilled per step
        self.weights = torch.empty(example.num_tokens, dtype=torch.float32, device=device)
        self.runs = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: Tensor | None = None

    def load(self, batch: TrainBatch) -> None:
        for name in ("item_ids", "offsets", "timestamps", "query_time", "targets", "users"):
            getattr(self.batch, name).copy_(getattr(batch, name), non_blocking=True)
        self.weights.copy_(token_weights(batch, self.weights.device))


class StepGraphs:
    """The training step, replayed from one CUDA graph per padded shape (module docstring).

    ``step`` must run the whole step (forward, loss, backward, optimizer) with no host sync and
    zero the gradients in place (``zero_grad(set_to_none=False)``) so that they keep their
    addresses; ``on_failure(reason)`` hears once when capture fails and the eager step takes
    over."""

    def __init__(
        self,
        step: StepFn,
        device: torch.device,
        on_failure: Callable[[str], None],
    ) -> None:
        self.step, self.device, self.on_failure = step, device, on_failure
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.failed = False
        self.captures = 0
        self.replays = 0

    def __call__(self, batch: TrainBatch) -> Tensor:
        """The loss of one step on ``batch`` (padded, on the CPU or the device)."""
        key = (batch.num_tokens, batch.offsets.numel())
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(batch, self.device)
        bucket.load(batch)
        if bucket.graph is None and bucket.runs >= 1 and not self.failed:
            self._capture(bucket)
        if bucket.graph is None:
            bucket.runs += 1
            return self.step(bucket.batch, bucket.weights)
        bucket.graph.replay()
        self.replays += 1
        assert bucket.loss is not None
        return bucket.loss.clone()  # before another bucket's replay may overwrite it

    def _capture(self, bucket: _Bucket) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: work of other threads (a data-loading thread's copies) neither
            # fails the capture nor is captured.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                loss = self.step(bucket.batch, bucket.weights)
        except Exception as err:  # noqa: BLE001 - e.g. an op that syncs; training goes on eagerly
            self.failed = True
            torch.cuda.synchronize(self.device)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self.on_failure(f"{type(err).__name__}: {first}"[:300])
            return
        # The capture only recorded the step; replaying it now is this batch's step.
        bucket.graph, bucket.loss = graph, loss
        self.captures += 1
