from __future__ import annotations

import pytest
import torch

import torch.nn.attention.flex_attention as flex_module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_offsets(lengths: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    lens = torch.tensor(lengths, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(device)


@pytest.fixture
def cpu_flex_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let eager FlexAttention run its (dense, math) backward on CPU.

    torch refuses CPU backward in flex_attention's argument checks only; the eager math path
    itself is differentiable. Tests use this to check our score_mod transform's gradients in CI.
    """
    monkeypatch.setattr(flex_module, "_validate_device", lambda *a, **k: None)
