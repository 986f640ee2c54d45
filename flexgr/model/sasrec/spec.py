"""The SASRec entry of the model registry."""

from __future__ import annotations

from typing import Any

from flexgr.model.sasrec.inputs import prepare
from flexgr.model.sasrec.model import SASRec, SASRecConfig
from flexgr.model.spec import Capabilities, ModelSpec


def validate(options: dict[str, Any]) -> None:
    if options["num_heads"] < 1 or options["d_model"] % options["num_heads"]:
        raise ValueError("model.d_model must be divisible by model.num_heads for sasrec")


SPEC = ModelSpec(
    name="sasrec",
    model_cls=SASRec,
    config_cls=SASRecConfig,
    prepare=prepare,
    # Softmax attention: no context parallelism (it would need a log-sum-exp merge); its
    # attention dropout acts on a padded [B, H, N, N] tensor, not on token rows.
    capabilities=Capabilities(),
    validate=validate,
)
