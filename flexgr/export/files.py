"""The exported model: ``NAME.safetensors`` (weights) beside ``NAME.json`` (everything else).

``NAME.json``::

    {
      "format": "flexgr.model", "format_version": 1, "flexgr_version": "0.1.0",
      "arch": "hstu",
      "config": {... every field of HSTUConfig / SASRecConfig, num_items and max_seq_len too},
      "item_ids": ["1193", "661", ...],   # raw id of item index i is item_ids[i - 1]
      "metadata": {... where the weights came from: dataset, protocol, epoch, metrics ...}
    }

The two files are enough to rebuild the model; no dataset or run directory is needed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

import flexgr
from flexgr.atomic import atomic_write_bytes, atomic_write_text
from flexgr.model.registry import ARCHS, arch_of, build_model

FORMAT = "flexgr.model"
FORMAT_VERSION = 1


class ExportError(ValueError):
    """An exported model that is missing, malformed, or whose weights do not fit its config."""


def model_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, json) for ``PATH``, ``PATH.safetensors`` or ``PATH.json``; a directory means
    ``DIR/model``."""
    path = Path(path)
    if path.is_dir():
        path = path / "model"
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def export_model(
    model: nn.Module,
    path: str | Path,
    *,
    item_ids: list[str],
    metadata: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``path.safetensors`` and ``path.json`` (each atomically); return both paths."""
    arch = arch_of(model)
    config = dataclasses.asdict(model.cfg)
    if len(item_ids) != config["num_items"]:
        raise ExportError(f"{len(item_ids)} item ids for a model of {config['num_items']} items")
    weights_path, json_path = model_paths(path)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    blob = save(tensors, metadata={"format": FORMAT, "arch": arch})
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "flexgr_version": flexgr.__version__,
        "arch": arch,
        "config": config,
        "item_ids": list(item_ids),
        "metadata": metadata or {},
    }
    atomic_write_bytes(weights_path, lambda handle: handle.write(blob))
    text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"
    atomic_write_text(json_path, text)
    return weights_path, json_path


def read_model_json(path: str | Path) -> dict[str, Any]:
    _, json_path = model_paths(path)
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"no model description at {json_path}") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{json_path}: not valid JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ExportError(f"{json_path}: not a flexgr model description")
    if document.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{json_path}: format version {document.get('format_version')!r}, "
            f"this flexgr reads {FORMAT_VERSION}"
        )
    for key in ("arch", "config", "item_ids"):
        if key not in document:
            raise ExportError(f"{json_path}: missing {key!r}")
    if document["arch"] not in ARCHS:
        raise ExportError(f"{json_path}: unknown arch {document['arch']!r}")
    return document


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the exported model (eval mode) and return it with its JSON description."""
    weights_path, json_path = model_paths(path)
    document = read_model_json(path)
    try:
        model = build_model(document["arch"], document["config"])
    except (TypeError, ValueError) as err:
        raise ExportError(
            f"{json_path}: config does not build a {document['arch']} model: {err}"
        ) from None
    try:
        tensors = load_file(weights_path)
    except FileNotFoundError:
        raise ExportError(f"no weights at {weights_path}") from None
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{weights_path}: not a readable safetensors file ({err})") from None
    _check_weights(model, tensors, weights_path, json_path)
    model.load_state_dict(tensors, strict=True)
    if len(document["item_ids"]) != model.cfg.num_items:
        raise ExportError(
            f"{json_path}: {len(document['item_ids'])} item ids for {model.cfg.num_items} items"
        )
    return model.to(device).eval(), document


def _check_weights(
    model: nn.Module, tensors: dict[str, torch.Tensor], weights_path: Path, json_path: Path
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [
        f"{name} {tuple(tensors[name].shape)} != {tuple(t.shape)}"
        for name, t in expected.items()
        if name in tensors and tensors[name].shape != t.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if unexpected:
        problems.append(
            f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else "")
        )
    if wrong_shape:
        problems.append(
            f"shape {'; '.join(wrong_shape[:3])}" + (" ..." if len(wrong_shape) > 3 else "")
        )
    if problems:
        raise ExportError(
            f"{weights_path.name} does not match the config in {json_path.name}: {'; '.join(problems)}"
        )
