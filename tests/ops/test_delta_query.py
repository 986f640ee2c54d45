"""The delta-query kernel (M-FALCON's candidate step on Triton) against the eager step.

On CPU in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there), small
shapes: cache lengths that are not tile multiples, candidate counts below and above one tile,
with and without the bias row; fp32 against the fp64 definition, and the ranking model's cached
logits with the kernel against the eager step. bf16 (within 2x the error of the definition in
bf16) runs on a GPU only: the interpreter's bf16 products are not the hardware's."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from tests.ranking.test_falcon import step_definition as _definition  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _inputs(M: int, L: int, H: int, D: int, DV: int, dtype: torch.dtype, seed: int):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(M, H, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    v = torch.randn(M, H, DV, generator=g).to(DEVICE, dtype)
    keys = torch.randn(H, D, L, generator=g).to(DEVICE, dtype)
    values = torch.randn(H, L, DV, generator=g).to(DEVICE, dtype)
    row = (torch.randn(L + 1, generator=g) * 0.5).to(DEVICE, dtype)
    return q, k, v, keys, values, row


@pytest.mark.parametrize(("M", "L", "bias"), [(1, 1, True), (5, 37, True), (19, 70, False),
                                              (40, 33, True)])
def test_fp32_equals_the_definition(M: int, L: int, bias: bool) -> None:
    from flexgr.ops.triton_hstu.delta import delta_query_attention

    q, k, v, keys, values, row = _inputs(M, L, 2, 16, 24, torch.float32, M + L)
    row = row if bias else None
    got = delta_query_attention(q, k, v, keys, values, row, alpha=0.6, max_seq_len=50)
    want = _definition(*(x.double() if x is not None else None
                         for x in (q, k, v, keys, values, row)), 0.6, 50)
    assert got.shape == (M, 2, 24) and not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("M", "L", "splits"), [(5, 37, 3), (19, 70, 2), (3, 1, 4), (2, 0, 1)])
def test_key_splits_sum_to_the_definition(M: int, L: int, splits: int) -> None:
    """Keys split over programs (partials summed outside the kernel): the same result, also
    when the rounding to whole key tiles leaves fewer splits than asked, and for an empty
    cache (only the candidates' own terms)."""
    from flexgr.ops.triton_hstu.delta import delta_query_attention

    q, k, v, keys, values, row = _inputs(M, L, 2, 16, 24, torch.float32, 3 * M + L)
    got = delta_query_attention(q, k, v, keys, values, row, alpha=0.6, max_seq_len=50,
                                key_splits=splits)
    want = _definition(*(x.double() for x in (q, k, v, keys, values, row)), 0.6, 50)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(INTERPRETED or DEVICE != "cuda", reason="bf16 products need a GPU")
def test_bf16_within_twice_the_bf16_definitions_error() -> None:
    from flexgr.ops.triton_hstu.delta import delta_query_attention

    for M, L in ((24, 90), (70, 3000)):  # the second one splits its keys (auto)
        q, k, v, keys, values, row = _inputs(M, L, 2, 16, 16, torch.bfloat16, 7)
        got = delta_query_attention(q, k, v, keys, values, row, alpha=0.5, max_seq_len=64)
        truth = _definition(*(x.double() for x in (q, k, v, keys, values, row)), 0.5, 64)
        in_bf16 = _definition(q, k, v, keys, values, row, 0.5, 64).double()
        assert got.dtype == torch.bfloat16
        assert (got.double() - truth).abs().max() <= 2 * (in_bf16 - truth).abs().max()


@pytest.mark.skipif(not INTERPRETED and DEVICE != "cuda", reason="no triton device")
def test_m_falcon_with_the_kernel_equals_the_eager_step() -> None:
    """kernel.delta_query: the ranking model's cached logits equal the eager step's (fp32)."""
    from flexgr.ops.kernel_options import kernel_options_set
    from flexgr.ranking.falcon import candidate_logits, encode_ranking_history
    from tests.ranking.test_falcon import _candidates, _history, _model

    for over in ({"layout": "interleaved"}, {"layout": "merged", "rel_bias": False}):
        model = _model(**over).to(DEVICE)
        items, actions, timestamps, query_time = _history(9, 2)
        history = (items.to(DEVICE), actions.to(DEVICE), timestamps.to(DEVICE))
        cache = encode_ranking_history(model, *history, query_time)
        candidates = _candidates(4, m=7).to(DEVICE)
        want = candidate_logits(model, cache, candidates, microbatch=3)
        with kernel_options_set(delta_query=True):
            got = candidate_logits(model, cache, candidates, microbatch=3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
