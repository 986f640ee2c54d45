"""``flexgr vista``: VISTA's summary cache (docs/vista.md#summary-cache)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from flexgr.cli.common import fail, print_json
from flexgr.cli.runs import WEIGHTS_HELP, Weights, load_weights, open_run

app = typer.Typer(
    help="VISTA: export a vista-ranking run's user summaries to a summary store, and score "
    "from the store (docs/vista.md).",
    no_args_is_help=True,
    add_completion=False,
)


class SplitName(str, Enum):
    val = "val"
    test = "test"


@app.command("export-summaries")
def export_summaries_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="A vista-ranking run.")],
    out: Annotated[Path, typer.Option("--out", help="The summary store (a directory).")],
    split: Annotated[
        SplitName, typer.Option("--split", help="Whose histories: each user's val or test request.")
    ] = SplitName.test,
    bits: Annotated[int, typer.Option("--bits", help="8 (int8) or 4 (int4, two per byte).")] = 8,
    weights: Annotated[Weights, typer.Option("--weights", help=WEIGHTS_HELP)] = Weights.model,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or auto.")] = "auto",
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Then score the split from the store and from the histories and print the "
            "largest prediction difference and both metrics.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Summarise every user's history (as of the split's request) with the run's stage 1 and
    store it row-wise quantised under (user id, newest event's timestamp)."""
    from flexgr.data import DataError
    from flexgr.export import ExportError
    from flexgr.ranking.setup import ranking_data
    from flexgr.train.config import eval_batch_size
    from flexgr.train.rundir import RunDirError
    from flexgr.train.runtime import resolve_device
    from flexgr.train.setup import load_dataset
    from flexgr.vista.cache import DirectorySummaryStore, compare_cached, export_summaries
    from flexgr.vista.model import VistaRanker

    if bits not in (8, 4):
        fail(f"--bits must be 8 or 4, got {bits}")
    try:
        run, cfg = open_run(run_dir)
        if cfg.model.arch != "vista-ranking":
            fail(f"{run_dir} is a {cfg.model.arch} run; summaries come from vista-ranking runs")
        data = load_dataset(cfg)
        model = load_weights(run, cfg, data, weights)
        assert isinstance(model, VistaRanker)
        target = resolve_device(device)
        model = model.to(target)
        examples = ranking_data(cfg, data)
        store = DirectorySummaryStore(out)
        size = eval_batch_size(cfg.eval, target.type)
        report = export_summaries(
            model, examples, store, which=split.value, bits=bits, batch_size=size, device=target
        )
        result: dict = {
            "store": str(out), "split": split.value, "bits": bits,
            "summaries": report.summaries, "skipped_empty_histories": report.skipped_empty,
            "bytes": report.bytes, "seconds": round(report.seconds, 3),
        }  # fmt: skip
        if verify:
            result["verify"] = compare_cached(
                model, examples, store, which=split.value, batch_size=size, device=target
            )
    except (RunDirError, DataError, ExportError, ValueError, KeyError) as err:
        fail(str(err).strip("'\""))
    except OSError as err:
        fail(f"cannot write {err.filename or out}: {err.strerror or err}")
    if as_json:
        print_json(result)
        return
    typer.echo(
        f"wrote {report.summaries} summaries ({bits}-bit, {report.bytes:,} bytes) to {out} "
        f"in {report.seconds:.1f} s"
    )
    if verify:
        check = result["verify"]
        typer.echo(
            f"largest prediction difference, store vs recomputed: {check['max_abs_diff']:.2e}"
        )
        for key in sorted(check["cached"]):
            typer.echo(f"  {key}: cached {check['cached'][key]:.4f}  recomputed "
                       f"{check['recomputed'][key]:.4f}")  # fmt: skip
