"""Atomic checkpoints and the RNG state a bit-exact resume needs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexgr.atomic import atomic_write_bytes

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically. A failed write (a full disk) raises an OSError naming
    ``path``: a failed write names no file, and torch.save may report it as
    ``RuntimeError: ... unexpected pos`` with the OSError only in its context."""
    try:
        atomic_write_bytes(
            path, lambda handle: torch.save({"format": CHECKPOINT_FORMAT, **state}, handle)
        )
    except OSError as err:
        if err.filename is not None:
            raise
        raise type(err)(err.errno, err.strerror or str(err), str(path)) from err
    except RuntimeError as err:
        cause = err.__context__
        if isinstance(cause, OSError):
            raise type(cause)(cause.errno, cause.strerror or str(cause), str(path)) from err
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint holds tensors, numbers and strings; nothing that runs code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}"
        )
    return state


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Python, numpy, torch CPU and (if initialised) every CUDA device's generator state, plus
    ``device``'s own under "cuda_current": a run under torchrun restores rank 0's state onto each
    rank's own GPU (the ranks' generators advance alike)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": _python_state_to_tensor(random.getstate()),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
        if device is not None and device.type == "cuda":
            state["cuda_current"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    random.setstate(_python_state_from_tensor(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if device is not None and device.type == "cuda" and "cuda_current" in state:
        # Only this process's GPU: the saving process may have seen other devices.
        torch.cuda.set_rng_state(state["cuda_current"], device)
    elif "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_tensor(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {
        "version": version,
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss": gauss,
    }


def _python_state_from_tensor(state: dict[str, Any]) -> tuple:
    return (state["version"], tuple(int(x) for x in state["internal"].tolist()), state["gauss"])
