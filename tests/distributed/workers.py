"""Bodies of the multi-process tests. Each rank also computes the single-process result itself, so
the comparison needs no extra communication."""

from __future__ import annotations

import os

import torch
import torch.nn.attention.flex_attention as flex_module
from torch import Tensor

from flexgr.distributed import (
    ParallelConfig,
    ParallelConfigError,
    build_cp_mask,
    context_parallel_attention,
    cp_attention,
    cp_flex,
    cp_hstu_attention,
    gather_outputs,
    init_parallel,
    parallelize,
    shard_tokens,
    unwrap,
)
from flexgr.masks import and_masks, build_custom_mask, jagged, semi_local
from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, encode
from flexgr.model.spec import shard_inputs
from flexgr.ops import flex as ops_flex
from flexgr.ops.kernel_options import KernelOptions, set_kernel_options
from flexgr.ops import hstu_attention
from tests.conftest import make_offsets
from tests.ops.helpers import random_problem

TOL = 1e-5

ATTENTION_CASES = [
    dict(lengths=[37, 1, 64, 9, 3, 2]),
    dict(lengths=[50, 3, 21], targets=True),
    dict(lengths=[40, 6, 19], contextual_len=2),
    dict(lengths=[45, 2, 30], max_attn_len=5),
    dict(lengths=[45, 4, 30], max_attn_len=5, full_attn_tail=3),
    dict(lengths=[33, 1, 60], use_rab=True),
    dict(lengths=[60, 5, 2, 17], targets=True, use_rab=True),
    dict(
        lengths=[41, 3, 28],
        contextual_len=2,
        targets=True,
        max_attn_len=4,
        full_attn_tail=2,
        use_rab=True,
    ),
]


def rel_err(a: Tensor, b: Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN"
    a, b = a.detach().double(), b.detach().double()
    assert b.norm() > 0, "a zero reference proves nothing"
    return float((a - b).norm() / b.norm())


def check(name: str, got: Tensor, want: Tensor, tol: float = TOL) -> None:
    err = rel_err(got, want)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


def _attention_case(
    ctx, spec: dict, seed: int, backend: str, oracle: str = "reference", device: str = "cpu"
) -> None:
    p = random_problem(dtype=torch.float32, requires_grad=True, seed=seed, device=device, **spec)
    ref = hstu_attention(p.q, p.k, p.v, p.offsets, backend=oracle, **p.kwargs())
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    grads_ref = torch.autograd.grad(ref, p.leaves(), g)

    shard = shard_tokens(p.offsets, ctx.cp_size, ctx.cp_rank)
    q, k, v = (shard.take(x.detach()).requires_grad_() for x in (p.q, p.k, p.v))
    out = cp_hstu_attention(q, k, v, shard, ctx.cp_group, backend=backend, **p.kwargs())
    tables = [p.rab.pos_w, p.rab.ts_w] if p.rab is not None else []
    grads = torch.autograd.grad(out, [q, k, v, *tables], shard.take(g))
    label = f"{backend} {spec}"
    check(f"{label} out", out, shard.take(ref))
    for name, got, want in zip("qkv", grads[:3], grads_ref[:3]):
        check(f"{label} d{name}", got, shard.take(want))
    for name, got, want in zip(("pos_w", "ts_w"), grads[3:], grads_ref[3:]):
        # Each rank holds the table gradient of its own queries; the sum is the full gradient.
        check(f"{label} d{name}", ctx.all_reduce_sum(got, over="cp"), want)


def _custom_mask_case(ctx) -> None:
    """An arbitrary mask_mod over global indices (semi-local attention) keeps its meaning."""
    p = random_problem([45, 2, 31], dtype=torch.float32, requires_grad=True, seed=7)
    T = p.q.shape[0]
    rule = and_masks(jagged(p.offsets), semi_local(p.offsets, 4, 3))
    single = build_custom_mask(rule, p.offsets)
    ref = hstu_attention(
        p.q,
        p.k,
        p.v,
        p.offsets,
        max_seq_len=p.max_seq_len,
        alpha=p.alpha,
        backend="reference",
        mask=single,
    )
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(8))
    grads_ref = torch.autograd.grad(ref, [p.q, p.k, p.v], g)
    shard = shard_tokens(p.offsets, ctx.cp_size, ctx.cp_rank)
    mask = build_cp_mask(shard, mask_mod=rule, with_block_mask=False)
    assert mask.spec is None and T == shard.total_len
    q, k, v = (shard.take(x.detach()).requires_grad_() for x in (p.q, p.k, p.v))
    out = context_parallel_attention(
        q, k, v, mask, ctx.cp_group, max_seq_len=p.max_seq_len, alpha=p.alpha, backend="reference"
    )
    grads = torch.autograd.grad(out, [q, k, v], shard.take(g))
    check("custom mask out", out, shard.take(ref))
    for name, got, want in zip("qkv", grads, grads_ref):
        check(f"custom mask d{name}", got, shard.take(want))


