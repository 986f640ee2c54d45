"""Named mask rules a config can select (``model.mask = "name"``).

A rule is a factory ``(layout, options) -> mask_mod`` over global token indices of one packed
batch; ``options`` is the model config, so a rule can read its own settings from it (as
``semi_local`` reads ``sla_local``, ``sla_global`` and ``sla_mode``). Registered rules run on the
flex backend (CUDA) or the dense reference (CPU); the Triton kernel evaluates the built-in
``"hstu"`` rule and the library's ``"semi_local"`` inline (:func:`kernel_rule`).

    from flexgr.masks import register_mask, local_window

    @register_mask("window64")
    def window64(layout, options):
        return local_window(layout, 64)

    # then: flexgr train --set model.mask=window64
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flexgr.masks.layout import JaggedLayout
from flexgr.masks.mods import MaskMod, semi_local

BUILTIN_RULE = "hstu"
MaskFactory = Callable[[JaggedLayout, Any], MaskMod]
_RULES: dict[str, MaskFactory] = {}


def register_mask(name: str) -> Callable[[MaskFactory], MaskFactory]:
    """Decorator: make ``factory`` selectable as ``model.mask = name``."""
    if name == BUILTIN_RULE:
        raise ValueError(f"{BUILTIN_RULE!r} is the built-in HSTU rule and cannot be replaced")

    def add(factory: MaskFactory) -> MaskFactory:
        _RULES[name] = factory
        return factory

    return add


def mask_names() -> list[str]:
    return [BUILTIN_RULE, *sorted(_RULES)]


def kernel_rule(name: str) -> bool:
    """Whether the Triton kernel evaluates the named rule inline: the built-in rule, and
    ``"semi_local"`` while it is the library's own factory (not one a user registered over it)."""
    return name == BUILTIN_RULE or (name == "semi_local" and _RULES.get(name) is _semi_local)


def mask_rule(name: str) -> MaskFactory:
    try:
        return _RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown mask {name!r}; expected one of {', '.join(mask_names())} "
            "(register others with flexgr.masks.register_mask)"
        ) from None


@register_mask("semi_local")
def _semi_local(layout: JaggedLayout, options: Any) -> MaskMod:
    return semi_local(layout, options.sla_local, options.sla_global, mode=options.sla_mode)
