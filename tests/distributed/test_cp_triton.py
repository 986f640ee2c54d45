"""Context-parallel attention through the Triton kernel, one rank at a time, without processes.

Each rank's local queries attend the gathered key/value slots (built here from the global
tensors, as the all-gather would); output and gradients of the global q, k, v and both bias
tables must equal the single-device reference restricted to that rank's queries. Without CUDA the
kernels run in Triton's interpreter on tiny shapes, fp32 against fp64, on 64-row tiles
(``coarse_tiles``: what is checked here is the host side, the view and the restricted rows; the
kernel's own tiles are tested in tests/ops/test_triton.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from flexgr.distributed import attend_gathered, build_cp_mask, cp_attention, shard_tokens  # noqa: E402
from flexgr.masks import build_layout  # noqa: E402
from flexgr.ops import triton_backend  # noqa: E402
from flexgr.ops.attention import hstu_attention  # noqa: E402
from flexgr.ops.rab import RelativeBias  # noqa: E402
from tests.conftest import make_offsets  # noqa: E402
from tests.ops.tiles import coarse_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_backend.available(torch.device(DEVICE)), reason="triton kernels cannot run here"
)

# Lengths cross the 128-token blocks and include a length-1 sequence; options as in the kernel's
# own tests.
CASES = {
    "causal": (dict(), (1, 37, 150, 9)),
    "targets": (dict(num_targets=(0, 5, 20, 3)), (1, 37, 150, 9)),
    "window_tail": (dict(max_attn_len=16, full_attn_tail=5), (1, 37, 150, 9)),
    "all": (
        dict(num_targets=(1, 5, 20, 2), contextual_len=2, max_attn_len=16, full_attn_tail=5),
        (4, 37, 150, 9),
    ),
}


def _kwargs(opts: dict) -> dict:
    kw = dict(opts)
    if "num_targets" in kw:
        kw["num_targets"] = torch.tensor(kw["num_targets"], device=DEVICE)
    return kw


def _leaves(T: int, seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, D = 2, 16
    base = [torch.randn(T, H, D, generator=g) for _ in range(3)]
    base += [torch.randn(2 * 160 - 1, generator=g), torch.randn(33, generator=g)]
    return [x.to(DEVICE, dtype).requires_grad_() for x in base]


# Every option set with C = 2: the bias off and on for causal and for all (which holds the
# targets' and window_tail's options too), targets without it, window_tail with it; C = 3 (a
# middle rank, uneven chunks) on two of them, to keep the interpreter's time in CI down.
COMBOS = [(name, 2, rab) for name in ("all", "causal") for rab in (False, True)]
COMBOS += [("targets", 2, False), ("window_tail", 2, True)]
COMBOS += [("all", 3, True), ("targets", 3, False)]


def gathered(x_T: torch.Tensor, shard) -> torch.Tensor:
    """What the all-gather hands this rank: every slot's token, zeros in padding slots."""
    slots = shard.slot_index
    return torch.where((slots >= 0)[:, None, None], x_T[slots.clamp(min=0)], 0.0)


@pytest.mark.parametrize("name, cp_size, with_rab", COMBOS)
def test_cp_triton_matches_reference(name, cp_size, with_rab):
    opts, lengths = CASES[name]
    offsets = make_offsets(list(lengths), DEVICE)
    T = int(offsets[-1])
    kw = _kwargs(opts)
    g = torch.Generator().manual_seed(7)
    ts = torch.cumsum(torch.randint(0, 5000, (T,), generator=g), 0).to(DEVICE)
    grad_out = torch.randn(T, 2, 16, generator=g).to(DEVICE)
    layout = build_layout(offsets, num_targets=kw.get("num_targets"),
                          contextual_len=kw.get("contextual_len", 0))
    positions = layout.pos_id.long()
    N, alpha = 200, 0.3

    def bias(leaves: list[torch.Tensor]) -> RelativeBias | None:
        if not with_rab:
            return None
        return RelativeBias.from_timestamps(leaves[3], leaves[4], ts, offsets, positions=positions)

    for rank in range(cp_size):
        shard = shard_tokens(offsets, cp_size, rank)
        rows = shard.local_index
        ref = _leaves(T, 1, torch.float64)
        out_ref = hstu_attention(*ref[:3], offsets, max_seq_len=N, alpha=alpha, rab=bias(ref),
                                 backend="reference", **kw)[rows]
        grads_ref = torch.autograd.grad(out_ref, ref, grad_out[rows].double(), allow_unused=True)

        got = _leaves(T, 1, torch.float32)
        mask = build_cp_mask(shard, **kw)
        k_all, v_all = gathered(got[1], shard), gathered(got[2], shard)
        with coarse_tiles():
            out = attend_gathered(got[0][rows], k_all, v_all, mask, max_seq_len=N, alpha=alpha,
                                  rab=bias(got), backend="triton")
            grads = torch.autograd.grad(out, got, grad_out[rows], allow_unused=True)

        assert not out.isnan().any()
        scale = out_ref.abs().max().item()
        assert (out.double() - out_ref).abs().max().item() <= 1e-5 * scale + 1e-7, (name, rank)
        for i, (a, b) in enumerate(zip(grads, grads_ref)):
            if b is None:  # bias tables without a bias
                assert a is None or not a.any()
                continue
            assert a is not None and not a.isnan().any()
            err = (a.double() - b).abs().max().item()
            assert err <= 1e-5 * b.abs().max().item() + 1e-7, (name, rank, i, err)


