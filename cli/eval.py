"""``flexgr eval``: full-ranking metrics of a run's model on its validation or test targets."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from flexgr.cli.common import fail, metrics_table, print_json, stdout
from flexgr.cli.runs import WEIGHTS_HELP, Weights, load_weights, open_run


class SplitName(str, Enum):
    val = "val"
    test = "test"


class Exclude(str, Enum):
    all = "all"
    window = "window"
    none = "none"


def eval_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="The run to evaluate.")],
    split: Annotated[
        SplitName, typer.Option("--split", help="Which targets to rank.")
    ] = SplitName.test,
    weights: Annotated[Weights, typer.Option("--weights", help=WEIGHTS_HELP)] = Weights.model,
    exclude_history: Annotated[
        Exclude | None,
        typer.Option(
            "--exclude-history",
            help="Leave out of the ranking the user's earlier items: all, those in the input "
            "window, or none (default: the run's eval.exclude_history).",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or auto.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """HR@K, NDCG@K and MRR of a run's model, ranking every item."""
    from flexgr.data import DataError
    from flexgr.eval import evaluate
    from flexgr.export import ExportError
    from flexgr.train.config import eval_batch_size, exclusion
    from flexgr.train.rundir import RunDirError
    from flexgr.train.runtime import resolve_device
    from flexgr.train.setup import load_dataset, load_split

    try:
        run, cfg = open_run(run_dir)
        if split is SplitName.val and cfg.data.protocol == "gr-compatible":
            fail("protocol gr-compatible has no validation targets; use --split test")
        if cfg.is_ranking:
            _eval_ranking(run, cfg, split.value, weights, device, as_json)
            return
        data = load_dataset(cfg)
        model = load_weights(run, cfg, data, weights)
        target_device = resolve_device(device)
        metrics = evaluate(
            model.to(target_device),
            data,
            load_split(cfg, data),
            split.value,
            max_seq_len=cfg.data.max_seq_len,
            ks=cfg.eval.ks,
            exclude=exclusion(cfg) if exclude_history is None else exclude_history.value,
            batch_size=eval_batch_size(cfg.eval, target_device.type),
            item_chunk=cfg.eval.item_chunk,
            device=target_device,
        )
    except (RunDirError, DataError, ExportError, ValueError) as err:
        fail(str(err))
    if as_json:
        print_json({"split": split.value, "weights": weights.value, **metrics})
    else:
        stdout().print(metrics_table(metrics, f"{split.value}, {weights.value} weights"))


def _eval_ranking(run, cfg, split: str, weights: Weights, device: str, as_json: bool) -> None:
    """Per-task NE, AUC and GAUC of a ranking run on its split's requests (docs/ranking.md)."""
    from flexgr.data import DataError
    from flexgr.export import ExportError
    from flexgr.ranking.evaluate import evaluate_ranking
    from flexgr.ranking.report import ranking_table
    from flexgr.ranking.setup import ranking_data
    from flexgr.train.config import eval_batch_size
    from flexgr.train.rundir import RunDirError
    from flexgr.train.runtime import resolve_device
    from flexgr.train.setup import load_dataset

    try:
        data = load_dataset(cfg)
        model = load_weights(run, cfg, data, weights)
        target = resolve_device(device)
        metrics = evaluate_ranking(
            model.to(target),
            ranking_data(cfg, data),
            split,  # type: ignore[arg-type]
            batch_size=eval_batch_size(cfg.eval, target.type),
            device=target,
        )
    except (RunDirError, DataError, ExportError, ValueError) as err:
        fail(str(err))
    if as_json:
        print_json({"split": split, "weights": weights.value, **metrics})
    else:
        stdout().print(ranking_table(metrics, f"{split}, {weights.value} weights"))
