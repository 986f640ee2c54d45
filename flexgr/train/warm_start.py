"""Warm start: a new run's weights, or one submodule's, from another run's exported model.

``train.init_from`` names an exported model (a finished run's directory, or PATH for
PATH.safetensors + PATH.json); ``train.init_module`` the submodule of this run's model that its
weights load into ("" for the whole model). GESR's ``towers`` are a two-tower ranker, so
``--set train.init_from=runs/two-tower --set train.init_module=towers`` starts GESR from a
trained two-tower run, as an early-stage ranker would start beside the deployed one (GESR's
paper adds the mixture of attention to an existing two-tower model).

Every tensor of the source must land: the same name and shape in the target, and the same item
vocabulary (an item's embedding row is its index in the dataset's item list, so weights from
another dataset or item pool would be silently misaligned). The source must also have held out
what this run holds out: the same task, dataset and protocol and, for ranking, the same request
rule. Otherwise its training data may contain this run's validation or test events (a
gr-compatible run trains on what loo-val validates on; requests of 4 events end where requests
of 8 would be validation), and early stopping and test would read a leak. The target's tensors
that the source lacks keep their initialisation (the experts, the gating). Everything is checked
before anything is copied, so a refused warm start changes nothing, and the source is built
under a forked RNG, so the run's own random draws are those of a cold start with its seed. A
resumed run ignores it: its checkpoint already holds every weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexgr.export.files import ExportError, load_model
from flexgr.train.config import ConfigError

# The ranking keys that decide which requests are validation and test (flexgr.ranking.requests).
RANKING_SPLIT_KEYS = ("requests", "request_size", "session_gap", "min_history")


def held_out_of(metadata: dict[str, Any]) -> dict[str, Any]:
    """What a run held out, from its export metadata (:func:`flexgr.export.export_model`) or a
    trainer's ``data_metadata()``, the same dict: a missing key reads as None."""
    rule = {"task": metadata.get("task", "retrieval")}
    rule.update(dataset=metadata.get("dataset"), protocol=metadata.get("protocol"))
    if rule["task"] == "ranking":
        ranking = metadata.get("ranking") or {}
        rule.update({key: ranking.get(key) for key in RANKING_SPLIT_KEYS})
    return rule


@dataclass(frozen=True)
class WarmStart:
    source: str  # resolved path
    weights_sha256: str | None
    arch: str  # the source model's
    module: str  # "" = the whole model
    loaded: int  # tensors copied
    kept: int  # the model's other tensors (left as initialised)

    def describe(self) -> str:
        into = f"into {self.module}" if self.module else "into the model"
        return (
            f"warm start: {self.loaded} tensors of a {self.arch} model from {self.source} "
            f"{into}, {self.kept} left as initialised"
        )


def warm_start(
    model: nn.Module, source: str, module: str, item_ids: list[str], held_out: dict[str, Any]
) -> WarmStart:
    """Copy the exported model at ``source`` into ``model`` (or its submodule ``module``); its
    item ids must equal ``item_ids`` and its run's held-out rule ``held_out``, this run's
    (:func:`held_out_of`). ConfigError names the key at fault."""
    try:
        with torch.random.fork_rng(devices=[]):  # building it draws initial weights
            exported, document = load_model(source)
    except ExportError as err:
        raise ConfigError(f"train.init_from: {err}") from None
    theirs = held_out_of(document.get("metadata") or {})
    for key, ours in held_out.items():
        if theirs.get(key) != ours:
            raise ConfigError(
                f"train.init_from: {source} was trained with {key} = {theirs.get(key)!r}, this "
                f"run has {ours!r}: its training data may hold this run's validation or test "
                "events (warm start only from a run of the same task, dataset, protocol and "
                "requests)"
            )
    if list(document["item_ids"]) != list(item_ids):
        raise ConfigError(
            f"train.init_from: {source} was trained on other items ({len(document['item_ids'])} "
            f"item ids, this run has {len(item_ids)}, or the same count in another order): "
            "its embeddings would not line up with this run's items"
        )
    try:
        target = model.get_submodule(module) if module else model
    except AttributeError:
        raise ConfigError(
            f"train.init_module: this run's model has no submodule {module!r}"
        ) from None
    wanted, have = exported.state_dict(), target.state_dict()
    where = f"{module}." if module else ""
    for name, tensor in wanted.items():
        if name not in have:
            raise ConfigError(
                f"train.init_from: {source}'s tensor {name!r} has no counterpart {where}{name} "
                f"in this run's model (a {document['arch']} model; is train.init_module right?)"
            )
        if have[name].shape != tensor.shape:
            raise ConfigError(
                f"train.init_from: {source}'s {name!r} is {tuple(tensor.shape)}, this run's "
                f"{where}{name} is {tuple(have[name].shape)} (the model sizes differ)"
            )
    with torch.no_grad():
        for name, tensor in wanted.items():
            have[name].copy_(tensor)
    kept = len(model.state_dict()) - len(wanted)
    resolved = str(Path(source).resolve())
    sha = document.get("weights_sha256")
    return WarmStart(resolved, sha, document["arch"], module, len(wanted), kept)
