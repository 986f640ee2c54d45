"""Context and data parallelism on 2 (and 4) gloo processes equal one process, to 1e-5 in fp32."""

from __future__ import annotations

import pytest

from tests.distributed import workers
from tests.distributed.launch import run_world


def test_cp_attention_reference_matches_single_process():
    """Every mask option, relative bias, a custom mask_mod; output and dq, dk, dv, dpos_w, dts_w."""
    run_world(workers.cp_attention_reference, 2)


def test_cp_attention_flex_matches_single_process():
    """The flex CP path (Q_LEN != KV_LEN, remapped masks and bias, table-gradient bridge), run
    through eager FlexAttention's CPU math path."""
    run_world(workers.cp_attention_flex, 2)


@pytest.mark.parametrize("backend", ["reference", "flex", "triton", "triton-per-head"])
def test_hstu_model_cp2_matches_single_process(backend):
    """triton runs in Triton's interpreter here: the CP path (queries at their global rows, keys
    back in global order, rows restricted by the block mask) against one process's kernel.
    ``triton-per-head`` attends (and gathers) one head per pass, as long sequences do. All of
    that is host-side, so the kernels take 64-row tiles (the GPU's dq and dk/dv tile; the
    kernel's own tiles are tested in tests/ops/test_triton.py)."""
    if backend.startswith("triton"):
        pytest.importorskip("triton")
    pass_mib = 64.0
    if backend == "triton-per-head":
        backend, pass_mib = "triton", 0.0  # kernel.cp_pass_mib = 0: one head per pass
    coarse = backend == "triton"
    run_world(workers.model_parallel, 2, 1, 2, backend, "cpu", pass_mib, coarse)


def test_hstu_model_dp2_matches_combined_batch():
    run_world(workers.model_parallel, 2, 2, 1)


def test_hstu_model_dp2_cp2_matches_combined_batch():
    run_world(workers.model_parallel, 4, 2, 2)


def test_bad_settings_fail_on_every_rank():
    run_world(workers.bad_settings, 2)
