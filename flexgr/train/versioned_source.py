"""Training batches from a versioned-example dataset (``data.source = "versioned"``).

Each versioned example (flexgr.vlm) is rebuilt by the loader from its pointer: a range scan of
the history tier, merged with the recent snapshot, checked against the leak rule, its length
and its checksum (flexgr.vlm.reconstruct). Its training sequence is its history as of
``request_ts`` followed by its candidates (the request's events), cut to the newest
``max_seq_len + 1`` events; as in the table path (flexgr.train.batches), the model reads all
but the last and each position is supervised by the event after it, and ``query_time`` is the
last target's timestamp. An example built from a table's user (flexgr.vlm.dataset) is that
user's table sequence, event for event.

The dataset is indexed like :class:`~flexgr.train.batches.TrainSequences` (by
:class:`~flexgr.train.batches.BatchRows`, rows ordered by user then request time), so the
trainer's epochs, resume, replicas and DataLoader apply unchanged; ``[versioned]`` adds user
affinity (:class:`AffinityBatches`) and a prefetch thread (:class:`PrefetchLoader`).
Evaluation reads the table the store was built from (its validation and test targets are not
in the store; see flexgr.vlm.dataset).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from flexgr.data import (
    BUILTINS,
    InteractionData,
    Split,
    data_home,
    load_prepared,
    make_split,
    prepare,
)
from flexgr.data.errors import DataError
from flexgr.train.batches import BatchRows, EpochBatches, TrainBatch, TrainSequences
from flexgr.vlm.batch import JaggedBatch, gather_ranges, offsets_of
from flexgr.vlm.dataset import (
    EXAMPLES,
    META,
    TIER,
    VersionedMeta,
    prepare_from_table,
    prepare_synthetic,
    read_meta,
    train_digest,
)
from flexgr.vlm.examples import ExampleRows, example_files, list_parts, read_chunks
from flexgr.vlm.files import ReadStats
from flexgr.vlm.loader import group_by_user, prefetch
from flexgr.vlm.reconstruct import Reconstructor
from flexgr.vlm.schema import Tenant
from flexgr.vlm.synthetic import SyntheticSpec
from flexgr.vlm.tier import Tier

if TYPE_CHECKING:
    from flexgr.train.config import Config
    from flexgr.train.length_sampling import LengthSampler

# Built-in versioned datasets: the synthetic multi-tenant log (flexgr.vlm.synthetic), sized to
# train on a CPU. Any prepared flexgr dataset name works too (one example per user).
SYNTHETIC: dict[str, tuple[SyntheticSpec, int]] = {
    "synthetic-multitenant": (
        SyntheticSpec(users=256, days=2, items=20_000, history_median=150, history_max=4000),
        4096,  # log_max_len: the longest history an example records
    ),
}


# ---------------------------------------------------------------- the store


def versioned_dir(cfg: Config, *, prepare_missing: bool = True) -> Path:
    """The store ``data.dataset`` names (see :func:`store_dir`)."""
    d = cfg.data
    return store_dir(d.dataset, d.protocol, d.data_dir or None, build=prepare_missing)


def store_dir(name: str, protocol: str, data_dir: str | None, *, build: bool = True) -> Path:
    """A directory holding vlm.json, or a name, kept under ``<data dir>/versioned/<name>-
    <protocol>`` and built on first use (``build``) from the synthetic log or from the
    prepared (or built-in) flexgr dataset of that name."""
    if (Path(name) / META).is_file():
        return Path(name)
    home = default_store(name, protocol, data_dir)
    if (home / META).is_file() or not build:
        return home
    if name in SYNTHETIC:
        spec, log_max_len = SYNTHETIC[name]
        return prepare_synthetic(home, spec, protocol=protocol, log_max_len=log_max_len)
    table = prepare(name, data_dir=data_dir) if name in BUILTINS else prepared_dir(name, data_dir)
    data = load_prepared(table)
    return prepare_from_table(home, data, make_split(data, protocol), table=str(table))


def default_store(name: str, protocol: str, data_dir: str | None) -> Path:
    return data_home(data_dir) / "versioned" / f"{Path(name).name}-{protocol}"


def prepared_dir(name: str, data_dir: str | None) -> Path:
    """A prepared flexgr dataset's directory, by path or name."""
    path = Path(name)
    if (path / "meta.json").is_file():
        return path
    path = data_home(data_dir) / name
    if (path / "meta.json").is_file():
        return path
    raise DataError(
        f"no versioned dataset and no prepared flexgr dataset named {name!r} (prepare it "
        f"with flexgr data prepare, or use synthetic-multitenant)"
    )


