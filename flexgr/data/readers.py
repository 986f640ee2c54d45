"""Readers for the interaction file formats flexgr understands.

Every reader returns :class:`RawEvents` (raw user id, raw item id, rating or NaN, integer
timestamp) in the file's row order, and raises :class:`DataError` with a one-line message naming
the file, the line and the offending text for bad input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flexgr.data import columns
from flexgr.data.delimited import Fields, TextLayout, read_delimited
from flexgr.data.errors import DataError
from flexgr.data.events import RawEvents

PathLike = str | os.PathLike[str]


def _recbole_field_name(cell: str) -> str:
    # RecBole headers type each field, "user_id:token"; only the name matters for mapping.
    return cell.strip().split(":", 1)[0]


# Built-in layouts, by format name. "csv" and "parquet" take a column mapping instead.
_LAYOUTS: dict[str, TextLayout] = {
    # ml-1m / ml-10m ratings.dat: user::item::rating::timestamp, no header, never quoted
    "movielens-dat": TextLayout("::", False, False, Fields(0, 1, 3, 2), field_count=4),
    # ml-20m / ml-25m / ml-latest ratings.csv
    "movielens-csv": TextLayout(
        ",", True, True, Fields("userId", "movieId", "timestamp", "rating")
    ),
    # ml-100k u.data: user<TAB>item<TAB>rating<TAB>timestamp, no header
    "movielens-100k": TextLayout("\t", False, False, Fields(0, 1, 3, 2), field_count=4),
    # Amazon "ratings only" CSV: user,item,rating,timestamp, no header
    "amazon": TextLayout(",", False, True, Fields(0, 1, 3, 2), field_count=4),
    # RecBole atomic .inter: TSV with typed header; values are never quoted (titles contain ")
    "recbole": TextLayout(
        "\t",
        True,
        False,
        Fields("user_id", "item_id", "timestamp", "rating"),
        header_name=_recbole_field_name,
        rating_optional=True,
    ),
}

FORMATS: tuple[str, ...] = (*_LAYOUTS, "csv", "parquet")
COLUMN_OPTIONS = ("user_col", "item_col", "time_col", "rating_col", "sep", "action_cols")


def action_names(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Action column names from ``"a,b"`` or a list; DataError for an empty or repeated name."""
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(p).strip() for p in parts)
    if not names or any(not n for n in names):
        raise DataError(f"--action-cols {value!r}: give comma-separated column names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"--action-cols names {repeated[0]!r} twice")
    return names


def read_movielens_dat(path: PathLike) -> RawEvents:
    return read_events(path, "movielens-dat")


def read_movielens_csv(path: PathLike) -> RawEvents:
    return read_events(path, "movielens-csv")


def read_movielens_100k(path: PathLike) -> RawEvents:
    return read_events(path, "movielens-100k")


def read_amazon(path: PathLike) -> RawEvents:
    return read_events(path, "amazon")


def read_recbole(path: PathLike) -> RawEvents:
    return read_events(path, "recbole")


def read_csv(
    path: PathLike,
    *,
    user_col: str,
    item_col: str,
    time_col: str,
    rating_col: str | None = None,
    sep: str = ",",
    action_cols: str | list[str] | None = None,
) -> RawEvents:
    return read_events(
        path,
        "csv",
        user_col=user_col,
        item_col=item_col,
        time_col=time_col,
        rating_col=rating_col,
        sep=sep,
        action_cols=action_cols,
    )


def read_parquet(
    path: PathLike,
    *,
    user_col: str,
    item_col: str,
    time_col: str,
    rating_col: str | None = None,
    action_cols: str | list[str] | None = None,
) -> RawEvents:
    return read_events(
        path,
        "parquet",
        user_col=user_col,
        item_col=item_col,
        time_col=time_col,
        rating_col=rating_col,
        action_cols=action_cols,
    )


def read_events(path: PathLike, fmt: str, **colmap: Any) -> RawEvents:
    """Read ``path`` in format ``fmt`` (one of :data:`FORMATS`). ``action_cols`` (csv and
    parquet) names integer action columns, kept in :attr:`RawEvents.actions`."""
    check_format_options(fmt, colmap)
    display = os.fspath(path)
    if fmt == "parquet":
        return _read_parquet(Path(path), display, colmap)
    return read_text_bytes(Path(path).read_bytes(), fmt, display, **colmap)


def read_text_bytes(data: bytes, fmt: str, display: str, **colmap: Any) -> RawEvents:
    """Read a text format from memory (e.g. a zip member); ``display`` names it in errors."""
    check_format_options(fmt, colmap)
    if fmt == "parquet":
        raise ValueError("read_text_bytes reads text formats; use read_events for parquet")
    return read_delimited(data, _layout(fmt, colmap), display)


def check_format_options(fmt: str, colmap: dict[str, Any]) -> None:
    """Reject unknown formats and options early, before any file is touched."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    unknown = sorted(set(colmap) - set(COLUMN_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected column options: {', '.join(unknown)}")
    given = {k for k, v in colmap.items() if v is not None}
    if fmt in ("csv", "parquet"):
        missing = [k for k in ("user_col", "item_col", "time_col") if k not in given]
        if missing:
            options = ", ".join("--" + k.replace("_", "-") for k in missing)
            raise DataError(f"format {fmt!r} needs the column mapping {options}")
        if fmt == "parquet" and "sep" in given:
            raise DataError("--sep does not apply to parquet")
    elif given:
        raise DataError(
            f"format {fmt!r} has a fixed layout; column options apply to 'csv' and 'parquet'"
        )


def infer_format(path: PathLike) -> str | None:
    """The format implied by the file name or header, or None when it is ambiguous."""
    p = Path(path)
    suffix = p.suffix.lower()
    by_suffix = {".dat": "movielens-dat", ".inter": "recbole", ".parquet": "parquet"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if p.name == "u.data":
        return "movielens-100k"
    if suffix == ".csv" and p.is_file():
        with p.open("rb") as f:
            head = f.readline().strip().removeprefix(b"\xef\xbb\xbf")
        if head.split(b",")[:4] == [b"userId", b"movieId", b"rating", b"timestamp"]:
            return "movielens-csv"
    return None


def _layout(fmt: str, colmap: dict[str, Any]) -> TextLayout:
    if fmt in _LAYOUTS:
        return _LAYOUTS[fmt]
    sep = colmap.get("sep") or ","
    return TextLayout(
        sep,
        True,
        len(sep) == 1,  # the csv quoting rules only exist for one-character separators
        Fields(
            colmap["user_col"],
            colmap["item_col"],
            colmap["time_col"],
            colmap.get("rating_col"),
            action_names(colmap.get("action_cols")),
        ),
    )


def _read_parquet(path: Path, display: str, colmap: dict[str, Any]) -> RawEvents:
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable Parquet file ({_one_line(err)})", path=display) from None
    roles = {"user": colmap["user_col"], "item": colmap["item_col"], "time": colmap["time_col"]}
    if colmap.get("rating_col"):
        roles["rating"] = colmap["rating_col"]
    actions = action_names(colmap.get("action_cols"))
    for name in actions:
        if name in roles.values():
            raise DataError(
                f"action column {name!r} is already used as another field", path=display
            )
        roles[f"action:{name}"] = name
    for name in roles.values():
        if name not in schema.names:
            raise DataError(
                f"missing column {name!r} (has {', '.join(map(repr, schema.names))})",
                path=display,
            )
    table = pq.read_table(path, columns=list(dict.fromkeys(roles.values())))
    if table.num_rows == 0:
        raise DataError("no data rows", path=display)

    def column(role: str) -> pa.Array:
        return table.column(roles[role]).combine_chunks()

    try:
        return RawEvents(
            users=columns.ids_from_typed(column("user"), "user"),
            items=columns.ids_from_typed(column("item"), "item"),
            ratings=(
                columns.ratings_from_typed(column("rating"))
                if "rating" in roles
                else RawEvents.unknown_ratings(table.num_rows)
            ),
            timestamps=columns.timestamps_from_typed(column("time")),
            actions={name: _typed_action(column(f"action:{name}"), name) for name in actions},
        )
    except columns.ColumnProblem as problem:
        raise DataError(
            problem.problem, path=display, line=problem.row + 1, text=problem.text, where="row"
        ) from None


def _typed_action(column: pa.Array, name: str) -> np.ndarray:
    try:
        return columns.actions_from_typed(column)
    except columns.ColumnProblem as problem:
        raise columns.ColumnProblem(
            problem.row, f"{name}: {problem.problem}", problem.text
        ) from None


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------- duplicate events


class DuplicateEventsWarning(UserWarning):
    """A file repeats events: the same user, item and timestamp on more than one row."""


@dataclass(frozen=True)
class Duplicates:
    """Rows that repeat an earlier row's (user, item, timestamp), ratings aside."""

    rows: np.ndarray  # int64, 0-based data rows of the repeats, ascending
    first: tuple[int, int] | None  # (first repeat's row, the row it repeats)

    @property
    def count(self) -> int:
        return len(self.rows)


def find_duplicates(events: RawEvents) -> Duplicates:
    """Every row whose (user, item, timestamp) an earlier row already has."""
    n = len(events)
    if n < 2:
        return Duplicates(np.empty(0, dtype=np.int64), None)
    users = pc.dictionary_encode(events.users).indices.to_numpy(zero_copy_only=False)
    items = pc.dictionary_encode(events.items).indices.to_numpy(zero_copy_only=False)
    rows = np.arange(n, dtype=np.int64)
    order = np.lexsort((rows, events.timestamps, items, users))
    same = (
        (users[order][1:] == users[order][:-1])
        & (items[order][1:] == items[order][:-1])
        & (events.timestamps[order][1:] == events.timestamps[order][:-1])
    )
    repeats = order[1:][same]
    if len(repeats) == 0:
        return Duplicates(np.empty(0, dtype=np.int64), None)
    # The row each repeat repeats: the first of its run in sorted order.
    run_start = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), np.arange(n), 0))
    origin = order[run_start[1:][same]]
    first = int(np.argmin(repeats))
    return Duplicates(np.sort(repeats), (int(repeats[first]), int(origin[first])))


def drop_rows(events: RawEvents, rows: np.ndarray) -> RawEvents:
    keep = np.ones(len(events), dtype=bool)
    keep[rows] = False
    mask = pa.array(keep)
    return RawEvents(
        users=events.users.filter(mask),
        items=events.items.filter(mask),
        ratings=events.ratings[keep],
        timestamps=events.timestamps[keep],
        actions={name: values[keep] for name, values in events.actions.items()},
    )


def describe_duplicates(found: Duplicates, events: RawEvents, display: str, dropped: bool) -> str:
    """One line: how many, the first example, and what was done with them."""
    assert found.first is not None
    repeat, origin = found.first
    user, item = events.users[repeat].as_py(), events.items[repeat].as_py()
    done = (
        "dropped (--dedup), keeping the first of each"
        if dropped
        else "kept; --dedup (dedup=True) drops the repeats"
    )
    plural = "s" if found.count != 1 else ""
    return (
        f"{display}: {found.count:,} duplicate event{plural} (same user, item and timestamp as "
        f"an earlier row); first: data row {repeat + 1} repeats row {origin + 1} (user "
        f"{user!r}, item {item!r}, timestamp {int(events.timestamps[repeat])}); {done}"
    )
