"""Architecture names -> :class:`~flexgr.model.spec.ModelSpec`, so configs and exported files
can name a model and every caller can ask its spec instead of testing its class."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from flexgr.model.hstu.spec import SPEC as HSTU_SPEC
from flexgr.model.sasrec.spec import SPEC as SASREC_SPEC
from flexgr.model.spec import ModelSpec

MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` available as ``model.arch = spec.name`` (and to exported files)."""
    MODELS[spec.name] = spec
    return spec


register_model(HSTU_SPEC)
register_model(SASREC_SPEC)


def get_spec(arch: str) -> ModelSpec:
    try:
        return MODELS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(MODELS)}") from None


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec of a model instance (exact class match, so a subclass must register itself)."""
    for spec in MODELS.values():
        if type(model) is spec.model_cls:
            return spec
    raise ValueError(f"{type(model).__name__} is not a registered flexgr model")


def arch_fields(arch: str) -> dict[str, dataclasses.Field]:
    """The [model] settings an architecture accepts (its config fields minus the derived ones)."""
    return get_spec(arch).fields()


def build_model(arch: str, config: dict[str, Any]) -> nn.Module:
    """A fresh model of ``arch`` from a complete config dict (derived fields included)."""
    return get_spec(arch).build(config)


# Last: the ranking, GESR and VISTA packages register their models themselves (they import
# register_model from here).
import flexgr.gesr.spec
import flexgr.ranking.spec
import flexgr.vista.spec  # noqa: F401
