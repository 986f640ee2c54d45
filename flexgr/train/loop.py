"""The training loop: epochs of jagged batches, validation, early stopping, checkpoints, export.

One call of :func:`fit` runs (or resumes) a run in a run directory and leaves there the
resolved config, metrics.jsonl, checkpoints and the exported model of the selected epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from flexgr.data import InteractionData, Split
from flexgr.distributed import ParallelContext, single_process
from flexgr.eval import evaluate
from flexgr.export import export_model
from flexgr.model.registry import spec_of
from flexgr.ops.kernel_options import set_kernel_options
from flexgr.train.batches import ReplicaBatches, TrainBatch, TrainSequences, train_loader
from flexgr.train.config import Config, eval_batch_size, exclusion, item_pool
from flexgr.train.epochs import (  # noqa: F401 (TIMING_KEYS, NonFiniteLoss: re-exported)
    TIMING_KEYS,
    Callback,
    EpochTrainer,
    NonFiniteLoss,
    RunResult,
    TrainError,
    TrainState,
)
from flexgr.train.graphs import GraphPadding, PaddedSequences, StepGraphs
from flexgr.train.length_sampling import LengthSampler
from flexgr.train.load_balance import balanced_sampler, load_ratio
from flexgr.train.loss import loss_recipe, sample_negatives, training_loss
from flexgr.train.parallel import (
    ParallelSetupError,
    ParallelStep,
    on_main,
    start_parallel,
    stop_parallel,
)
from flexgr.train.progress import TrainProgress
from flexgr.train.recompute import apply_recompute
from flexgr.train.rundir import MetricsLog, RunDir
from flexgr.train.runtime import (
    autocast_dtype,
    resolve_device,
    seed_everything,
    set_deterministic,
    set_tf32,
    worker_count,
)
from flexgr.train.setup import load_dataset, load_split, new_model
from flexgr.train.versioned_source import epoch_batches, train_sequences, with_prefetch


class Trainer(EpochTrainer):
    """The state of one training process: one rank under torchrun, or the only process (a
    single-process context, world size 1). Either way one step function runs: each process
    backpropagates its token losses over the step's token count, and the reductions do
    nothing at world size 1. Use :func:`fit`; this class keeps fit readable."""

    def __init__(
        self,
        cfg: Config,
        run: RunDir,
        console: Console,
        show_progress: bool | None,
        callbacks: Sequence[Callback],
        ctx: ParallelContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = run
        self.console = console
        self.show_progress = show_progress
        self.callbacks = list(callbacks)
        t = cfg.train
        if t.deterministic:
            set_deterministic(True)
        set_kernel_options(cfg.kernel)
        try:
            self.ctx = ctx if ctx is not None else single_process(resolve_device(t.device))
            self.device = self.ctx.device
            self.amp_dtype = autocast_dtype(t.precision, self.device)
            set_tf32(t.precision)
        except ValueError as err:
            raise TrainError(str(err)) from None
        ctx = self.ctx
        if t.max_minutes and ctx.world_size > 1:
            raise TrainError(
                "train.max_minutes works in one process only (each rank would reach the deadline "
                "at a different step); use train.max_steps under torchrun"
            )
        self.is_main = ctx.is_main
        on_main(ctx, lambda: _prepare(cfg))  # a built-in dataset is prepared by rank 0 alone
        self.data: InteractionData = load_dataset(cfg)
        self.split: Split = load_split(cfg, self.data)
        seed_everything(t.seed)
        # Items 1..num_items are the ones the model ranks and draws negatives from.
        self.num_items = self.data.pool_size(item_pool(cfg))
        self.model: nn.Module = new_model(cfg, self.num_items).to(self.device)
        apply_recompute(self.model, t.recompute)
        self.spec = spec_of(self.model)
        self.backends = self._choose_backends()
        graphed = t.cuda_graphs and self.device.type == "cuda"  # CPU runs stay eager
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            # Captured steps read the learning rate and the step count on the device.
            lr=torch.tensor(t.lr, device=self.device) if graphed else t.lr,
            betas=(t.beta1, t.beta2),
            weight_decay=t.weight_decay,
            fused=self.device.type == "cuda",
            capturable=graphed,
        )
        self._start_state()
        # (item ids, prepared inputs) -> states: the model, or the compiled model. Evaluation
        # uses it on every process; training uses it inside the step at world size 1 (under
        # torchrun the step runs the DDP-wrapped model eagerly, see ParallelStep).
        self.forward: Callable[..., Tensor] = self.model
        self.loss_fn: Callable[..., Tensor] = training_loss(loss_recipe(t))
        self.negatives_per_position = loss_recipe(t).sampled_negatives(t.num_negatives)
        if t.compile and self.device.type == "cuda":
            # dynamic: the packed length T changes every batch.
            self.forward = torch.compile(self.model, dynamic=True)
            self.loss_fn = torch.compile(self.loss_fn, dynamic=True)
        self.parallel = ParallelStep(ctx, self.model, t.seed)
        sampler = None
        if t.sl_alpha:
            sampler = LengthSampler(t.sl_alpha, cfg.data.max_seq_len, t.sl_selection, t.seed)
        self.sequences = train_sequences(cfg, self.data, self.split, sampler)
        # Load-balanced SL; the same object meters the ranks' loads (metrics.jsonl) either way.
        self.load_meter = None
        if t.sl_alpha and isinstance(self.sequences, TrainSequences):
            self.load_meter = balanced_sampler(
                t, cfg.data.max_seq_len, self.sequences.lengths, ctx.dp_size, self.model.cfg
            )
            if t.sl_balance:
                self.sequences.sampler = self.load_meter
        self._load_ratios: list[float] = []
        if len(self.sequences) == 0:
            raise TrainError(
                f"no user of {self.data.name!r} has two training events; nothing to train on"
            )
        self.batches = epoch_batches(cfg, self.sequences)  # affinity order for versioned
        # train.cuda_graphs: batches come padded to a few shapes, each step one graph replay.
        self.graphs: StepGraphs | None = None
        batch_source: Any = self.sequences
        if graphed:
            padding = GraphPadding.for_batches(t.batch_size, t.graph_bucket, cfg.data.max_seq_len)
            batch_source = PaddedSequences(self.sequences, padding)
            self.graphs = StepGraphs(self._padded_step, self.device, self._drop_graphs)
        # train.batch_size stays the global batch; each replica takes a contiguous part.
        replica_batches = ReplicaBatches(
            self.batches, self.sequences.lengths_in, ctx.dp_size, ctx.dp_rank
        )
        self.loader = train_loader(
            batch_source,
            replica_batches,
            num_workers=worker_count(t.num_workers, self.device),
            pin_memory=self.device.type == "cuda",
        )
        self.loader = with_prefetch(cfg, self.loader)  # versioned.prefetch: a thread ahead
        # Rank 0 writes the run's files; the other ranks compute the same records.
        self.metrics = MetricsLog(run.metrics) if self.is_main else None

    def _choose_backends(self) -> dict[str, Any]:
        """The attention backend of training and of evaluation, decided once (and refused in
        strict mode when it is not the configured one)."""
        if self.spec.backend is None:
            return {}
        strict = self.cfg.train.strict_backend
        try:
            train = self.spec.backend(self.model.cfg, self.device, training=True, strict=strict)
            evals = self.spec.backend(self.model.cfg, self.device, training=False, strict=strict)
        except ValueError as err:
            raise TrainError(str(err)) from None
        record: dict[str, Any] = {"requested": train.requested, "train": train.backend}
        record["eval"] = evals.backend
        if train.reason or evals.reason:
            record["reason"] = train.reason or evals.reason
        return record

    def log_setup(self) -> None:
        """The run's first record: what it resolved (backends, item pool, exclusion)."""
        record = {"kind": "setup", "step": 0, "backend": self.backends}
        record.update(item_pool=item_pool(self.cfg), exclude_history=exclusion(self.cfg))
        record["items"] = self.num_items
        self._write(record)

    # ------------------------------------------------------------ training

    @property
    def compiled(self) -> bool:
        return self.forward is not self.model

    def _drop_compile(self, err: Exception) -> bool:
        """After a failure in compiled code, switch to eager and say so; False if the failure
        has nothing to do with compilation (eager code would fail the same way)."""
        if not self.compiled or isinstance(err, torch.cuda.OutOfMemoryError):
            return False
        reason = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        )
        self.forward, self.loss_fn = self.model, training_loss(loss_recipe(self.cfg.train))
        self.console.print(
            f"warning: torch.compile failed ({reason[:300]}); continuing without compiling "
            "(set train.compile=false to skip the attempt)",
            highlight=False,
        )
        self._write(
            {"kind": "warning", "step": self.state.step, "message": f"compile failed: {reason}"}
        )
        return True

    def _drop_graphs(self, reason: str) -> None:
        """After a failed capture: the same padded steps run eagerly, said once."""
        self.console.print(
            f"warning: the training step cannot be captured as a CUDA graph ({reason}); "
            "continuing eagerly (set train.cuda_graphs=false to skip the attempt)",
            highlight=False,
        )
        self._write(
            {"kind": "warning", "step": self.state.step, "message": f"capture failed: {reason}"}
        )

    def _padded_step(self, batch: TrainBatch, weights_T: Tensor) -> Tensor:
        """The step on a padded batch (flexgr.train.graphs), with no host sync: the loss is
        the weighted sum of the per-token losses (weight 1 / T_real on real tokens, 0 on the
        dummies), and the gradients are zeroed in place so that they keep their addresses."""
        t = self.cfg.train
        autocast = self._autocast(cache_enabled=False)
        states, targets, _ = self.parallel.outputs(batch, self.state.step, autocast, self.forward)
        negatives = sample_negatives(
            batch.row_total, self.negatives_per_position, self.num_items, self.device
        )
        per_token = self.loss_fn(
            states.float(),
            targets,
            negatives,
            self.model.item_embeddings().float(),
            t.temperature,
            reduction="none",
        )
        loss = (per_token * weights_T).sum()
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def resume(self) -> None:
        super().resume()
        # The checkpoint's optimizer groups may come from a run with the other setting.
        graphed = self.graphs is not None
        for group in self.optimizer.param_groups:
            lr = float(group["lr"])
            group["lr"] = torch.tensor(lr, device=self.device) if graphed else lr
            if "capturable" in group:
                group["capturable"] = graphed

    def train_step(self, batch: TrainBatch) -> Tensor:
        if self.graphs is not None:  # batch: padded, on the CPU (copied into the graph's)
            self._set_lr()
            return self.graphs(batch)
        # A failure while compiling (forward or backward) happens before optimizer.step(), so
        # the step can simply be redone eagerly.
        try:
            return self._train_step(batch)
        except Exception as err:
            if not self._drop_compile(err):
                raise
            return self._train_step(batch)

    def _train_step(self, part: TrainBatch) -> Tensor:
        """One step on this process's share of the step's batch; returns the loss of the whole
        step's batch (on every process)."""
        t, ctx = self.cfg.train, self.ctx
        autocast = self._begin_step()
        # The batch's attention inputs (mask, positions, bias tables) are built here, once,
        # outside the (possibly compiled) forward.
        states, targets, rows = self.parallel.outputs(part, self.state.step, autocast, self.forward)
        # Drawn for the whole step's batch, as one process draws them, after the forward's
        # dropout as in one process; then this process's rows.
        negatives = sample_negatives(
            part.row_total, self.negatives_per_position, self.num_items, self.device
        )
        truncated = states.shape[0] != part.num_tokens  # attention truncation: kept rows only
        if ctx.world_size > 1 or truncated:
            negatives = negatives[rows]
        loss_sum = self.loss_fn(
            states.float(),  # the loss runs in fp32: bf16 logits / 0.05 lose too much
            targets,
            negatives,
            self.model.item_embeddings().float(),
            t.temperature,
            reduction="sum",
        )
        # This process's share of the step's mean; DDP sums the shares' gradients over ranks.
        count: Tensor | int = part.row_total
        if truncated:  # the mean over the positions that have outputs, on every rank
            count = ctx.all_reduce_sum(torch.tensor(float(states.shape[0]), device=self.device))
        share = loss_sum / count
        self._descend(share)
        return ctx.all_reduce_sum(share.detach())

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.batches_per_epoch

    def run_epoch(self, progress: TrainProgress) -> bool:
        """Train the rest of the current epoch; False if a limit cut it short."""
        t, state = self.cfg.train, self.state
        self.batches.set_epoch(state.epoch, state.batch_in_epoch)
        progress.start_epoch(state.epoch, self.batches.batches_per_epoch, state.batch_in_epoch)
        self.model.train()
        interval_start, interval_tokens = time.perf_counter(), 0
        for cpu_batch in self.loader:
            if self.limit_reached() is not None:
                return False
            if self.graphs is not None:
                batch = cpu_batch  # copied straight into the graph's static inputs
            else:
                batch = cpu_batch.to(self.device, non_blocking=True)
            loss = self.train_step(batch)
            self._add_loss(loss)  # summed on the device: a host sync only at log intervals
            if self.load_meter is not None and self.ctx.dp_size > 1:
                g = self.load_meter.global_step(state.epoch, state.batch_in_epoch)
                loads = self.load_meter.rank_loads(g, balanced=t.sl_balance)
                self._load_ratios.append(load_ratio(loads))
            state.step += 1
            state.batch_in_epoch += 1
            # The step's tokens, all replicas; a padded batch counts its real ones only.
            padded = cpu_batch.real_tokens >= 0
            interval_tokens += cpu_batch.real_tokens if padded else cpu_batch.row_total
            progress.advance(loss)  # read only where shown, before the first record
            if state.step % t.log_every == 0:
                elapsed = time.perf_counter() - interval_start
                self._log_train(progress, interval_tokens / max(elapsed, 1e-9))
                interval_start, interval_tokens = time.perf_counter(), 0
            if t.checkpoint_every and state.step % t.checkpoint_every == 0:
                self.save()
        return state.batch_in_epoch >= self.batches.batches_per_epoch

    def _log_train(self, progress: TrainProgress, tokens_per_s: float) -> None:
        state = self.state
        loss = self._mean_loss()
        record = {
            "kind": "train",
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss,
            "lr": self.lr_at(state.step - 1),
            "tokens_per_s": tokens_per_s,
        }
        if self._load_ratios:  # max / mean attention load over the ranks, this interval
            record["rank_load_max_mean"] = sum(self._load_ratios) / len(self._load_ratios)
            self._load_ratios = []
        self._write(record)
        progress.log(state.step, loss, record["lr"], tokens_per_s)

    # ------------------------------------------------------------ evaluation and export

    def _evaluate(self, which: str, progress: TrainProgress | None) -> dict[str, float]:
        try:
            return self._rank_split(which, progress)
        except Exception as err:
            if not self._drop_compile(err):
                raise
            return self._rank_split(which, progress)

    def _rank_split(self, which: str, progress: TrainProgress | None) -> dict[str, float]:
        e = self.cfg.eval
        return evaluate(
            self.model,
            self.data,
            self.split,
            which,  # type: ignore[arg-type]
            max_seq_len=self.cfg.data.max_seq_len,
            ks=e.ks,
            exclude=exclusion(self.cfg),
            batch_size=eval_batch_size(e, self.device.type),
            item_chunk=e.item_chunk,
            device=self.device,
            autocast_dtype=self.eval_amp_dtype,
            forward=self.forward,
            # Under torchrun every rank ranks a share of the batches with the plain model.
            part=(self.ctx.rank, self.ctx.world_size),
            reduce=self.ctx.all_reduce_sum if self.ctx.world_size > 1 else None,
            on_batch=progress.eval_batch if progress is not None else None,
        )

    def epoch_note(self, metrics: dict[str, float]) -> str:
        return f", hr@10 {metrics.get('hr@10', float('nan')):.4f}"

    def item_ids(self) -> list[str]:
        return self.data.pool_item_ids(item_pool(self.cfg))

    def data_metadata(self) -> dict[str, Any]:
        return {
            "dataset": self.data.name,
            "protocol": self.cfg.data.protocol,
            "item_pool": item_pool(self.cfg),
            "exclude_history": exclusion(self.cfg),
        }

    def _export(self, epoch: int, test: dict[str, float]) -> None:
        metadata = {
            **self.data_metadata(),
            "epoch": epoch,
            "step": self.state.best_step,
            "selected_by": self.selected_by(),
            "test": test,
        }

        def export() -> None:
            export_model(self.model, self.run.model, item_ids=self.item_ids(), metadata=metadata)

        on_main(self.ctx, export)


