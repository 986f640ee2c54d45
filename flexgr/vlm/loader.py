"""The loader pipeline: shard, window, order, materialise, prefetch. Same for both stores.

- **Sharding**: each torchrun rank keeps the examples of the users whose hash falls on it
  (``Shard(by="user")``, the default): a user's examples stay on one rank, and with a bucket
  count divisible by the world size each rank reads only its own tier buckets (co-partitioned
  by the same hash). ``by="request"`` balances counts exactly but gives up that locality.
- **Window**: examples are buffered ``shuffle_window`` at a time and shuffled (seeded). With
  ``affinity`` the window is grouped by user before it is cut into batches, so one range scan
  serves several examples of a user; batch order is shuffled again so the trainer does not see
  users in hash order. ``shuffle_window=0`` keeps arrival order (streaming).
- **Prefetch**: a background thread materialises batch N+1 (its tier scans and decoding, which
  release the GIL in pyarrow) while the trainer consumes batch N. It runs the same producer as
  the inline path, so the batches are identical.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from flexgr.vlm.batch import JaggedBatch
from flexgr.vlm.examples import ExampleChunk, ExampleRows
from flexgr.vlm.hashing import mix64, user_hash

ShardBy = Literal["user", "request"]
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    by: ShardBy = "user"

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.by not in ("user", "request"):
            raise ValueError(f"shard by 'user' or 'request', not {self.by!r}")

    @staticmethod
    def from_env(by: ShardBy = "user") -> Shard:
        """torchrun's RANK and WORLD_SIZE (one process: rank 0 of 1)."""
        return Shard(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), by)

    def keep(self, users: np.ndarray, request_ids: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return np.ones(len(users), dtype=bool)
        key = user_hash(users) if self.by == "user" else request_ids.astype(np.uint64)
        return key % np.uint64(self.world_size) == np.uint64(self.rank)


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 64
    shuffle_window: int = 0  # examples shuffled together; 0 keeps arrival order
    affinity: bool = False  # group each window by user before cutting batches
    prefetch: int = 0  # batches materialised ahead on a background thread; 0 inline
    seed: int = 0
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.prefetch < 0 or self.shuffle_window < 0:
            raise ValueError("batch_size must be positive, prefetch and shuffle_window >= 0")
        if self.affinity and self.shuffle_window < self.batch_size:
            raise ValueError("affinity needs a shuffle_window of at least one batch")


class Loader:
    """Iterates :class:`JaggedBatch` es; ``chunks`` is called once per pass over the data."""

    def __init__(
        self,
        chunks: Callable[[], Iterable[ExampleChunk]],
        materialize: Callable[[ExampleRows], JaggedBatch],
        config: LoaderConfig = LoaderConfig(),
        shard: Shard = Shard(),
    ) -> None:
        self.chunks, self.materialize = chunks, materialize
        self.config, self.shard = config, shard
        self.wait_s = 0.0  # time the consumer spent waiting for batches, last pass

    def row_batches(self) -> Iterator[ExampleRows]:
        """The example rows of each batch, in order (materialisation aside)."""
        config = self.config
        window = max(config.shuffle_window, config.batch_size)
        buffered: ExampleRows | None = None
        number = 0
        for chunk in self.chunks():
            rows = ExampleRows.of_chunk(chunk)
            table = rows.table
            mask = self.shard.keep(
                table.column("user").to_numpy(), table.column("request_id").to_numpy()
            )
            if not mask.all():
                rows = rows.take(np.flatnonzero(mask))
            # Slices and chunked concatenation copy nothing: each row is copied once, by the
            # take that forms its batch.
            buffered = rows if buffered is None else ExampleRows.concat([buffered, rows])
            cursor = 0
            while len(buffered) - cursor >= window:
                batches, rest = self._order(buffered.slice(cursor, window), number)
                cursor, number = cursor + window, number + 1
                yield from batches
                if len(rest):  # fewer than a batch: they open the next window
                    tail = buffered.slice(cursor, len(buffered) - cursor)
                    buffered, cursor = ExampleRows.concat([rest, tail]), 0
            buffered = buffered.slice(cursor, len(buffered) - cursor)
        if buffered is not None and len(buffered):
            batches, rest = self._order(buffered, number)
            yield from batches
            if len(rest) and not config.drop_last:
                yield rest

    def _order(self, rows: ExampleRows, number: int) -> tuple[list[ExampleRows], ExampleRows]:
        """Full batches of one window, and the rows left over for the next window."""
        config, n, size = self.config, len(rows), self.config.batch_size
        full = n // size * size
        if not config.shuffle_window:
            return [rows.slice(i, size) for i in range(0, full, size)], rows.slice(full, n - full)
        rng = np.random.default_rng([config.seed, number])
        order = rng.permutation(n)
        if config.affinity:
            users = rows.table.column("user").to_numpy()
            order = group_by_user(order, users, config.seed * 1_000_003 + number)
        batches = [rows.take(order[i : i + size]) for i in range(0, full, size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches, rows.take(order[full:])

    def __iter__(self) -> Iterator[JaggedBatch]:
        self.wait_s = 0.0
        source = self._inline() if self.config.prefetch == 0 else self._prefetched()
        while True:
            start = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                return
            finally:
                self.wait_s += time.perf_counter() - start
            yield batch

    def _inline(self) -> Iterator[JaggedBatch]:
        for rows in self.row_batches():
            yield self.materialize(rows)

    def _prefetched(self) -> Iterator[JaggedBatch]:
        return prefetch(self._inline, self.config.prefetch)


def group_by_user(order: np.ndarray, users: np.ndarray, salt: int) -> np.ndarray:
    """``order`` (row numbers) regrouped so each user's rows are adjacent, users in a salted
    hash order, each user's rows in their order in ``order`` (stable)."""
    keys = mix64(user_hash(users[order]) ^ np.uint64(salt))
    return order[np.argsort(keys, kind="stable")]


def prefetch(make: Callable[[], Iterator[T]], depth: int) -> Iterator[T]:
    """The items of ``make()``, produced on a background thread up to ``depth`` ahead.

    Same items in the same order as iterating ``make()`` inline; an error on the thread is
    raised here, in the consumer; leaving early stops the thread at its next item."""
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in make():
                if not put(item):
                    return
            put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failed(err))

    worker = threading.Thread(target=produce, name="vlm-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        # The producer sees `stop` at its next item; one blocked in `follow` waiting for a
        # part would hold a plain join() forever, so wait only briefly (it is a daemon).
        worker.join(timeout=5.0)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()
