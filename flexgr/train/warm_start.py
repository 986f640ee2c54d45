"""Warm start: a new run's weights, or one submodule's, from another run's exported model.

``train.init_from`` names an exported model (a finished run's directory, or PATH for
PATH.safetensors + PATH.json); ``train.init_module`` the submodule of this run's model that its
weights load into ("" for the whole model). GESR's ``towers`` are a two-tower ranker, so
``--set train.init_from=runs/two-tower --set train.init_module=towers`` starts GESR from a
trained two-tower run, as an early-stage ranker would start beside the deployed one (GESR's
paper adds the mixture of attention to an existing two-tower model).

Every tensor of the source must land: the same name and shape in the target, and the same item
vocabulary (an item's embedding row is its index in the dataset's item list, so weights from
another dataset or item pool would be silently misaligned). The target's tensors that the
source lacks keep their initialisation (the experts, the gating). Checked before anything is
copied, so a refused warm start changes nothing. A resumed run ignores it: its checkpoint
already holds every weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flexgr.export.files import ExportError, load_model
from flexgr.train.config import ConfigError


@dataclass(frozen=True)
class WarmStart:
    source: str
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


def warm_start(model: nn.Module, source: str, module: str, item_ids: list[str]) -> WarmStart:
    """Copy the exported model at ``source`` into ``model`` (or its submodule ``module``); its
    item ids must equal ``item_ids``, this run's. ConfigError names the key at fault."""
    try:
        exported, document = load_model(source)
    except ExportError as err:
        raise ConfigError(f"train.init_from: {err}") from None
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
    return WarmStart(source, document["arch"], module, len(wanted), kept)
