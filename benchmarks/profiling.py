"""One torch.profiler pass over repeated calls, shared by the benchmarks' ``--profile`` modes.

    from profiling import profile_calls   # benchmarks/ is the script's directory

Device time counts the kernel rows only: an op's row repeats the device time of the kernels it
launched, so summing every row counts them twice. Host time is an unsynchronised loop of the
same calls: far above the device time means the calls are launch-bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd import DeviceType


@dataclass
class CallProfile:
    events: Any  # torch.profiler's key_averages() of the profiled calls
    kernels: list  # its device (kernel) rows
    reps: int
    device_ms: float  # kernel time per call
    host_ms: float  # wall time per call of an unsynchronised loop

    def top_kernels(self, n: int) -> list:
        return sorted(self.kernels, key=lambda e: -e.self_device_time_total)[:n]

    def top_host(self, n: int) -> list:
        rows = [e for e in self.events if e.device_type == DeviceType.CPU]
        return sorted(rows, key=lambda e: -e.self_cpu_time_total)[:n]

    def summary(self, top: int = 10) -> dict[str, Any]:
        """The benchmarks' JSON fields: kernel and host time per call, counts, top rows."""
        reps = self.reps
        return {
            "profile_kernel_ms": round(self.device_ms, 3),
            "profile_host_ms": round(self.host_ms, 3),
            # aten calls per call, nested ones included (a composite op counts with its
            # parts): a measure of dispatch work to compare by, not a launch count.
            "profile_aten_calls": sum(e.count for e in self.events if e.key.startswith("aten::"))
            // reps,
            "profile_kernel_launches": sum(e.count for e in self.kernels) // reps,
            "top_kernels": [
                [e.key[:80], round(e.self_device_time_total / reps / 1e3, 3)]
                for e in self.top_kernels(top)
            ],
            "top_host_ops": [
                [e.key[:80], round(e.self_cpu_time_total / reps / 1e3, 3), e.count // reps]
                for e in self.top_host(top)
            ],
        }


def synchronise(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def profile_calls(call: Callable[[], object], reps: int, device: torch.device | str) -> CallProfile:
    """Profile ``reps`` calls (already warmed up), then time ``reps`` more without waiting."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronise(device)
    with profile(activities=activities) as prof:
        for _ in range(reps):
            call()
        synchronise(device)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    device_ms = sum(e.self_device_time_total for e in kernels) / reps / 1e3
    start = time.perf_counter()
    for _ in range(reps):
        call()
    host_ms = (time.perf_counter() - start) / reps * 1e3
    synchronise(device)
    return CallProfile(events, kernels, reps, device_ms, host_ms)
