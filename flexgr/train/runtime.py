"""Device, precision, seeding and determinism switches of a training process."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

# cuBLAS needs a fixed workspace to give reproducible results (see torch's reproducibility notes).
_CUBLAS_WORKSPACE = ":4096:8"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device = {name!r}, but CUDA is not available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32 (``tf32``: fp32 tensors, see :func:`set_tf32`)."""
    if precision in ("fp32", "tf32") or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            "bf16 autocast needs a GPU with bfloat16 support; use train.precision=fp32"
        )
    return torch.bfloat16


def set_tf32(precision: str) -> None:
    """TF32 tensor-core matmuls for fp32 tensors under ``tf32``, full fp32 otherwise. Set per
    run because the flags are process-wide and an earlier run in the process may have set them."""
    enabled = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels everywhere torch has them.

    Slower: cuDNN autotuning is off and some CUDA ops switch to deterministic (often serialised)
    implementations. ``warn_only`` because a few kernels (e.g. Triton ones) have no deterministic
    variant; torch then warns instead of stopping the run.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False  # autotuning may pick different kernels per run


def worker_count(configured: int, device: torch.device) -> int:
    if configured >= 0:
        return configured
    # Batches are built in vectorised numpy in well under a millisecond, so the main process
    # keeps a GPU fed. Worker processes are opt-in: on the H100 test machine, HSTU runs with 2
    # forked workers (Triton kernels and compiled block masks in the parent) stalled for good
    # after ~15 steps, parent and workers all waiting on their queues.
    del device
    return 0
