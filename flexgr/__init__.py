"""flexgr: HSTU generative recommenders on FlexAttention masks and a native Triton kernel."""

from flexgr.ops import RelativeBias, hstu_attention

__version__ = "0.1.0"

__all__ = ["RelativeBias", "__version__", "hstu_attention"]
