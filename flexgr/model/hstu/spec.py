"""The HSTU entry of the model registry."""

from __future__ import annotations

from typing import Any

from flexgr.masks.registry import BUILTIN_RULE, mask_rule
from flexgr.model.hstu.inputs import backend_choice, prepare
from flexgr.model.hstu.model import HSTU, HSTUConfig
from flexgr.model.hstu.parallelize import prepare_sharded
from flexgr.model.spec import Capabilities, ModelSpec


def validate(options: dict[str, Any]) -> None:
    """Checks the field types cannot express; ValueError naming the model key."""
    if options["num_heads"] < 1:
        raise ValueError("model.num_heads must be >= 1")
    for key in ("contextual_len", "max_attn_len", "full_attn_tail", "sla_local", "sla_global"):
        if options[key] < 0:
            raise ValueError(f"model.{key} must be >= 0")
    if options["full_attn_tail"] and not options["max_attn_len"]:
        raise ValueError("model.full_attn_tail needs a local window (model.max_attn_len > 0)")
    if options["truncate_after"] < 0 or options["truncate_len"] < 0:
        raise ValueError("model.truncate_after and model.truncate_len must be >= 0")
    if (options["truncate_after"] > 0) != (options["truncate_len"] > 0):
        raise ValueError("attention truncation needs both model.truncate_after and truncate_len")
    if options["truncate_after"] >= max(options["num_layers"], 1) and options["truncate_len"]:
        raise ValueError("model.truncate_after must be below model.num_layers")
    if options["attention"] == "softmax" and options["backend"] == "triton":
        raise ValueError(
            "model.attention='softmax' cannot run on model.backend='triton' (the kernel is "
            "pointwise SiLU only); use model.backend='auto', 'flex' or 'reference'"
        )
    if not 0.0 <= options["drop_path"] < 1.0:
        raise ValueError("model.drop_path must be in [0, 1)")
    if options["mot_streams"] < 1:
        raise ValueError("model.mot_streams must be >= 1 (1: one stack, no mixture)")
    if options["mot_streams"] > 1 and options["truncate_after"]:
        raise ValueError("a mixture of transducers (model.mot_streams > 1) cannot truncate yet")
    if options["mask"] != BUILTIN_RULE:
        mask_rule(options["mask"])  # raises for an unknown name, listing the known ones


SPEC = ModelSpec(
    name="hstu",
    model_cls=HSTU,
    config_cls=HSTUConfig,
    prepare=prepare,
    # Pointwise attention: partial sums over key shards add, so sequences can be split; every
    # dropout acts on token rows, so masks can be drawn for the world batch.
    capabilities=Capabilities(context_parallel=True, row_wise_dropout=True, num_targets=True),
    prepare_sharded=prepare_sharded,
    validate=validate,
    backend=backend_choice,
)
