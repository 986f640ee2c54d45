"""Architecture names -> (model class, config class), so configs and exported files can name one."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from flexgr.model.hstu import HSTU, HSTUConfig
from flexgr.model.sasrec import SASRec, SASRecConfig

ARCHS: dict[str, tuple[type[nn.Module], type]] = {
    "hstu": (HSTU, HSTUConfig),
    "sasrec": (SASRec, SASRecConfig),
}

# Set from the dataset and the data section, never by hand in [model].
DERIVED_FIELDS = ("num_items", "max_seq_len")


def config_class(arch: str) -> type:
    try:
        return ARCHS[arch][1]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}") from None


def arch_fields(arch: str) -> dict[str, dataclasses.Field]:
    """The [model] settings an architecture accepts (its config fields minus the derived ones)."""
    return {
        f.name: f for f in dataclasses.fields(config_class(arch)) if f.name not in DERIVED_FIELDS
    }


def build_model(arch: str, config: dict[str, Any]) -> nn.Module:
    """A fresh model of ``arch`` from a complete config dict (derived fields included)."""
    cfg_cls = config_class(arch)
    return ARCHS[arch][0](cfg_cls(**config))


def arch_of(model: nn.Module) -> str:
    for name, (model_cls, _) in ARCHS.items():
        if type(model) is model_cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered architecture")
