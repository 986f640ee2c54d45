"""flexgr train from a versioned-example store: the batches equal the table's and the fat rows'."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from flexgr.data import DataError, load_prepared, make_split, prepare
from flexgr.train import Config, apply_overrides, fit
from flexgr.train.batches import EpochBatches, TrainBatch, TrainSequences
from flexgr.train.loop import Trainer
from flexgr.train.rundir import RunDir
from flexgr.train.versioned_source import (
    AffinityBatches,
    VersionedSequences,
    check_store,
    train_batch,
)
from flexgr.vlm import FatRowSlicer, Tenant, fat_rows_from_log
from flexgr.vlm.dataset import (
    canonical_log,
    prepare_from_table,
    prepare_synthetic,
    read_meta,
    training_log,
)
from flexgr.vlm.examples import ExampleRows
from flexgr.vlm.synthetic import SyntheticSpec

FIELDS = ("item_ids", "offsets", "timestamps", "query_time", "targets", "users")
TINY_SPEC = SyntheticSpec(
    users=12, days=2, requests_per_day=3, impressions=3, items=40, history_median=20,
    history_max=120, seed=5,
)  # fmt: skip


def write_tied_csv(path: Path, users: int = 40, seed: int = 1) -> Path:
    """Random jagged users (2..30 events) with many ties: several events share a second."""
    rng = random.Random(seed)
    lines = ["user,item,ts"]
    for user in range(users):
        ts = 1_000_000 + rng.randrange(1000)
        for _ in range(rng.randint(1, 30)):
            ts += rng.choice((0, 0, 1, 7, 300))
            lines.append(f"u{user},i{rng.randrange(25)},{ts}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tied_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("tied-home")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random log repeats a few events; kept
        _prepare_tied(home)
    return home


def _prepare_tied(home: Path) -> None:
    prepare(
        str(write_tied_csv(home / "tied.csv")), fmt="csv", name="tied", data_dir=home,
        progress=False, user_col="user", item_col="item", time_col="ts",
    )  # fmt: skip


def tiny(home: Path, *overrides: str) -> Config:
    base = [
        f"data.data_dir={home}", "data.max_seq_len=12", "model.d_model=16",
        "model.num_layers=1", "model.dqk=8", "model.dv=8", "train.batch_size=8",
        "train.num_negatives=8", "train.max_epochs=1", "train.log_every=1",
        "eval.batch_size=16", "eval.item_chunk=7",
    ]  # fmt: skip
    return apply_overrides(Config(), [*base, *overrides])


def assert_same(a: TrainBatch, b: TrainBatch) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("protocol", ["loo-val", "gr-compatible"])
@pytest.mark.parametrize("max_seq_len", [1, 5, 12, 64])
def test_store_of_a_table_rebuilds_its_training_sequences(
    tied_home: Path, tmp_path: Path, protocol: str, max_seq_len: int
) -> None:
    data = load_prepared(tied_home / "tied")
    split = make_split(data, protocol)
    root = prepare_from_table(tmp_path / "store", data, split, table="x", compactions=2)
    meta = read_meta(root)
    assert meta.time_scale > 1  # the data have ties, so the refinement is exercised
    table = TrainSequences(data, split, max_seq_len)
    store = VersionedSequences(root, meta, max_seq_len, cache_stripes=4)
    assert np.array_equal(table.users, store.users)
    assert np.array_equal(table.lengths, store.lengths)
    rows = list(np.random.default_rng(0).permutation(len(table)))
    for start in range(0, len(rows), 7):
        assert_same(table[rows[start : start + 7]], store[rows[start : start + 7]])


def test_training_from_the_store_equals_training_from_the_table(
    tied_home: Path, tmp_path: Path
) -> None:
    """Same seed on CPU: same losses at every step and the same metrics (bit for bit)."""
    runs = {}
    for source in ("table", "versioned"):
        cfg = tiny(tied_home, "data.dataset=tied", f"data.source={source}", "train.max_epochs=2")
        fit(cfg, tmp_path / source, console=Console(quiet=True))
        records = RunDir(tmp_path / source).read_metrics()
        runs[source] = [
            (r["kind"], r["step"], r.get("loss"), r.get("ndcg@10"), r.get("hr@10"))
            for r in records
            if r["kind"] in ("train", "eval")
        ]
    assert len([r for r in runs["table"] if r[0] == "train"]) >= 8
    assert runs["versioned"] == runs["table"]


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "store"
    return prepare_synthetic(root, TINY_SPEC, log_max_len=64)


def test_trainer_batches_equal_the_fat_rows(synthetic_store: Path, tmp_path: Path) -> None:
    """A few steps from the synthetic store with affinity and prefetch: every batch the step
    saw equals the batch built from fat rows of the same requests (history written in full)."""
    cfg = tiny(
        tmp_path, f"data.dataset={synthetic_store}", "data.source=versioned",
        "versioned.affinity=true", "versioned.shuffle_window=16", "versioned.prefetch=2",
        "train.max_steps=5",
    )  # fmt: skip
    seen: list[TrainBatch] = []
    original = Trainer.train_step

    def recording(self: Trainer, batch: TrainBatch) -> torch.Tensor:
        seen.append(batch)
        return original(self, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", recording)
        trainers: list[Trainer] = []
        mp.setattr(Trainer, "fit", lambda self, f=Trainer.fit: trainers.append(self) or f(self))
        fit(cfg, tmp_path / "run", console=Console(quiet=True))
    assert len(seen) == 5
    trainer = trainers[0]
    assert isinstance(trainer.batches, AffinityBatches)
    # The fat rows: the same training events and requests, each history stored whole.
    meta = read_meta(synthetic_store)
    data = load_prepared(meta.table_path(synthetic_store))
    log = training_log(canonical_log(TINY_SPEC), data, make_split(data, "loo-val"))
    fat = fat_rows_from_log(log, TINY_SPEC.request_spec(meta.log_max_len))
    slicer = FatRowSlicer(Tenant("train", 12), ())
    request_of_row = trainer.sequences.rows.table.column("request_id").to_numpy()
    order = trainer.batches.order(1)
    for k, batch in enumerate(seen):
        requests = request_of_row[order[k * 8 : (k + 1) * 8]]
        rows = ExampleRows(fat.take(requests), np.full(len(requests), "fat"), requests)
        assert_same(batch, train_batch(slicer(rows), 12))
    users_per_batch = [len(set(b.users.tolist())) for b in seen]
    assert min(users_per_batch) < 8  # affinity put several examples of a user in a batch


def test_store_holds_no_validation_or_test_event(synthetic_store: Path) -> None:
    meta = read_meta(synthetic_store)
    data = load_prepared(meta.table_path(synthetic_store))
    split = make_split(data, meta.protocol)
    store = VersionedSequences(synthetic_store, meta, 64, cache_stripes=0)
    batch = store[list(range(len(store)))]
    train = set()
    for user in range(data.num_users):
        for e in range(int(data.user_offsets[user]), int(split.train_end[user])):
            train.add((user, int(data.items[e]), int(data.timestamps[e])))
    # Every input, and each sequence's last target (the others are inputs too).
    users = np.repeat(batch.users.numpy(), np.diff(batch.offsets.numpy()))
    inputs = zip(users, batch.item_ids.numpy(), batch.timestamps.numpy(), strict=True)
    last = batch.targets.numpy()[batch.offsets.numpy()[1:] - 1]
    ends = zip(batch.users.numpy(), last, batch.query_time.numpy(), strict=True)
    seen = {(int(u), int(i), int(t)) for u, i, t in [*inputs, *ends]}
    assert seen <= train
    held_out = np.r_[split.val_pos[split.val_pos >= 0], split.test_pos[split.test_pos >= 0]]
    owner = np.searchsorted(data.user_offsets, held_out, "right") - 1
    held = {(int(u), int(data.items[e]), int(data.timestamps[e])) for u, e in zip(owner, held_out)}
    assert len(held - train) > data.num_users  # most held-out events are not training events
    assert meta.events == int((split.train_end - data.user_offsets[:-1]).sum())


def test_store_that_does_not_match_the_run_is_refused(synthetic_store: Path) -> None:
    meta = read_meta(synthetic_store)
    data = load_prepared(meta.table_path(synthetic_store))
    cfg = tiny(synthetic_store, f"data.dataset={synthetic_store}", "data.source=versioned")

    def refused(cfg: Config, fragment: str) -> None:
        with pytest.raises(DataError, match=fragment):
            check_store(meta, synthetic_store, cfg, data, make_split(data, cfg.data.protocol))

    refused(apply_overrides(cfg, ["data.protocol=gr-compatible"]), "protocol loo-val")
    refused(apply_overrides(cfg, ["data.max_seq_len=65"]), "longer than the histories")
    changed = json.loads((synthetic_store / "vlm.json").read_text())
    meta = type(meta)(**{**changed, "train_digest": "00000000"})
    refused(cfg, "table has changed")


def test_affinity_batches_are_a_seeded_permutation() -> None:
    users = np.repeat(np.arange(10), 7)
    a = AffinityBatches(len(users), 8, 3, users, window=32)
    orders = [a.order(1), a.order(1), a.order(2)]
    assert np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], orders[2])
    for order in orders:
        assert np.array_equal(np.sort(order), np.arange(len(users)))
    plain = EpochBatches(len(users), 8, 3)
    distinct = [len(set(users[o[i : i + 8]])) for o in (orders[0], plain.order(1))
                for i in range(0, 64, 8)]  # fmt: skip
    assert sum(distinct[:8]) < sum(distinct[8:])
