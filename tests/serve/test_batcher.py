"""The micro-batcher alone: batching, routing of results, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from flexgr.serve.batcher import MicroBatcher, Overloaded


def test_concurrent_jobs_share_batches_and_get_their_own_results() -> None:
    seen: list[list[int]] = []

    def double(jobs: Sequence[int]) -> list[int]:
        seen.append(list(jobs))
        return [2 * job for job in jobs]

    async def main() -> list[int]:
        batcher = MicroBatcher(double, max_batch=4, max_wait_s=0.2)
        await batcher.start()
        try:
            return list(await asyncio.gather(*(batcher.submit(i) for i in range(10))))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert sorted(job for batch in seen for job in batch) == list(range(10))
    assert max(len(batch) for batch in seen) == 4  # full batches, never more than max_batch
    assert len(seen) == 3


def test_no_wait_and_a_single_caller() -> None:
    async def main() -> tuple[int, int]:
        batcher = MicroBatcher(lambda jobs: [j + 1 for j in jobs], max_batch=8, max_wait_s=0)
        await batcher.start()
        try:
            return await batcher.submit(1), batcher.stats.batches
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == (2, 1)


def test_a_failing_batch_fails_its_callers_only() -> None:
    def run(jobs: Sequence[int]) -> list[int]:
        if -1 in jobs:
            raise RuntimeError("boom")
        return list(jobs)

    async def main() -> tuple[BaseException | int, int]:
        batcher = MicroBatcher(run, max_batch=1, max_wait_s=0)
        await batcher.start()
        try:
            bad, good = await asyncio.gather(
                batcher.submit(-1), batcher.submit(5), return_exceptions=True
            )
            return bad, good
        finally:
            await batcher.stop()

    bad, good = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and good == 5


def test_full_queue_and_shutdown_refuse_with_overloaded() -> None:
    release = threading.Event()

    def slow(jobs: Sequence[int]) -> list[int]:
        release.wait(timeout=10)
        return list(jobs)

    async def main() -> None:
        batcher = MicroBatcher(slow, max_batch=1, max_wait_s=0, max_queue=2)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # job 0 is in the worker thread
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="queued already"):
            await batcher.submit(3)
        release.set()
        assert await running == 0
        stop = asyncio.ensure_future(batcher.stop())
        results = await asyncio.gather(*queued, return_exceptions=True)
        await stop
        # Each queued job either ran before the stop or was refused; none is lost silently.
        assert all(r in (1, 2) or isinstance(r, Overloaded) for r in results), results
        with pytest.raises(Overloaded):
            await batcher.submit(4)

    asyncio.run(main())
