"""Custom masks compile once per padded length, not once per batch.

On CUDA the block mask (``create_block_mask``) and flex_attention run compiled with
``dynamic=False``, which guards on every value the mask_mod captures: a Python int is guarded by
value and a tensor by shape. A mask whose closure held the batch's last token index as an int, or
tables one row per token, recompiled at every new batch length (about 1.6 s each, and past
dynamo's cache limit it fell back to eager flex): VISTA's ML-1M ranking run trained no logged
step in 7.5 minutes on an H200. Here the compile is counted on the CPU (dynamo's counting
backend, no C++ toolchain) over batches of different lengths that share one padded length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._dynamo.testing import CompileCounter
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from flexgr.batch import JaggedBatch
from flexgr.masks import block
from flexgr.model import HSTUConfig
from flexgr.model.hstu.inputs import _prepare
from flexgr.vista.mask import packed_offsets, seed_summary_mask
from flexgr.vista.summariser import SummariserConfig, _silu_attention
from tests.conftest import make_offsets

PADDED = 256  # every batch below pads to it (CPU: a multiple of the 128-token block)
LENGTHS = ([50, 70, 33], [51, 70, 33], [52, 69, 40])


def _new_frames(calls: list[Callable[[], object]], *counters: CompileCounter) -> list[int]:
    """Frames each counter's compiled function compiles over ``calls[1:]``, after the first
    call's compile (however many frames that takes)."""
    first: list[int] = []
    for i, call in enumerate(calls):
        call()
        if i == 0:
            first = [c.frame_count for c in counters]
            assert min(first) >= 1  # the counters see the compiles
    return [c.frame_count - f for c, f in zip(counters, first, strict=True)]


def _compiled(fn: Callable[..., object]) -> tuple[Callable[..., object], CompileCounter]:
    counter = CompileCounter()
    return torch.compile(fn, backend=counter, dynamic=False), counter


def _recompiles(masks: list[block.HSTUMask]) -> tuple[int, int]:
    """Frames compiled by create_block_mask and by flex_attention over ``masks[1:]``."""
    torch._dynamo.reset()  # compiled entries outlive a counter: start from none
    build, build_count = _compiled(create_block_mask)
    flex, flex_count = _compiled(flex_attention)

    def run(mask: block.HSTUMask) -> None:
        P = mask.block_mask.shape[-1]
        assert P == PADDED
        build(mask.mask_mod, 1, None, P, P, device="cpu", BLOCK_SIZE=block.BLOCK_SIZE)
        q = torch.randn(1, 1, P, 8)
        with torch.no_grad():
            flex(q, q, q, block_mask=mask.block_mask)

    build_new, flex_new = _new_frames([lambda m=m: run(m) for m in masks], build_count, flex_count)
    return build_new, flex_new


def _seed_masks(batches: tuple[list[int], ...]) -> list[block.HSTUMask]:
    # 3 users x (4 seeds + at most 80 events) = 252 tokens: every batch pads to PADDED.
    cfg = SummariserConfig(num_seeds=4, max_history_len=80, backend="flex")
    masks = []
    for lengths in batches:
        offsets = make_offsets(lengths)
        attention = _silu_attention(cfg, offsets, packed_offsets(offsets, cfg.num_seeds))
        masks.append(attention.mask)
    assert len({m.layout.total_len for m in masks}) == len(batches)  # the lengths differ
    return masks


def test_the_vista_seed_mask_compiles_once_per_padded_length() -> None:
    assert _recompiles(_seed_masks(LENGTHS)) == (0, 0)


def test_the_vista_seed_mask_pads_by_batch_size_not_by_total() -> None:
    # Totals of 30 and 222 tokens: 128 and 256 if padded by the total (two compiles on CUDA,
    # where ML-1M's batches spread over several buckets); one padded length from B and
    # max_history_len, so one compile.
    masks = _seed_masks(([3, 7, 8], [70, 70, 70], [80, 1, 80]))
    assert {m.padded_len for m in masks} == {PADDED}
    assert _recompiles(masks) == (0, 0)


def test_a_named_hstu_rule_compiles_once_per_padded_length() -> None:
    cfg = HSTUConfig(num_items=40, d_model=8, num_layers=1, num_heads=1, dqk=8, dv=8,
                     max_seq_len=128, mask="semi_local", sla_local=4, sla_global=3,
                     backend="flex")
    masks = []
    for lengths in LENGTHS:
        offsets = make_offsets([n + 4 for n in lengths])
        T = int(offsets[-1])
        batch = JaggedBatch(torch.ones(T, dtype=torch.long), offsets, None, None)
        masks.append(_prepare(cfg, batch).attention.mask)
    assert _recompiles(masks) == (0, 0)


def test_a_table_of_one_row_per_token_would_recompile() -> None:
    """The counter sees the failure this file guards against: the seed mask's tables sized to
    the batch's tokens instead of the padded length."""
    masks = []
    for lengths in LENGTHS:
        offsets = make_offsets(lengths)
        packed = packed_offsets(offsets, 4)
        total = int(packed[-1])
        masks.append(block.build_custom_mask(
            seed_summary_mask(offsets, 4), packed, total_len=total, padded_len=PADDED
        ))
    assert _recompiles(masks) == (len(LENGTHS) - 1, len(LENGTHS) - 1)


def _cp_recompiles(masks: list) -> int:
    """create_block_mask frames over the CP masks after the first (one rank's shard)."""
    torch._dynamo.reset()
    build, count = _compiled(create_block_mask)
    calls = [lambda cp=cp: build(cp.mask_mod, 1, None, cp.q_len, cp.kv_len, device="cpu",
                                 BLOCK_SIZE=block.BLOCK_SIZE) for cp in masks]
    return _new_frames(calls, count)[0]


def test_the_context_parallel_mask_compiles_once_per_padded_length() -> None:
    """Under context parallelism the global layout the rule reads is padded too (the built-in
    rule, and a named rule through the model's parallel prepare path)."""
    from flexgr.distributed.cp_mask import build_cp_mask
    from flexgr.distributed.sharding import shard_tokens
    from flexgr.model.hstu.inputs import batch_layout, custom_mask_mod

    cfg = HSTUConfig(num_items=40, d_model=8, num_layers=1, num_heads=1, dqk=8, dv=8,
                     max_seq_len=128, mask="semi_local", sla_local=4, sla_global=3)
    builtin, named = [], []
    for lengths in LENGTHS:
        offsets = make_offsets(lengths)
        T = int(offsets[-1])
        shard = shard_tokens(offsets, 2, 0, total_len=T)
        builtin.append(build_cp_mask(shard, max_attn_len=8, with_block_mask=False))
        batch = JaggedBatch(torch.ones(T, dtype=torch.long), offsets, None, None)
        layout = batch_layout(cfg, batch)
        named.append(build_cp_mask(shard, mask_mod=custom_mask_mod(cfg, layout), layout=layout,
                                   with_block_mask=False))
    assert len({(m.q_len, m.kv_len) for m in builtin + named}) == 1  # one shard bucket
    assert _cp_recompiles(builtin) == 0
    assert _cp_recompiles(named) == 0
