"""VISTA's reconstruction loss: a small causal decoder over ``[summary; history]`` predicts each
history row's next item embedding, so the seeds are pushed to memorise the history.

    L_rec = weight * sum_b sum_{i < M_b} || v_i - u_{i+1} ||^2 / sum_b (M_b - 1)

u_i is the history embedding the summariser read, v_i the decoder's output at u_i. The decoder
is HSTU layers under the built-in causal rule over each user's packed segment (S summary rows,
then the history), so v_i sees the whole summary and u_1..u_i, never u_{i+1}. The sum is
averaged over predicted rows (not users) so the weight does not scale with history length; the
target is detached by default, since a trainable target lets the loss fall by shrinking the
item embeddings instead of by memorising (docs/vista.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flexgr.masks.layout import seq_ids_and_local
from flexgr.model.hstu.inputs import BiasWeights, HSTUInputs
from flexgr.model.hstu.model import HSTULayer
from flexgr.ops.attention import hstu_attention
from flexgr.vista.summariser import SummariserConfig, SummaryInputs


@dataclass
class ReconstructionConfig:
    num_layers: int = 1
    weight: float = 1.0
    detach_target: bool = True

    def validate(self) -> None:
        if self.num_layers <= 0:
            raise ValueError(f"vista.reconstruction.num_layers must be > 0, got {self.num_layers}")
        if self.weight < 0:
            raise ValueError(f"vista.reconstruction.weight must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class CausalAttention:
    """HSTU attention under the built-in causal rule over the packed segments."""

    offsets: Tensor  # [B + 1] of the packed segments
    backend: str

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, max_seq_len: int, alpha: float,
        bias: BiasWeights | None,
    ) -> Tensor:  # fmt: skip
        return hstu_attention(
            q, k, v, self.offsets, max_seq_len=max_seq_len, alpha=alpha, backend=self.backend,
            validate=False,
        )  # fmt: skip


class ReconstructionDecoder(nn.Module):
    def __init__(self, summariser: SummariserConfig, cfg: ReconstructionConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.d_model = summariser.d_model
        layer_cfg = summariser.layer_config()
        self.layers = nn.ModuleList(HSTULayer(layer_cfg) for _ in range(cfg.num_layers))

    def decode(self, summary_BSD: Tensor, history_TD: Tensor, inputs: SummaryInputs) -> Tensor:
        """v [T, d]: the decoder's output at every history row."""
        backend = "reference" if history_TD.device.type != "cuda" else "auto"
        attention = CausalAttention(inputs.packed_offsets, backend)
        layer_inputs = HSTUInputs(inputs.positions, attention)
        x = torch.cat([history_TD, summary_BSD.reshape(-1, self.d_model)])[inputs.order]
        for layer in self.layers:
            x = layer(x, layer_inputs)
        return x[inputs.history_rows]

    def forward(self, summary_BSD: Tensor, history_TD: Tensor, inputs: SummaryInputs) -> Tensor:
        """The weighted loss (a scalar; 0 with a graph when no history has two events)."""
        v_TD = self.decode(summary_BSD, history_TD, inputs)
        T = history_TD.shape[0]
        offsets = inputs.history_offsets
        seq, local = seq_ids_and_local(offsets, T)
        lengths = (offsets[1:] - offsets[:-1])[seq.long()]
        has_next = (local.long() < lengths - 1).nonzero().squeeze(1)
        target = history_TD[has_next + 1]
        if self.cfg.detach_target:
            target = target.detach()
        err = (v_TD[has_next] - target).square().sum()
        return self.cfg.weight * err / max(has_next.numel(), 1)