def evaluation_table(cfg: Config, *, prepare_missing: bool = True) -> InteractionData:
    """The table a versioned store was built from: evaluation ranks its targets."""
    root = versioned_dir(cfg, prepare_missing=prepare_missing)
    meta = read_meta(root)
    return load_prepared(meta.table_path(root))


def check_store(
    meta: VersionedMeta, root: Path, cfg: Config, data: InteractionData, split: Split
) -> None:
    """Refuse a store that is not the training part of this run's table and split: another
    protocol would put its validation targets into training."""
    if meta.protocol != cfg.data.protocol:
        raise DataError(
            f"{root} holds the training events of protocol {meta.protocol}, the run uses "
            f"{cfg.data.protocol} (prepare it with --protocol {cfg.data.protocol})"
        )
    if train_digest(data, split)[1] != meta.train_digest:
        raise DataError(f"{root}: its table has changed since it was built (prepare it again)")
    if cfg.data.max_seq_len > meta.log_max_len:
        raise DataError(
            f"data.max_seq_len {cfg.data.max_seq_len} is longer than the histories {root} "
            f"records ({meta.log_max_len}; prepare it with a larger --log-max-len)"
        )


# ---------------------------------------------------------------- the dataset


class VersionedSequences(Dataset[TrainBatch]):
    """Training sequences rebuilt from versioned examples; indexed like TrainSequences."""

    def __init__(
        self, root: Path, meta: VersionedMeta, max_seq_len: int, cache_stripes: int
    ) -> None:
        self.root, self.meta = Path(root), meta
        self.max_seq_len, self.cache_stripes = max_seq_len, cache_stripes
        self.tenant = Tenant("train", max_seq_len)  # the history part never exceeds this
        self.stats = ReadStats()
        self._pid = -1
        self._open()
        files = example_files(self.root / EXAMPLES)
        chunks = read_chunks(files, self.rebuild.example_columns(), self.stats)
        rows = ExampleRows.concat([ExampleRows.of_chunk(chunk) for chunk in chunks])
        col = rows.table.column
        users, request_ts = col("user").to_numpy(), col("request_ts").to_numpy()
        tokens = col("history_len").to_numpy() + np.diff(list_parts(col("candidates"))[0])
        order = np.lexsort((col("request_id").to_numpy(), request_ts, users))
        order = order[tokens[order] >= 2]  # one event to read and one to predict
        self.rows = rows.take(order)
        self.users = users[order]
        self.lengths = np.minimum(tokens[order], max_seq_len + 1) - 1  # input tokens

    def _open(self) -> None:
        """The tier, opened once per process (DataLoader workers fork; a handle is per process)."""
        if self._pid != os.getpid():
            tier = Tier.open(self.root / TIER, stats=self.stats, cache_stripes=self.cache_stripes)
            self.rebuild = Reconstructor(tier, self.tenant)
            self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.users)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def lengths_in(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        del epoch  # no Stochastic Length on this source
        return self.lengths[rows]

    def __getitem__(self, part: BatchRows | list[int]) -> TrainBatch:  # type: ignore[override]
        if not isinstance(part, BatchRows):
            part = BatchRows(list(part))
        self._open()
        batch = self.rebuild(self.rows.take(np.asarray(part.rows, dtype=np.int64)))
        return train_batch(batch, self.max_seq_len, self.meta.time_scale, part)


def train_batch(
    batch: JaggedBatch, max_seq_len: int, time_scale: int = 1, part: BatchRows | None = None
) -> TrainBatch:
    """Each example's history followed by its candidates, the newest ``max_seq_len + 1``
    events: inputs all but the last, targets all but the first (any materialised batch, from
    the tier or from fat rows, maps the same way)."""
    part = part or BatchRows([])
    off, cand_off = batch.offsets.numpy(), batch.candidate_offsets.numpy()
    hist_len, cand_len = np.diff(off), np.diff(cand_off)
    merged_off = offsets_of(hist_len + cand_len)
    starts = merged_off[:-1]
    items = np.empty(merged_off[-1], dtype=np.int64)
    stamps = np.empty(merged_off[-1], dtype=np.int64)
    into_hist = gather_ranges(starts, starts + hist_len)
    into_cand = gather_ranges(starts + hist_len, merged_off[1:])
    items[into_hist], stamps[into_hist] = batch.item_ids.numpy(), batch.timestamps.numpy()
    items[into_cand] = batch.candidates.numpy()
    stamps[into_cand] = batch.candidate_timestamps.numpy()
    keep = np.minimum(merged_off[1:] - starts, max_seq_len + 1)
    first = merged_off[1:] - keep
    inputs = gather_ranges(first, merged_off[1:] - 1)
    stamps //= time_scale  # back to the table's time (flexgr.vlm.dataset.refine_ties)
    return TrainBatch(
        item_ids=torch.from_numpy(items[inputs]),
        offsets=torch.from_numpy(offsets_of(keep - 1)),
        timestamps=torch.from_numpy(stamps[inputs]),
        query_time=torch.from_numpy(stamps[merged_off[1:] - 1]),
        targets=torch.from_numpy(items[inputs + 1]),
        users=batch.users.clone(),
        row_offset=part.row_offset,
        row_total=part.row_total,
    )


# ---------------------------------------------------------------- order and prefetch


class AffinityBatches(EpochBatches):
    """EpochBatches whose every window of ``window`` rows of the epoch's permutation is
    grouped by user before it is cut into batches, then the window's full batches are
    shuffled: one tier scan serves a user's examples in a batch, and neighbouring batches
    share cached stripes. Still a function of (seed, epoch) alone, so resume is exact."""

    def __init__(
        self, num_sequences: int, batch_size: int, seed: int, users: np.ndarray, window: int
    ) -> None:
        super().__init__(num_sequences, batch_size, seed)
        self.users = users
        self.window = max(batch_size, window // batch_size * batch_size)

    def order(self, epoch: int) -> np.ndarray:
        order = super().order(epoch)
        rng = np.random.default_rng([self.seed, epoch, 1])
        size, out = self.batch_size, []
        for start in range(0, len(order), self.window):
            window = order[start : start + self.window]
            rows = group_by_user(window, self.users, int(rng.integers(2**62)))
            full = len(rows) // size
            blocks = [rows[b * size : (b + 1) * size] for b in rng.permutation(full)]
            out.extend([*blocks, rows[full * size :]])  # a short last batch stays last
        return np.concatenate(out) if out else order


class PrefetchLoader:
    """Iterates ``loader`` on a background thread, ``depth`` batches ahead (the same batches in
    the same order; flexgr.vlm.loader.prefetch)."""

    def __init__(self, loader: DataLoader, depth: int) -> None:
        self.loader, self.depth = loader, depth

    def __iter__(self) -> Iterator[TrainBatch]:
        return prefetch(lambda: iter(self.loader), self.depth)

    def __len__(self) -> int:
        return len(self.loader)


# ---------------------------------------------------------------- what the trainer calls


def train_sequences(
    cfg: Config, data: InteractionData, split: Split, sampler: LengthSampler | None
) -> Dataset[TrainBatch]:
    """The run's training sequences: from the table, or rebuilt from the versioned store."""
    if cfg.data.source == "table":
        return TrainSequences(data, split, cfg.data.max_seq_len, sampler)
    root = versioned_dir(cfg, prepare_missing=False)
    meta = read_meta(root)
    check_store(meta, root, cfg, data, split)
    return VersionedSequences(root, meta, cfg.data.max_seq_len, cfg.versioned.cache_stripes)


def epoch_batches(cfg: Config, sequences: Dataset[TrainBatch]) -> EpochBatches:
    t = cfg.train
    if isinstance(sequences, VersionedSequences) and cfg.versioned.affinity:
        window = cfg.versioned.shuffle_window
        return AffinityBatches(len(sequences), t.batch_size, t.seed, sequences.users, window)
    return EpochBatches(len(sequences), t.batch_size, t.seed)  # type: ignore[arg-type]


def with_prefetch(cfg: Config, loader: DataLoader) -> DataLoader | PrefetchLoader:
    if cfg.data.source == "versioned" and cfg.versioned.prefetch > 0:
        return PrefetchLoader(loader, cfg.versioned.prefetch)
    return loader
