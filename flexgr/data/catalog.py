"""Item catalogues: every item that exists, rated or not (MovieLens' movies.dat, an item file).

Ranking over the catalogue rather than over the rated items is what the reference HSTU
evaluation does for ML-1M (3,883 movies, 177 of them never rated); see docs/evaluation.md.
Only the ids are read; the other columns (titles, genres) are not used yet.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flexgr.data.errors import DataError

# Catalogue layouts by name: (field separator, header line to skip). The id is the first field.
_TEXT_LAYOUTS: dict[str, tuple[str | None, bool]] = {
    "movielens-dat": ("::", False),  # ml-1m movies.dat: id::title::genres
    "movielens-100k": ("|", False),  # ml-100k u.item: id|title|date|...
    "recbole": ("\t", True),  # RecBole .item: typed header, item_id:token first
    "lines": (None, False),  # one raw id per line
}
ITEM_FILE_FORMATS: tuple[str, ...] = (*_TEXT_LAYOUTS, "parquet")


def read_item_ids_text(data: bytes, fmt: str, display: str) -> pa.Array:
    """The distinct raw item ids of a text catalogue, as a string array."""
    if fmt not in _TEXT_LAYOUTS:
        raise DataError(f"unknown item file format {fmt!r} ({', '.join(_TEXT_LAYOUTS)})")
    sep, header = _TEXT_LAYOUTS[fmt]
    # GroupLens item files are Latin-1 (titles); ids are the first field, so decode leniently
    # there, and strictly for RecBole (UTF-8) and plain lists, whose ids may be any text.
    try:
        text = data.decode("latin-1" if fmt.startswith("movielens") else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte {err.start})", path=display) from None
    lines = text.splitlines()
    if header:
        if not lines or lines[0].split(sep or "\t", 1)[0].split(":", 1)[0] != "item_id":
            raise DataError("expected a header whose first field is item_id", path=display)
        lines = lines[1:]
    ids: list[str] = []
    for number, line in enumerate(lines, start=2 if header else 1):
        if not line.strip():
            continue
        value = (line if sep is None else line.split(sep, 1)[0]).strip()
        if not value:
            raise DataError("empty item id", path=display, line=number, text=line[:80])
        ids.append(value)
    if not ids:
        raise DataError("no item ids", path=display)
    return pa.array(list(dict.fromkeys(ids)), pa.string())


def read_item_file(path: Path, item_col: str | None = None) -> pa.Array:
    """A user's item file: Parquet (the ``item_col`` column, else the first) or a text file
    with one raw id per line."""
    display = str(path)
    if not path.is_file():
        raise DataError("no such item file" if not path.exists() else "not a file", path=display)
    if path.suffix.lower() != ".parquet":
        return read_item_ids_text(path.read_bytes(), "lines", display)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable Parquet file ({err})", path=display) from None
    column = item_col or (table.column_names[0] if table.column_names else None)
    if column is None or column not in table.column_names:
        raise DataError(f"no column {column!r} (has {', '.join(table.column_names)})", path=display)
    values = table.column(column).combine_chunks()
    if values.null_count:
        raise DataError(f"column {column!r} has empty ids", path=display)
    if pa.types.is_floating(values.type):
        raise DataError(f"column {column!r} holds floats, not ids", path=display)
    ids = values.cast(pa.string())
    if len(ids) == 0:
        raise DataError("no item ids", path=display)
    return pa.array(list(dict.fromkeys(ids.to_pylist())), pa.string())