def fit(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    console: Console | None = None,
    show_progress: bool | None = None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Train ``cfg`` in ``run_dir`` (a new run, or the continuation of one with ``resume``).

    On resume the run continues from ``checkpoints/last.pt`` exactly as if it had not stopped:
    same batches, same random draws, and metrics.jsonl cut back to what that checkpoint covers.
    ``cfg`` is written to the run's config.toml (pass the run's own config, with any changes).

    Under torchrun (WORLD_SIZE > 1) this joins the process group, trains data / context parallel
    as ``cfg.parallel`` says (docs/distributed.md) and leaves it again; rank 0 writes the run
    directory (rank 0's ``run_dir`` is used everywhere), which every rank must be able to read.
    """
    try:
        ctx, created = start_parallel(cfg)
    except ParallelSetupError as err:
        raise TrainError(str(err)) from None
    try:
        return _fit(cfg, run_dir, ctx, resume, console, show_progress, callbacks)
    finally:
        stop_parallel(ctx, created)


def _fit(
    cfg: Config,
    run_dir: str | Path,
    ctx: ParallelContext | None,
    resume: bool,
    console: Console | None,
    show_progress: bool | None,
    callbacks: Sequence[Callback],
) -> RunResult:
    if ctx is not None:
        # The CLI's default name holds a timestamp, which ranks could compute a second apart.
        run_dir = ctx.from_main(str(run_dir))
    run = RunDir(Path(run_dir))

    # Rank 0 holds the run directory's lock for the whole run; taking it in open_run makes a
    # busy directory fail every rank at once (FailedOnMain). Re-entrant: the CLI takes it too.
    lock = run.lock()

    def open_run() -> None:
        lock.acquire()
        if resume:
            run.require_checkpoint()
            run.write_config(cfg)
        else:
            run.create(cfg)

    try:
        if ctx is None:
            open_run()
        else:
            on_main(ctx, open_run)
            if not ctx.is_main:
                console, show_progress = Console(quiet=True), False
        console = console or Console()
        console.print(f"run directory: {run.root}", highlight=False)
        trainer_cls: Any = Trainer
        if cfg.is_ranking:  # per-task predictions for candidates (flexgr.ranking.train)
            from flexgr.ranking.train import RankingTrainer

            trainer_cls = RankingTrainer
        trainer = trainer_cls(cfg, run, console, show_progress, callbacks, ctx)
        if resume:
            trainer.resume()
        else:
            warm = trainer.warm_start() if cfg.train.init_from else None
            trainer.log_setup()
            if warm is not None:
                trainer.log_warm_start(warm)
            trainer.save()  # so that --resume works from the very first step on
        return trainer.fit()
    finally:
        lock.release()  # nothing to release where it was not taken


def _prepare(cfg: Config) -> None:
    load_dataset(cfg)
