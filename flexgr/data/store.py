"""The on-disk layout of a prepared dataset, written atomically and validated on load.

<dir>/events.parquet  user int32, item int32 (1..I), rating float32, timestamp int64, and one
                      int64 column "action.NAME" per action column of the source (none for
                      MovieLens, whose action is the rating); older directories simply have none
<dir>/users.parquet   user int32 (0..U-1), raw_id string
<dir>/items.parquet   item int32 (1..C), raw_id string, rated bool (true for 1..I, the items
                      some event mentions; false for the catalogue's never-rated items I+1..C)
<dir>/meta.json       see flexgr.data.meta
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flexgr.data.dataset import InteractionData
from flexgr.data.errors import DataError
from flexgr.data.meta import FORMAT_VERSION, DatasetMeta

EVENTS_FILE = "events.parquet"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
ACTION_PREFIX = "action."  # events.parquet column of action NAME: "action.NAME"
_TEMP_SUFFIX = ".partial"
# A build directory this old belongs to a process that was killed; nothing finishes it any more.
_STALE_TEMP_SECONDS = 6 * 3600


def write_dataset(data: InteractionData, meta: DatasetMeta, target: Path) -> None:
    """Write ``data`` to ``target`` so that ``target`` is either absent, the old, or the new
    complete dataset, never a mix: everything is built in a sibling directory, then renamed."""

    def write_files(directory: Path) -> None:
        user_column = np.repeat(
            np.arange(data.num_users, dtype=np.int32), np.diff(data.user_offsets)
        )
        events = pa.table(
            {
                "user": pa.array(user_column, pa.int32()),
                "item": pa.array(data.items, pa.int32()),
                "rating": pa.array(data.ratings, pa.float32()),
                "timestamp": pa.array(data.timestamps, pa.int64()),
                **{
                    ACTION_PREFIX + name: pa.array(values, pa.int64())
                    for name, values in data.actions.items()
                },
            }
        )
        pq.write_table(events, directory / EVENTS_FILE)
        users = pa.table(
            {
                "user": pa.array(np.arange(data.num_users), pa.int32()),
                "raw_id": pa.array(data.user_ids, pa.string()),
            }
        )
        pq.write_table(users, directory / USERS_FILE)
        rated = np.arange(1, data.num_catalog_items + 1) <= data.num_items
        items = pa.table(
            {
                "item": pa.array(np.arange(1, data.num_catalog_items + 1), pa.int32()),
                "raw_id": pa.array(data.pool_item_ids("catalog"), pa.string()),
                "rated": pa.array(rated, pa.bool_()),
            }
        )
        pq.write_table(items, directory / ITEMS_FILE)
        meta.write(directory)  # last: its presence says the rest is there

    replace_directory_atomically(target, write_files)


def replace_directory_atomically(target: Path, write: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    building = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_TEMP_SUFFIX, dir=target.parent)
    )
    try:
        write(building)
        _fsync_directory_files(building)
        if target.exists():
            # POSIX cannot rename a directory over a non-empty one: move the old one aside first,
            # and put it back if the swap fails.
            retired = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
            os.rename(target, retired)
            try:
                os.rename(building, target)
            except BaseException:
                os.rename(retired, target)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def remove_stale_temporaries(target: Path) -> None:
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*"):
        if not (leftover.name.endswith(_TEMP_SUFFIX) or leftover.name.endswith(".old")):
            continue
        try:
            if now - leftover.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process cleaned it up first


def _fsync_directory_files(directory: Path) -> None:
    # Without this a power cut after the rename can leave the new names pointing at empty files.
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def read_dataset(directory: Path) -> tuple[InteractionData, DatasetMeta]:
    meta = DatasetMeta.read(directory)
    if meta.format_version != FORMAT_VERSION:
        raise DataError(
            f"prepared with format version {meta.format_version}, this flexgr reads "
            f"{FORMAT_VERSION}; prepare it again with force=True",
            path=directory,
        )
    try:
        events = pq.read_table(directory / EVENTS_FILE)
        users = pq.read_table(directory / USERS_FILE)
        items = pq.read_table(directory / ITEMS_FILE)
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"damaged prepared dataset ({err})", path=directory) from None
    user_column = events.column("user").to_numpy()
    user_ids = _raw_ids_in_order(users, "user", 0, directory)
    all_item_ids = _raw_ids_in_order(items, "item", 1, directory)
    num_rated = _rated_prefix(items, directory)
    item_ids, catalog_ids = all_item_ids[:num_rated], all_item_ids[num_rated:]
    data = InteractionData(
        name=meta.name,
        user_offsets=_offsets(user_column, len(user_ids), directory),
        items=events.column("item").to_numpy().astype(np.int32, copy=False),
        timestamps=events.column("timestamp").to_numpy().astype(np.int64, copy=False),
        ratings=events.column("rating").to_numpy().astype(np.float32, copy=False),
        num_items=len(item_ids),
        user_ids=user_ids,
        item_ids=item_ids,
        catalog_ids=catalog_ids,
        actions={
            name[len(ACTION_PREFIX) :]: events.column(name).to_numpy().astype(np.int64, copy=False)
            for name in events.column_names
            if name.startswith(ACTION_PREFIX)
        },
    )
    _check_consistent(data, meta, directory)
    return data, meta


def _raw_ids_in_order(table: pa.Table, key: str, base: int, directory: Path) -> list[str]:
    index = table.column(key).to_numpy()
    if not np.array_equal(index, np.arange(base, base + len(index))):
        raise DataError(f"damaged prepared dataset ({key} index is not {base}..n)", path=directory)
    return table.column("raw_id").to_pylist()


def _rated_prefix(items: pa.Table, directory: Path) -> int:
    """How many items are rated; they must come first (1..I), the unrated catalogue after."""
    if "rated" not in items.column_names:
        raise DataError("damaged prepared dataset (items.parquet has no rated column)", path=directory)
    rated = items.column("rated").to_numpy(zero_copy_only=False).astype(bool)
    count = int(rated.sum())
    if not rated[:count].all():
        raise DataError(
            "damaged prepared dataset (rated items are not numbered first)", path=directory
        )
    return count


def _offsets(user_column: np.ndarray, num_users: int, directory: Path) -> np.ndarray:
    if len(user_column) and (
        np.any(np.diff(user_column) < 0) or user_column[-1] >= num_users or user_column[0] < 0
    ):
        raise DataError("damaged prepared dataset (events not grouped by user)", path=directory)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_column, minlength=num_users), out=offsets[1:])
    return offsets


def _check_consistent(data: InteractionData, meta: DatasetMeta, directory: Path) -> None:
    counts = meta.counts
    if (data.num_users, data.num_items, data.num_events, data.num_catalog_items) != (
        counts.users,
        counts.items,
        counts.events,
        counts.catalog_items,
    ):
        raise DataError("damaged prepared dataset (counts differ from meta.json)", path=directory)
    if data.num_events and (data.items.min() < 1 or data.items.max() > data.num_items):
        raise DataError("damaged prepared dataset (item index out of 1..num_items)", path=directory)
    same_user = np.diff(data.timestamps) < 0
    same_user[data.user_offsets[1:-1] - 1] = False  # a new user may start earlier in time
    if same_user.any():
        raise DataError("damaged prepared dataset (events out of time order)", path=directory)
