"""Context and data parallelism on 2 (and 4) gloo processes equal one process, to 1e-5 in fp32."""

from __future__ import annotations

import importlib.util

from tests.distributed import workers
from tests.distributed.launch import run_world


def test_cp_attention_reference_and_flex_match_single_process():
    """The reference CP path on every mask option, relative bias and a custom mask_mod; then the
    flex CP path (Q_LEN != KV_LEN, remapped masks and bias, table-gradient bridge), run through
    eager FlexAttention's CPU math path: output and dq, dk, dv, dpos_w, dts_w. One world of two
    processes for both (each start of the two imports torch, seconds on CI)."""
    run_world(workers.cp_attention_reference_then_flex, 2)


def test_hstu_model_cp2_and_dp2_match_single_process():
    """Two SGD steps of a 2-layer HSTU under cp = 2 with each backend, and under dp = 2, against
    one process (outputs, gathered outputs and every parameter gradient), all in one world of
    two processes: each start of the two imports torch, seconds on CI.

    triton runs in Triton's interpreter here: the CP path (queries at their global rows, keys
    back in global order, rows restricted by the block mask) against one process's kernel.
    ``triton-per-head`` attends (and gathers) one head per pass (kernel.cp_pass_mib = 0), as
    long sequences do. All of that is host-side, so the kernels take 64-row tiles (the GPU's dq
    and dk/dv tile; the kernel's own tiles are tested in tests/ops/test_triton.py). flex runs
    last: it lifts torch's check against flex's CPU backward for the rest of the process."""
    runs = {"cp2 reference": (1, 2, "reference")}
    if importlib.util.find_spec("triton") is not None:
        runs["cp2 triton"] = (1, 2, "triton", "cpu", 64.0, True)
        runs["cp2 triton-per-head"] = (1, 2, "triton", "cpu", 0.0, True)
    runs["dp2 reference"] = (2, 1)
    runs["cp2 flex"] = (1, 2, "flex")
    run_world(workers.model_parallel_runs, 2, runs)


def test_hstu_model_dp2_cp2_matches_combined_batch():
    run_world(workers.model_parallel, 4, 2, 2)


def test_bad_settings_fail_on_every_rank():
    run_world(workers.bad_settings, 2)
