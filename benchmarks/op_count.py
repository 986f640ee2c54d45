"""What one call dispatches, counted on CPU: a proxy for its CUDA kernel launches and syncs.

    from op_count import count_ops   # benchmarks/ is the script's directory

Every aten op a call runs passes the dispatcher, whatever the device, so a
``TorchDispatchMode`` sees the same ops on CPU as a CUDA run would launch. The counts are a
proxy: a view launches nothing (left out), and some ops launch several kernels (a sort, a
cumsum) or none. ``host_reads`` counts the ops that bring a value to the host, each a sync on
CUDA (the device queue drains before the host goes on); ``uploads`` counts tensors made from
host data (``torch.tensor``), each a blocking host-to-device copy on CUDA.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Allocations and metadata changes: no kernel.
NO_KERNEL = {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten._unsafe_view.default,
}
# A value read on the host, or an output size only the data gives.
READS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.masked_select.default,
}


@dataclass
class OpCount:
    ops: int = 0  # ops that launch a kernel on CUDA (proxy)
    views: int = 0
    host_reads: int = 0
    uploads: int = 0
    by_op: Counter = field(default_factory=Counter)


def _reads_on_host(func, args: tuple, kwargs: dict) -> bool:
    if func in READS:
        return True
    if func is aten.repeat_interleave.Tensor:  # without output_size it sums the repeats
        return kwargs.get("output_size", args[1] if len(args) > 1 else None) is None
    if func is aten.index.Tensor:  # boolean-mask indexing: the size is the mask's count
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    if func is aten._to_copy.default:  # .cpu() of a device tensor
        target = kwargs.get("device")
        return target is not None and target.type == "cpu" and args[0].device.type != "cpu"
    return False


class _Counting(TorchDispatchMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        count = self.count
        if func is aten.lift_fresh.default:
            count.uploads += 1
        elif func.is_view:
            count.views += 1
        elif func not in NO_KERNEL:
            count.ops += 1
            count.by_op[str(func)] += 1
        if _reads_on_host(func, args, kwargs):
            count.host_reads += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def _counting_tolist(count: OpCount) -> Iterator[None]:
    """On CPU ``Tensor.tolist`` reads the memory without dispatching an op: count it here."""
    original = torch.Tensor.tolist

    def tolist(self: torch.Tensor):  # type: ignore[no-untyped-def]
        count.host_reads += 1
        return original(self)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.tolist = original  # type: ignore[method-assign]


def count_ops(call: Callable[[], object]) -> OpCount:
    """The ops, views, host reads and uploads of one ``call()``."""
    count = OpCount()
    with _counting_tolist(count), _Counting(count):
        call()
    return count
