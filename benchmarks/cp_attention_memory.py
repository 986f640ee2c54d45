"""Memory of one context-parallel Triton attention call per rank, measured on the CPU.

    TRITON_INTERPRET=1 torchrun --nproc-per-node 2 benchmarks/cp_attention_memory.py --length 81920

What it measures is the Python side of the CP path (gathers, global-row copies, index copies,
reduce-scatters, what autograd keeps): the kernels are replaced by stand-ins that only allocate
and write their outputs, as the real launches do, so a long sequence costs seconds and no GPU.
Memory is the process's resident set (Linux VmRSS / VmHWM, peak reset through
/proc/self/clear_refs); tensors this large are mmap-backed, so they enter it when written and
leave it when freed. The per-batch tables (global view, block mask) are built before measuring:
they are shared by every layer. For comparison, rank 0 also runs the single-device path on the
whole sequence.

Rows: "kept" = what the forward leaves allocated for the backward plus the output; "forward
peak" / "backward peak" = the highest resident set during the call above the level before it.
"""

from __future__ import annotations

import argparse
import ctypes
import re
from datetime import timedelta

import torch
import torch.distributed as dist

from flexgr.distributed import build_cp_mask, context_parallel_attention, shard_tokens
from flexgr.masks import build_hstu_mask
from flexgr.ops.attention import hstu_attention
from flexgr.ops.triton_hstu import launch

MIB = 1 << 20


def _mmap_large_blocks() -> None:
    """glibc serves blocks above 128 KiB by mmap and unmaps them on free (no dynamic threshold),
    so the resident set follows live tensors instead of a heap that keeps freed pages."""
    libc = ctypes.CDLL("libc.so.6")
    M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        match = re.search(rf"{field}:\s+(\d+) kB", f.read())
    assert match, field
    return int(match.group(1)) * 1024 / MIB


def _reset_peak() -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _stub_forward(q, k, v, tab, **_):  # noqa: ANN001, ANN003, ANN202
    return torch.ones(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype)


def _stub_backward(do, q, k, v, tab, *, pos_w=None, ts_w=None, **_):  # noqa: ANN001, ANN003, ANN202
    grads = [torch.ones(x.shape, dtype=x.dtype) for x in (q, k, v)]
    tables = [None if w is None else torch.ones_like(w) for w in (pos_w, ts_w)]
    return (*grads, *tables)


def measure(call, T_r: int, H: int, dqk: int, dv: int) -> tuple[float, float, float]:  # noqa: ANN001
    """(kept, forward peak, backward peak) in MiB of ``call(q, k, v)`` on fresh inputs."""
    # q, k, v as views of one projection output, as in the model (it stays alive anyway).
    x = torch.randn(T_r, H, 2 * dqk + dv, dtype=torch.bfloat16).requires_grad_()
    q, k, v = x.split([dqk, dqk, dv], dim=-1)
    base = _reset_peak()
    out = call(q, k, v)
    kept = _status("VmRSS") - base
    fwd_peak = _status("VmHWM") - base
    grad = torch.ones_like(out)
    base = _reset_peak()
    out.backward(grad)
    bwd_peak = _status("VmHWM") - base
    return kept, fwd_peak, bwd_peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--length", type=int, default=81920, help="one sequence of this many tokens")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    args = p.parse_args()
    _mmap_large_blocks()
    dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    launch.forward, launch.backward = _stub_forward, _stub_backward
    C, rank = dist.get_world_size(), dist.get_rank()
    L, H, D = args.length, args.heads, args.dim
    offsets = torch.tensor([0, L])
    shard = shard_tokens(offsets, C, rank)
    mask = build_cp_mask(shard, with_block_mask=False)

    def cp_call(q, k, v):  # noqa: ANN001, ANN202
        return context_parallel_attention(
            q, k, v, mask, dist.group.WORLD, max_seq_len=L, alpha=D**-0.5, backend="triton"
        )

    measure(cp_call, shard.local_len, H, D, D)  # builds the per-batch view and tables
    rows = [("CP=%d rank %d (%d local tokens)" % (C, rank, shard.local_len),
             *measure(cp_call, shard.local_len, H, D, D))]
    gathered = [None] * C
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        whole = build_hstu_mask(offsets)

        def single(q, k, v):  # noqa: ANN001, ANN202
            return hstu_attention(
                q, k, v, offsets, max_seq_len=L, alpha=D**-0.5, backend="triton", mask=whole
            )

        measure(single, L, H, D, D)
        one = [("1 device (%d tokens)" % L, *measure(single, L, H, D, D))]
        print(f"\nOne attention call, one sequence of {L:,} tokens, H={H}, dqk=dv={D}, bf16; "
              "MiB of resident memory (CPU, kernels stubbed)\n")
        print("| path | kept for backward (+ output) | forward peak | backward peak |")
        print("|---|---|---|---|")
        for name, kept, fwd, bwd in one + [r for rs in gathered for r in rs]:
            print(f"| {name} | {kept:.0f} | {fwd:.0f} | {bwd:.0f} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
