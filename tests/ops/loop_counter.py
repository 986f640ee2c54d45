"""Counts the loop iterations the attention kernels really run, in Triton's interpreter.

The interpreter resolves a kernel's device functions from its module's globals at each call,
so wrapping ``_fwd_visit`` / ``_dq_visit`` / ``_dkdv_visit`` (one call per program and loop)
and ``load_rows`` (two calls per iteration in each of them: k and v, or q and do) counts what
each program iterates, without touching the kernels' source.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch

from flexgr.ops.triton_hstu import backward, forward
from flexgr.ops.triton_hstu.visits import LoopTrips

# visit function -> (kernel name, the argument holding the program's row or column indices)
_VISITS = {
    (forward, "_fwd_visit"): ("fwd", "offs_m"),
    (backward, "_dq_visit"): ("dq", "offs_m"),
    (backward, "_dkdv_visit"): ("dkdv", "offs_n"),
}
_LOADS_PER_ITERATION = 2


def _value(x: object) -> object:
    return getattr(x, "value", x)  # constexpr arguments may arrive wrapped


class LoopCounter:
    """``counts[kernel][first index of the program's tile] = [partial, full]`` iterations,
    summed over heads (pass H = 1 to read one program's)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: dict[str, dict[int, list[int]]] = defaultdict(
            lambda: defaultdict(lambda: [0, 0])
        )
        self._loads = 0
        for module in (forward, backward):
            monkeypatch.setattr(module, "load_rows", self._counting_load(module.load_rows))
        for (module, name), (kernel, offs_name) in _VISITS.items():
            monkeypatch.setattr(
                module, name, self._counting_visit(getattr(module, name), kernel, offs_name)
            )

    def reset(self) -> None:
        """Forget the iterations counted so far (the wrappers stay in place)."""
        self.counts.clear()

    def _counting_load(self, load: Callable[..., object]) -> Callable[..., object]:
        def counted(*args: object, **kwargs: object) -> object:
            self._loads += 1
            return load(*args, **kwargs)

        return counted

    def _counting_visit(
        self, visit: Callable[..., object], kernel: str, offs_name: str
    ) -> Callable[..., object]:
        signature = inspect.signature(visit.fn)  # type: ignore[attr-defined]

        def counted(*args: object, **kwargs: object) -> object:
            bound = signature.bind(*args, **kwargs).arguments
            start = int(bound[offs_name].handle.data[0])  # type: ignore[attr-defined]
            before = self._loads
            result = visit(*args, **kwargs)
            iterations, rest = divmod(self._loads - before, _LOADS_PER_ITERATION)
            assert rest == 0, "a visit loop loaded an odd number of tiles"
            self.counts[kernel][start][1 if _value(bound["IS_FULL"]) else 0] += iterations
            return result

        return counted

    def trips(self, kernel: str, tile: int, programs: int) -> LoopTrips:
        """The counted iterations as :class:`LoopTrips` over ``programs`` tiles of ``tile``."""
        seen = self.counts[kernel]
        assert set(seen) == {p * tile for p in range(programs)}, (
            f"{kernel}: programs missing or extra"
        )
        rows = [seen.get(p * tile, [0, 0]) for p in range(programs)]
        partial, full = torch.tensor(rows, dtype=torch.long).reshape(-1, 2).unbind(1)
        return LoopTrips(partial, full)