@pytest.mark.parametrize("prebuilt", [True, False])
def test_custom_mask_falls_back_to_flex(prebuilt):
    # The kernel evaluates the built-in rule only; a custom mask_mod must not reach it. Masks
    # built for triton have no flex BlockMask yet: the fallback builds it.
    from flexgr.masks import causal, jagged
    from flexgr.masks.mods import and_masks

    offsets = make_offsets([5, 9], DEVICE)
    shard = shard_tokens(offsets, 2, 0)
    mod = and_masks(jagged(offsets), causal())
    mask = build_cp_mask(shard, mask_mod=mod, with_block_mask=prebuilt)
    cp_attention._warn_once.cache_clear()  # the warning is once per process
    leaves = _leaves(14, 3, torch.float32)
    k_all, v_all = gathered(leaves[1], shard).detach(), gathered(leaves[2], shard).detach()
    q = leaves[0][shard.local_index].detach()
    with pytest.warns(UserWarning, match="custom mask_mod"):
        out = attend_gathered(q, k_all, v_all, mask, max_seq_len=16, alpha=1.0, backend="triton")
    ref = hstu_attention(leaves[0].detach(), leaves[1].detach(), leaves[2].detach(), offsets,
                         max_seq_len=16, alpha=1.0, backend="reference")[shard.local_index]
    assert torch.allclose(out, ref, atol=1e-5)


def test_flex_block_mask_built_later_equals_built_with_the_mask():
    from flexgr.distributed.cp_mask import flex_block_mask

    offsets = make_offsets([1, 37, 150, 9], DEVICE)
    kw = _kwargs(CASES["all"][0])
    for rank in range(2):
        shard = shard_tokens(offsets, 2, rank)
        eager = build_cp_mask(shard, **kw).block_mask
        lazy_mask = build_cp_mask(shard, **kw, with_block_mask=False)
        assert eager is not None and lazy_mask.block_mask is None
        lazy = flex_block_mask(lazy_mask)
        assert flex_block_mask(lazy_mask) is lazy  # built once per mask
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            a, b = getattr(eager, name), getattr(lazy, name)
            assert torch.equal(a, b), name


@pytest.mark.parametrize("name", list(CASES))
def test_global_view_blocks_equal_a_full_evaluation(name):
    """The view's block mask skips query blocks without local rows (and, without contextual rows,
    key blocks past the diagonal); it must equal evaluating every block pair."""
    from flexgr.distributed.cp_triton import _global_view
    from flexgr.masks.block import BLOCK_SIZE
    from flexgr.masks.sparse import jagged_block_mask

    opts, lengths = CASES[name]
    offsets = make_offsets([4 * n for n in lengths], DEVICE)  # several blocks per sequence
    for cp_size in (2, 3):
        for rank in range(cp_size):
            mask = build_cp_mask(shard_tokens(offsets, cp_size, rank), **_kwargs(opts),
                                 with_block_mask=False)
            view = _global_view(mask)
            full = jagged_block_mask(view.mask.mask_mod, view.mask.layout.seq_id, BLOCK_SIZE)
            got = view.mask.block_mask
            for attr in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
                a, b = getattr(got, attr), getattr(full, attr)
                assert torch.equal(a, b), (name, cp_size, rank, attr)
