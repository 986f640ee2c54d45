"""The model contract: what every model implements, and the spec that describes it.

A model is an ``nn.Module`` whose ``forward(item_ids, inputs)`` is a pure function of tensors:
everything it needs per batch besides the item ids (masks, position ids, bias tables, the
attention call bound to them) is built once by its spec's ``prepare`` from a
:class:`~flexgr.batch.JaggedBatch`, outside the forward. The trainer, evaluator, exporter, CLI
and parallel code ask the spec (its name, config class, capabilities, how to prepare inputs and
how to parallelize); none of them tests the model's class. docs/extension-points.md shows how to
add one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from flexgr.batch import JaggedBatch

if TYPE_CHECKING:
    from flexgr.distributed.mesh import ParallelContext


@runtime_checkable
class SequenceModel(Protocol):
    """What the training and serving code calls on a model."""

    cfg: Any  # the model's config dataclass (num_items and max_seq_len among its fields)

    def forward(self, item_ids: Tensor, inputs: Any) -> Tensor:
        """[T] item ids and the batch's prepared inputs -> [T, d] L2-normalised states."""
        ...

    def item_embeddings(self, ids: Tensor | None = None) -> Tensor:
        """L2-normalised item table [I + 1, d] (row 0 is padding), or the rows of ``ids``."""
        ...


@dataclass(frozen=True)
class Capabilities:
    """What a model supports, asked instead of its class.

    context_parallel: sequences may be split over ranks (attention partial sums add, as HSTU's
        pointwise attention does; softmax attention would need a log-sum-exp merge).
    row_wise_dropout: every dropout acts on token rows, so masks can be drawn for the world
        batch and indexed by each rank (exact parity of parallel and single-process runs).
    num_targets: target-aware masks (candidates as the last tokens of a sequence).
    """

    context_parallel: bool = False
    row_wise_dropout: bool = False
    num_targets: bool = False


# (model, batch) -> the model's per-batch inputs
Prepare = Callable[[nn.Module, JaggedBatch], Any]
# (model, global batch, ctx, row_offset, row_total) -> this rank's ShardedInputs
PrepareSharded = Callable[[nn.Module, JaggedBatch, "ParallelContext", int, int], "ShardedInputs"]
# (model, ctx) -> the module a parallel step calls
Parallelize = Callable[[nn.Module, "ParallelContext"], nn.Module]


@dataclass(frozen=True)
class ShardedInputs:
    """One rank's share of a global batch under context parallelism.

    ``item_ids`` and ``inputs`` are what the model's forward takes for this rank's tokens;
    ``take`` picks this rank's rows of any per-token tensor of the global batch (targets,
    weights); ``world_rows`` [T_r] is each local token's row in the world batch (all replicas'
    batches end to end, ``world_tokens`` rows), where draws made for the whole world batch
    (dropout masks, negatives) are indexed.
    """

    item_ids: Tensor
    inputs: Any
    take: Callable[[Tensor], Tensor]
    world_rows: Tensor
    world_tokens: int
    shard: Any  # the token shard (for gathering outputs back into global order)


@dataclass(frozen=True)
class ModelSpec:
    """One architecture: its name in configs and exported files, and how to use it."""

    name: str
    model_cls: type[nn.Module]
    config_cls: type
    prepare: Prepare
    capabilities: Capabilities = Capabilities()
    prepare_sharded: PrepareSharded | None = None  # needed when context_parallel
    parallelize: Parallelize | None = None  # default: data parallel only
    validate: Callable[[dict[str, Any]], None] | None = None  # option checks, ValueError
    # (config, device, training, strict) -> BackendChoice: the attention backend batches run on
    backend: Callable[..., Any] | None = None
    # Set from the dataset and the data section, never by hand in [model].
    derived_fields: tuple[str, ...] = ("num_items", "max_seq_len")
    # "retrieval": next-item states and an item table (this module's SequenceModel); "ranking":
    # per-task predictions for candidates after a history with actions (flexgr.ranking), trained
    # and evaluated by flexgr.ranking's trainer, read by [ranking] settings.
    task: str = "retrieval"

    def build(self, config: dict[str, Any]) -> nn.Module:
        """A fresh model from a complete config dict (derived fields included)."""
        return self.model_cls(self.config_cls(**config))

    def fields(self) -> dict[str, dataclasses.Field]:
        """The [model] settings this architecture accepts (config fields minus derived ones)."""
        return {
            f.name: f
            for f in dataclasses.fields(self.config_cls)
            if f.name not in self.derived_fields
        }


def encode(model: nn.Module, batch: JaggedBatch, spec: ModelSpec | None = None) -> Tensor:
    """Prepare ``batch`` for ``model`` and run it: [T, d] states (the one-call convenience)."""
    from flexgr.model.registry import spec_of

    spec = spec or spec_of(model)
    return model(batch.item_ids, spec.prepare(model, batch))


def shard_inputs(
    model: nn.Module,
    batch: JaggedBatch,
    ctx: ParallelContext,
    row_offset: int = 0,
    row_total: int | None = None,
    spec: ModelSpec | None = None,
) -> ShardedInputs:
    """This rank's inputs for ``batch`` (its replica's batch): with cp > 1 the spec's
    ``prepare_sharded``; with cp = 1 the whole replica batch, prepared as on one device."""
    from flexgr.model.registry import spec_of

    spec = spec or spec_of(model)
    row_total = batch.num_tokens if row_total is None else row_total
    if ctx.cp_size > 1:
        if spec.prepare_sharded is None:
            raise TypeError(f"{spec.name} has no context parallelism; use parallel.cp=1")
        return spec.prepare_sharded(model, batch, ctx, row_offset, row_total)
    rows = torch.arange(row_offset, row_offset + batch.num_tokens, device=batch.device)
    return ShardedInputs(
        batch.item_ids, spec.prepare(model, batch), lambda x: x, rows, row_total, None
    )
