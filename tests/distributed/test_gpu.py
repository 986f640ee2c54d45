"""Context and data parallelism on 2 GPUs (NCCL, compiled flex). Skipped without 2 GPUs."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import workers
from tests.distributed.launch import run_world

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.mark.gpu
@needs_two_gpus
def test_gpu_cp_attention_flex_matches_single_gpu():
    run_world(workers.gpu_cp_flex, 2)


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("dp, cp", [(1, 2), (2, 1)])
def test_gpu_hstu_model_matches_single_gpu(dp, cp):
    run_world(workers.model_parallel, 2, dp, cp, "flex", "cuda")


@pytest.mark.gpu
@needs_two_gpus
def test_gpu_hstu_model_cp2_triton_matches_single_gpu():
    run_world(workers.model_parallel, 2, 1, 2, "triton", "cuda")