def cp_attention_reference() -> None:
    ctx = init_parallel(ParallelConfig(cp=2))
    assert (ctx.dp_size, ctx.cp_size) == (1, 2)
    for seed, spec in enumerate(ATTENTION_CASES):
        _attention_case(ctx, spec, seed, "reference")
    for seed in range(4):  # random lengths and options, the same draw on every rank
        g = torch.Generator().manual_seed(500 + seed)
        spec = {
            "lengths": torch.randint(
                1, 70, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g
            ).tolist(),
            "targets": bool(seed % 2),
            "contextual_len": [0, 0, 1, 3][seed],
            "max_attn_len": [0, 6, 0, 9][seed],
            "full_attn_tail": [0, 2, 0, 0][seed],
            "use_rab": seed != 2,
        }
        _attention_case(ctx, spec, 500 + seed, "reference")
    _custom_mask_case(ctx)


def _allow_cpu_flex_backward() -> None:
    """Eager FlexAttention's math path is differentiable on CPU; torch only refuses it in its
    argument checks. Lifting that lets CI check the flex paths' gradients (see conftest)."""
    flex_module._validate_device = lambda *a, **k: None
    cp_attention.cpu_needs_fallback = lambda *tensors: False
    ops_flex.cpu_needs_fallback = lambda *tensors: False


def cp_attention_flex() -> None:
    _allow_cpu_flex_backward()
    ctx = init_parallel(ParallelConfig(cp=2))
    for seed, spec in enumerate(ATTENTION_CASES):
        if spec.get("use_rab") or spec.get("targets"):
            _attention_case(ctx, spec, 100 + seed, "flex")
    # A tiny budget makes the bias-table gradient split long sequences into blocks of query rows.
    cp_flex._PAIR_BUDGET = 300
    _attention_case(ctx, ATTENTION_CASES[-1], 200, "flex")


# ---------------------------------------------------------------- model level


def _hstu_config(backend: str, head_dim: int = 8) -> HSTUConfig:
    return HSTUConfig(
        num_items=60,
        d_model=16,
        num_layers=2,
        num_heads=2,
        dqk=head_dim,
        dv=head_dim,
        max_seq_len=48,
        dropout=0.0,
        input_dropout=0.0,
        backend=backend,
    )


