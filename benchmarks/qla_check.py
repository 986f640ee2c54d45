"""QLA's Triton kernels against eager on the GPU: largest gaps and forward + backward time.

    python benchmarks/qla_check.py        # CUDA; fp32, H = 4, d = 64, lengths 1, 17, 300, 4096

Prints the largest |triton - eager| of the output and of dq, dk, dv, then each impl's
forward + backward median ms (``triton.testing.do_bench``, same process).
"""

from __future__ import annotations

import torch
import triton.testing

from flexgr.vista.qla import qla


def main() -> None:
    torch.manual_seed(0)
    lengths = torch.tensor([1, 17, 300, 4096])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).cuda()
    T = int(offsets[-1])
    q, k, v = (torch.randn(T, 4, 64, device="cuda", requires_grad=True) for _ in range(3))

    def run(impl: str) -> tuple[torch.Tensor, ...]:
        out = qla(q, k, v, offsets, divisor=4096.0, impl=impl)
        return (out, *torch.autograd.grad(out.sum(), (q, k, v)))

    eager, fused = run("eager"), run("triton")
    gaps = [float((a - b).abs().max()) for a, b in zip(eager, fused, strict=True)]
    print("largest |triton - eager| (out, dq, dk, dv):", ", ".join(f"{g:.2g}" for g in gaps))
    for impl in ("eager", "triton"):
        ms = triton.testing.do_bench(lambda impl=impl: run(impl), return_mode="median")
        print(f"{impl}: forward + backward {ms:.2f} ms")


if __name__ == "__main__":
    main()
