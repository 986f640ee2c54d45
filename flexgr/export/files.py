"""The exported model: ``NAME.safetensors`` (weights) beside ``NAME.json`` (everything else).

``NAME.json``::

    {
      "format": "flexgr.model", "format_version": 1, "flexgr_version": "0.1.0",
      "arch": "hstu",
      "config": {... every field of HSTUConfig / SASRecConfig, num_items and max_seq_len too},
      "item_ids": ["1193", "661", ...],   # raw id of item index i is item_ids[i - 1]
      "metadata": {... where the weights came from: dataset, protocol, epoch, metrics ...},
      "weights_sha256": "..."             # of NAME.safetensors, checked on load
    }

The two files are enough to rebuild the model; no dataset or run directory is needed. The
checksum ties the description to its weights: weights copied over from another export (even of
the same config) fail to load instead of loading silently. Descriptions written before the
checksum existed load unchecked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

import flexgr
from flexgr.model.registry import MODELS, build_model, spec_of

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
    """Write ``path.safetensors`` and ``path.json``; return both paths.

    Both files go to temp files first (fsynced), then are renamed into place, weights first: a
    failure before the renames leaves any earlier export untouched, and a crash between the two
    renames leaves weights that the old description's checksum rejects on load.
    """
    arch = spec_of(model).name
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
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"
    _write_pair([(weights_path, blob), (json_path, text.encode("utf-8"))])
    return weights_path, json_path


def _write_pair(files: list[tuple[Path, bytes]]) -> None:
    """A temp file (written and fsynced) for each, then each renamed into place, in order."""
    temps: list[Path] = []
    current = files[0][0]
    try:
        for current, data in files:
            current.parent.mkdir(parents=True, exist_ok=True)
            tmp = current.with_name(f".{current.name}.tmp-{os.getpid()}")
            temps.append(tmp)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, (current, _) in zip(temps, files, strict=True):
            os.replace(tmp, current)
    except OSError as err:
        raise _with_filename(err, current) from err
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _with_filename(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` (a full disk fails a write, and a failed write names no file)."""
    return type(err)(err.errno, err.strerror or str(err), str(path))


def read_model_json(path: str | Path) -> dict[str, Any]:
    weights_path, json_path = model_paths(path)
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(_missing_description(Path(path), weights_path, json_path)) from None
    except UnicodeDecodeError:
        raise ExportError(f"{json_path}: not UTF-8 text, not a flexgr model description") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{json_path}: not valid JSON ({err})") from None
    except OSError as err:
        raise ExportError(f"cannot read {json_path}: {err.strerror or err}") from None
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
    if document["arch"] not in MODELS:
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
    tensors, sha256 = _read_weights(weights_path, json_path)
    _check_weights(model, tensors, weights_path, json_path)
    # After the name and shape check, whose message is the more specific one.
    expected = document.get("weights_sha256")
    if expected is not None and sha256 != expected:
        raise ExportError(
            f"{weights_path} does not belong to {json_path}: its sha256 is {sha256[:12]}..., "
            f"the description records {str(expected)[:12]}...; the weights were replaced or "
            "come from another export (export the model again)"
        )
    model.load_state_dict(tensors, strict=True)
    if len(document["item_ids"]) != model.cfg.num_items:
        raise ExportError(
            f"{json_path}: {len(document['item_ids'])} item ids for {model.cfg.num_items} items"
        )
    return model.to(device).eval(), document


def _missing_description(path: Path, weights_path: Path, json_path: Path) -> str:
    if path.is_dir():
        return (
            f"{path} has no exported model (no model description {json_path.name}); a run "
            f"exports it when training ends; for a checkpoint use: flexgr export --run-dir {path} "
            "--weights last --out PATH"
        )
    if weights_path.is_file():
        return f"no model description {json_path} beside {weights_path}"
    return (
        f"no exported model at {json_path.with_suffix('')}: no model description "
        f"{json_path.name} and no {weights_path.name} (give PATH for PATH.safetensors + "
        "PATH.json, either file, or a run directory)"
    )


def _read_weights(weights_path: Path, json_path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of ``weights_path`` and the sha256 of the very bytes they were parsed from."""
    try:
        blob = weights_path.read_bytes()
    except FileNotFoundError:
        raise ExportError(f"no weights at {weights_path} (described by {json_path})") from None
    except OSError as err:
        raise ExportError(f"cannot read {weights_path}: {err.strerror or err}") from None
    try:
        tensors = load(blob)
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{weights_path}: not a readable safetensors file ({err})") from None
    return tensors, hashlib.sha256(blob).hexdigest()


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
