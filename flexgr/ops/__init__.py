"""Attention operators."""

from flexgr.ops.attention import BACKENDS, default_backend, hstu_attention, validate_inputs
from flexgr.ops.jagged import to_jagged, to_padded
from flexgr.ops.rab import RelativeBias, dense_bias, next_timestamps, time_bucket
from flexgr.ops.reference import hstu_attention_reference

__all__ = [
    "BACKENDS",
    "RelativeBias",
    "default_backend",
    "dense_bias",
    "hstu_attention",
    "hstu_attention_reference",
    "next_timestamps",
    "time_bucket",
    "to_jagged",
    "to_padded",
    "validate_inputs",
]
