"""CUDA-graph replay of M-FALCON's candidate microbatch pass over a cached history.

A cache hit runs only the candidates' pass, whose kernels are small: on one H200 (d = 512, 3
layers, 1,024 candidates over 8,192 cached tokens, microbatches of 256) they took 1.27 ms of
device time per request but ~350 launches and ~7 ms of host time (benchmarks/
falcon_candidate_step.py --profile). Capturing one microbatch pass per cached history and
replaying it removes the launches: the graph reads the candidates' ids from a static buffer and
writes the logits to a static output, which each call copies out.

- Captured on the first reuse of a cache (a ``HistoryStore`` hit), where it pays: capture runs
  the pass three times. The graph is kept on the :class:`HistoryCache` (``graphs``), so it
  goes when the store evicts the history.
- Each graph has its own memory pool (freed with the graph). A pool shared across graphs
  failed an allocator assert on the H200 once the graphs that had used it were freed and a
  new one was captured into it. Captures take one lock (torch allows one at a time) and run on
  the model's GPU; replays take another, copy-out included, and a replay from another stream
  waits for the previous one's copy-out, so no call reads another's output.
- Weights and kernel options are fixed into a graph when it is captured: a cache's graphs
  belong to the weights its keys and values came from, as the cache itself does.
- A microbatch shorter than the graph is padded with its first candidate: candidates never
  see each other, so the padding changes no real row.
- A pass that cannot be captured (an op that syncs with the host) falls back to the eager pass
  with a one-time warning.
- At most ``MAX_LIVE_GRAPHS`` graphs live at once in the process (least recently replayed
  dropped first): a graph's pool holds one pass's intermediates ([H, b_m, L] scores per
  layer), which the ``HistoryStore``'s byte count does not see.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from flexgr.model.hstu.falcon import microbatches

_lock = threading.Lock()  # replays and the LRU list
_capture_lock = threading.Lock()  # one capture at a time in the process (torch's rule)
_failed: set[str] = set()
MAX_LIVE_GRAPHS = 8
# id(graph) -> (a weak reference to the dict that holds it, its key there), least recently
# replayed first; weak, so that a history the store evicts frees its graphs at once.
_live: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()


def _touch(graphs: dict, size: int, graph: object) -> None:
    """Mark ``graph`` (graphs[size]) as just used; drop the least recently used graphs above
    the cap."""
    with _lock:
        key = id(graph)
        _live[key] = (weakref.ref(graphs), size)
        _live.move_to_end(key)
        while len(_live) > MAX_LIVE_GRAPHS:
            old, (holder_ref, held) = _live.popitem(last=False)
            holder = holder_ref()
            if holder is not None and id(holder.get(held)) == old:  # not replaced since
                del holder[held]


def live_graphs() -> int:
    """How many captured passes are alive (for tests and monitoring)."""
    with _lock:
        return sum(1 for holder_ref, _ in _live.values() if holder_ref() is not None)


class CandidateGraph:
    """One captured ``run(ids [size]) -> [size, K]`` over a fixed cached history."""

    def __init__(self, run: Callable[[Tensor], Tensor], example_ids: Tensor, size: int) -> None:
        device = example_ids.device
        with torch.cuda.device(device):  # capture where the model is, not the current GPU
            self._capture(run, example_ids, size, device)
        # Replays from another stream wait for the previous replay's copy-out (the lock only
        # orders the host calls).
        self.done = torch.cuda.Event()

    def _capture(
        self, run: Callable[[Tensor], Tensor], example_ids: Tensor, size: int,
        device: torch.device,
    ) -> None:
        self.size = size
        self.ids = example_ids[:1].expand(size).contiguous()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, cuBLAS handles
            for _ in range(2):
                run(self.ids)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's GPU work during the capture (a library user's, or
        # a second server) neither fails it nor is captured; flexgr serve scores in one thread.
        with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(device),
                              capture_error_mode="thread_local"):
            self.out = run(self.ids)

    def __call__(self, ids: Tensor) -> Tensor:
        m = ids.numel()
        with _lock, torch.cuda.device(ids.device):
            torch.cuda.current_stream().wait_event(self.done)
            self.ids[:m].copy_(ids)
            if m < self.size:
                self.ids[m:].copy_(ids[:1].expand(self.size - m))
            self.graph.replay()
            out = self.out[:m].clone()
            self.done.record()
            return out


def graphed_passes(
    run: Callable[[Tensor], Tensor], graphs: dict[int, CandidateGraph], candidates: Tensor,
    microbatch: int, name: str,
) -> Tensor | None:
    """[M, K]: ``run`` over ``candidates`` in microbatches of ``microbatch``, each a replay of
    the graph of its size kept in ``graphs`` (captured here on first use). None when the
    pass cannot be captured (the caller runs it eagerly)."""
    if microbatch < 1:
        raise ValueError(f"microbatch must be >= 1, got {microbatch}")
    if name in _failed or not candidates.is_cuda or candidates.numel() == 0:
        return None
    size = min(microbatch, 1 << (candidates.numel() - 1).bit_length())
    graph = graphs.get(size)
    if graph is None:
        try:
            with _capture_lock:
                graph = graphs.get(size)  # another thread may have captured it meanwhile
                if graph is None:
                    graph = graphs[size] = CandidateGraph(run, candidates, size)
        except Exception as exc:  # noqa: BLE001 - e.g. an op that syncs with the host while capturing; scoring must go on
            _failed.add(name)
            warnings.warn(
                f"flexgr: {name} cannot be captured as a CUDA graph, scoring eagerly "
                f"({str(exc).splitlines()[0][:200]})", stacklevel=3,
            )
            torch.cuda.synchronize(candidates.device)
            return None
    _touch(graphs, size, graph)
    return torch.cat([graph(candidates[part]) for part in microbatches(candidates.numel(), size)])
