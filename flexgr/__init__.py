"""flexgr: HSTU generative recommenders on FlexAttention masks and a native Triton kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexgr.ops import RelativeBias, hstu_attention

if TYPE_CHECKING:
    import torch

    from flexgr.export import Recommender

__version__ = "0.1.0"


def load(path: str, device: str | torch.device = "cpu") -> Recommender:
    """Load an exported model as a :class:`flexgr.export.Recommender`.

    ``path`` is ``PATH`` (for ``PATH.safetensors`` + ``PATH.json``), either of those files, or a
    run directory. Raises :class:`flexgr.export.ExportError` when the files are missing or do
    not match each other.
    """
    # Imported here so that `import flexgr` stays light (no data or training stack).
    from flexgr.export import load as load_exported

    return load_exported(path, device)


__all__ = ["RelativeBias", "__version__", "hstu_attention", "load"]
