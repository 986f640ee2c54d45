"""Which attention backend a run uses: decided once, logged, and strict when asked.

``hstu_attention`` keeps its per-call safety nets for library users (a call never returns a
wrong result: flex without a CPU backward computes with the reference, the Triton kernel hands
custom masks to flex, each with a one-time warning). A training run does not rely on them: it
resolves the backend here before the first step, from what it knows then (device, the mask
rule, head dims, whether gradients are needed), writes the choice and its reason to
metrics.jsonl, and with ``train.strict_backend`` raises instead of running another backend than
the one configured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BACKENDS = ("auto", "reference", "flex", "triton")
TRITON_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class BackendChoice:
    requested: str
    backend: str
    reason: str = ""  # why ``backend`` differs from ``requested`` ("" when it does not)

    @property
    def downgraded(self) -> bool:
        return self.requested != "auto" and self.backend != self.requested


class BackendError(ValueError):
    """``strict`` was asked and the configured backend cannot run as configured."""


def triton_runs_on(device: torch.device) -> bool:
    from flexgr.ops import triton_backend

    return triton_backend.available(device)


def _cpu_flex_trains() -> bool:
    """Whether flex can backpropagate on CPU: asks the same check the per-call fallback uses
    (tests lift it to exercise flex gradients through eager flex's math path)."""
    from flexgr.ops import flex

    with torch.enable_grad():
        return not flex.cpu_needs_fallback(torch.zeros(1, requires_grad=True))


def choose_backend(
    requested: str,
    device: torch.device,
    *,
    builtin_mask: bool = True,
    head_dim: int = 0,
    training: bool = False,
    strict: bool = False,
) -> BackendChoice:
    """The backend that will run: ``requested``, or what it has to become (and why).
    ``builtin_mask``: the mask is one the Triton kernel evaluates inline (the built-in rule or
    semi-local attention, :func:`flexgr.masks.registry.kernel_rule`)."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    cuda = device.type == "cuda"
    fallback = "flex" if cuda else "reference"
    backend, reason = requested, ""
    if requested == "auto":
        backend = "triton" if cuda and triton_runs_on(device) else fallback
    if backend == "triton":
        if not triton_runs_on(device):
            backend, reason = fallback, f"the Triton kernels cannot run on {device}"
        elif not builtin_mask:
            reason = "the Triton kernel evaluates the built-in HSTU rule and semi_local only"
            backend = fallback
        elif head_dim > TRITON_MAX_HEAD_DIM:
            backend, reason = fallback, f"head dim {head_dim} > {TRITON_MAX_HEAD_DIM}"
    if backend == "flex" and not cuda and training and not _cpu_flex_trains():
        backend, reason = "reference", "FlexAttention has no backward on CPU"
    if requested == "auto" and backend != "triton" and not reason:
        reason = "auto: " + ("triton unavailable" if cuda else "the dense reference on CPU")
    choice = BackendChoice(requested, backend, reason)
    if strict and choice.downgraded:
        raise BackendError(
            f"model.backend={requested!r} cannot run here ({reason}); it would run "
            f"{backend!r} instead: set model.backend={backend!r} or train.strict_backend=false"
        )
    return choice
