"""``flexgr flops``: analytic FLOPs of a config's HSTU stack on given sequence lengths."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from flexgr.cli.common import fail, print_json, stdout
from rich.table import Table

from flexgr.train.config import ConfigError, apply_overrides, load_config, load_preset

DEFAULT_PRESET = "ml-1m-hstu"


def flops_command(
    config_file: Annotated[Path | None, typer.Argument(help="A TOML config file.")] = None,
    preset: Annotated[str | None, typer.Option("--preset", "-p", help="A preset name.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="section.key=value (repeatable).")
    ] = None,
    events: Annotated[
        int, typer.Option("--events", help="Events per user (0: data.max_seq_len).")
    ] = 0,
    batch: Annotated[int, typer.Option("--batch", help="Users, each of --events events.")] = 1,
    candidates: Annotated[
        int, typer.Option("--candidates", help="Target tokens per user (target-aware mask).")
    ] = 0,
    layout: Annotated[
        str, typer.Option("--layout", help="merged (1 token per event) or interleaved (2).")
    ] = "merged",
    training: Annotated[
        bool, typer.Option("--training", help="Forward + backward (3x, plus what train.recompute reruns).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Per-layer FLOPs (projections, attention over the mask's allowed pairs, output) of the
    model a config would train, for ``--batch`` users of ``--events`` events
    (docs/long-sequences.md#flop-accounting)."""
    from flexgr.flops import layout_tokens, model_flops
    from flexgr.model.registry import get_spec

    try:
        cfg = load_config(config_file) if config_file else load_preset(preset or DEFAULT_PRESET)
        cfg = apply_overrides(cfg, list(overrides or []))
    except ConfigError as err:
        fail(str(err))
    if cfg.model.arch != "hstu":
        fail(f"flexgr flops counts HSTU stacks; model.arch is {cfg.model.arch!r}")
    if layout not in ("merged", "interleaved"):
        fail(f"--layout must be merged or interleaved, got {layout!r}")
    if events < 0 or batch < 1 or candidates < 0:
        fail("--events and --candidates must be >= 0 and --batch >= 1")
    model_cfg = get_spec("hstu").config_cls(
        **cfg.model_options(), num_items=1, max_seq_len=cfg.data.max_seq_len
    )
    per_user = events or cfg.data.max_seq_len
    tokens, targets = layout_tokens(per_user, layout, candidates)  # type: ignore[arg-type]
    counted = model_flops(
        model_cfg,
        [tokens] * batch,
        [targets] * batch,
        training=training,
        recompute=cfg.train.recompute,
    )
    rows = [
        {
            "layer": i,
            "tokens": layer.tokens,
            "pairs": layer.pairs,
            "uvqk": layer.uvqk,
            "attention": layer.attention,
            "output": layer.output,
        }
        for i, layer in enumerate(counted.layers)
    ]
    summary = {
        "tokens_per_user": tokens,
        "forward": counted.forward,
        "passes": counted.passes,
        "recomputed": counted.recomputed,
        "total": counted.total,
        "attention_share": counted.share("attention"),
    }
    if as_json:
        print_json({"layers": rows, **summary})
        return
    table = Table(title=f"forward FLOPs per layer, {batch} x {tokens} tokens ({layout})")
    for column in ("layer", "tokens", "pairs", "uvqk", "attention", "output"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{row[k]:,}" if k in ("layer", "tokens", "pairs") else
                        f"{row[k]:.3e}" for k in row))
    console = stdout()
    console.print(table)
    console.print(
        f"forward {counted.forward:.4e} FLOPs, x{counted.passes:g} = {counted.total:.4e} "
        f"({'training' if training else 'inference'}); attention "
        f"{100 * summary['attention_share']:.1f}% of the forward",
        highlight=False,
    )
