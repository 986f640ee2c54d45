"""A small async micro-batcher: requests of concurrent callers run as one batch.

Callers ``await submit(job)``; one background task takes up to ``max_batch`` queued jobs,
waiting at most ``max_wait_s`` after the first for more to arrive, and runs them together in a
worker thread (so the event loop keeps accepting and parsing requests meanwhile). While a batch
runs, new jobs queue up and form the next one, so under load batches fill without any wait.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


class Overloaded(RuntimeError):
    """The queue is full, or the batcher is stopping: the caller should retry later (503)."""


@dataclass
class BatchStats:
    batches: int = 0
    jobs: int = 0
    largest: int = 0
    busy_s: float = 0.0  # time spent running batches

    @property
    def mean_batch(self) -> float:
        return self.jobs / self.batches if self.batches else 0.0


class MicroBatcher(Generic[Job, Result]):
    """``run(jobs) -> results`` (same length and order) is called in one worker thread, never
    concurrently with itself. An exception from it fails every job of that batch."""

    def __init__(
        self,
        run: Callable[[Sequence[Job]], Sequence[Result]],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        max_queue: int = 1024,
    ) -> None:
        if max_batch < 1 or max_wait_s < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_s >= 0")
        self._run = run
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.stats = BatchStats()
        self._pending: deque[tuple[Job, asyncio.Future[Result]]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexgr-batch")
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="flexgr-micro-batcher")

    async def stop(self) -> None:
        """Finish the batch in progress, fail the queued jobs (Overloaded), stop the thread."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(Overloaded("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, job: Job) -> Result:
        if self._stopping or not self.running or self._wakeup is None:
            raise Overloaded("the server is not accepting requests (starting or shutting down)")
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"{len(self._pending)} requests are queued already; retry shortly")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((job, future))
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._gather_more(loop)
            batch = [
                self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))
            ]
            live = [(job, future) for job, future in batch if not future.done()]
            if not live:
                continue  # every caller went away (cancelled) while queued
            start = time.perf_counter()
            try:
                jobs = [job for job, _ in live]
                results = await loop.run_in_executor(self._executor, self._run, jobs)
                if len(results) != len(live):
                    raise RuntimeError(f"batch of {len(live)} jobs gave {len(results)} results")
            except asyncio.CancelledError:
                for _, future in live:
                    if not future.done():
                        future.set_exception(Overloaded("the server is shutting down"))
                raise
            except Exception as err:  # noqa: BLE001 (a batch's failure goes to its callers)
                for _, future in live:
                    if not future.done():
                        future.set_exception(err)
                continue
            finally:
                self._record(len(live), time.perf_counter() - start)
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _gather_more(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait up to max_wait_s after the first job for the batch to fill."""
        assert self._wakeup is not None
        deadline = loop.time() + self.max_wait_s
        while len(self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                # The state is the deque, so a wake-up lost to the timeout loses nothing.
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _record(self, size: int, seconds: float) -> None:
        stats = self.stats
        stats.batches += 1
        stats.jobs += size
        stats.largest = max(stats.largest, size)
        stats.busy_s += seconds