def _batch(lengths: list[int], seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    offsets = make_offsets(lengths)
    T = sum(lengths)
    ids = torch.randint(1, 61, (T,), generator=g)
    ts = torch.cumsum(torch.randint(0, 50_000, (T,), generator=g), 0)
    query = ts[offsets[1:] - 1] + 100
    nt = torch.tensor([min(2, L - 1) if L > 1 else 0 for L in lengths])
    return tuple(x.to(device) for x in (ids, offsets, ts, query, nt))


def _param_grads(model: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _train_two_steps(ref: HSTU, net: torch.nn.Module, ctx, global_batches, local_batches) -> None:
    """Two SGD steps on both; outputs and gradients must agree at every step."""
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for step, ((ids, off, ts, qt, nt), local) in enumerate(zip(global_batches, local_batches)):
        W = torch.randn(ids.shape[0], 16, generator=torch.Generator().manual_seed(step))
        W = W.to(ids.device)
        opt_ref.zero_grad()
        out_ref = encode(ref, JaggedBatch(ids, off, ts, qt, nt))
        ((out_ref * W).sum() / ids.shape[0]).backward()

        batch, rows = local  # rows: which global rows this rank's batch covers
        opt.zero_grad()
        out = net(batch)
        count = ctx.all_reduce_sum(torch.tensor(float(out.shape[0]), device=out.device))
        assert int(count) == ids.shape[0], "every token is on exactly one rank"
        W_local = batch.take(W[rows])
        ((out * W_local).sum() / count).backward()

        check(f"step {step} output", out, batch.take(out_ref[rows]))
        want = _param_grads(ref)
        for name, grad in _param_grads(unwrap(net)).items():
            check(f"step {step} grad {name}", grad, want[name])
        if ctx.cp_size > 1:
            full = gather_outputs(out, batch.shard, ctx.cp_group)
            check(f"step {step} gathered output", full, out_ref[rows])
        opt_ref.step()
        opt.step()


def _split_for_dp(lengths: list[int], dp_rank: int, dp_size: int, seed: int, device):
    """The global batch and this dp rank's contiguous slice of its sequences."""
    ids, off, ts, qt, nt = _batch(lengths, seed, device)
    B = len(lengths)
    lo, hi = dp_rank * B // dp_size, (dp_rank + 1) * B // dp_size
    rows = torch.arange(int(off[lo]), int(off[hi]), device=device)
    sub_off = off[lo : hi + 1] - off[lo]
    return (ids, off, ts, qt, nt), rows, (ids[rows], sub_off, ts[rows], qt[lo:hi], nt[lo:hi])


def model_parallel(
    dp: int,
    cp: int,
    backend: str = "reference",
    device: str = "cpu",
    pass_mib: float = 64.0,
    coarse_tiles: bool = False,
) -> None:
    """``coarse_tiles``: the Triton kernels on 64-row tiles (tests/ops/tiles.py), a quarter of
    the interpreter's tile visits, for tests whose subject is not the kernel's tiling."""
    set_kernel_options(KernelOptions(cp_pass_mib=pass_mib))
    if backend == "flex" and device == "cpu":
        _allow_cpu_flex_backward()
    if backend == "triton" and device == "cpu":
        # Triton's interpreter; read when the kernels are first imported, which is later.
        os.environ["TRITON_INTERPRET"] = "1"
    ctx = init_parallel(ParallelConfig(dp=dp, cp=cp))
    dev = ctx.device
    assert (ctx.dp_size, ctx.cp_size) == (dp, cp)
    torch.manual_seed(0)
    # The oracle runs the same backend: flex vs reference alone differs by up to ~1e-5 in some
    # fp32 weight gradients (the transform's fp32 LSE), which tests/ops and tests/model cover.
    # Compiled flex on CUDA needs head dims of at least 16.
    head_dim = 16 if dev.type == "cuda" else 8
    ref = HSTU(_hstu_config(backend, head_dim)).to(dev)
    # A different init on every rank: DDP must broadcast rank 0's weights.
    torch.manual_seed(ctx.rank)
    model = HSTU(_hstu_config(backend, head_dim)).to(dev)
    if ctx.rank == 0:
        model.load_state_dict(ref.state_dict())
    net = parallelize(model, ctx)
    lengths = [[1, 7, 40, 3, 25, 2, 11, 30], [48, 2, 5, 9, 1, 33, 4, 20]]
    global_batches, local_batches = [], []
    for step, L in enumerate(lengths):
        glob, rows, (ids, off, ts, qt, nt) = _split_for_dp(
            L, ctx.dp_rank, ctx.dp_size, seed=step, device=dev
        )
        batch = shard_inputs(model, JaggedBatch(ids, off, ts, qt, nt), ctx)
        global_batches.append(glob)
        local_batches.append((batch, rows))
    if coarse_tiles:
        from tests.ops.tiles import coarse_tiles as tiles

        with tiles():
            _train_two_steps(ref, net, ctx, global_batches, local_batches)
    else:
        _train_two_steps(ref, net, ctx, global_batches, local_batches)


def cp_attention_reference_then_flex() -> None:
    """Both attention bodies in one process group; flex second, as it lifts torch's CPU
    flex-backward check for the rest of the process. A failure names its body."""
    for name, body in (("reference", cp_attention_reference), ("flex", cp_attention_flex)):
        try:
            body()
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


def model_parallel_runs(runs: dict[str, tuple]) -> None:
    """model_parallel(*args) for each named run in turn, in one process group (the first run
    joins it, the others find it); a failure names its run."""
    for name, args in runs.items():
        try:
            model_parallel(*args)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


def gpu_cp_flex() -> None:
    """CUDA + NCCL: compiled flex with Q_LEN != KV_LEN against single-GPU flex (fp32)."""
    ctx = init_parallel(ParallelConfig(cp=2))
    assert ctx.device.type == "cuda"
    for seed, spec in enumerate(ATTENTION_CASES):
        if seed in (0, 6, 7):
            # Compiled flex on CUDA needs head dims of at least 16.
            _attention_case(
                ctx, {**spec, "dv": 16}, 300 + seed, "flex", oracle="flex", device="cuda"
            )


def bad_settings() -> None:
    """Raised on every rank before any collective, so a bad launch fails fast instead of hanging."""
    for cfg, words in (
        (ParallelConfig(cp=3), "does not divide"),
        (ParallelConfig(dp=2, cp=2), "conflicting"),
    ):
        try:
            init_parallel(cfg)
        except ParallelConfigError as e:
            assert words in str(e), str(e)
        else:
            raise AssertionError(f"{cfg} was accepted on a world of 2")
    ctx = init_parallel(ParallelConfig())
    assert (ctx.dp_size, ctx.cp_size) == (2, 1)
    try:
        parallelize(torch.nn.Linear(2, 2), init_parallel(ParallelConfig(cp=2)))
    except TypeError as e:
        assert "HSTU" in str(e)
    else:
        raise AssertionError("cp=2 accepted a model without HSTU attention")
