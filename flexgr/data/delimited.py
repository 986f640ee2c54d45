"""Delimited text (CSV, TSV, ``::``) to :class:`RawEvents`.

The fast path hands the whole buffer to ``pyarrow.csv`` and checks columns vectorised. Only when
that fails do we walk the lines in Python, applying the same rules, to report the first bad line
with its number; the fast path never needs to know where lines are.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from flexgr.data import columns
from flexgr.data.errors import DataError
from flexgr.data.events import RawEvents

# Single bytes that never occur in real rating files; used to stand in for a multi-character
# separator, which pyarrow cannot split on.
_STAND_IN_SEPARATORS = (b"\x1f", b"\x1e", b"\x1d", b"\x1c", b"\t")
_BLOCK_SIZE = 16 << 20  # bigger blocks parse faster; memory is dominated by the table anyway


@dataclass(frozen=True)
class Fields:
    """Where the event fields sit: header names (files with a header) or 0-based positions.
    ``actions`` are the action columns (ranking labels and inputs), by header name."""

    user: str | int
    item: str | int
    time: str | int
    rating: str | int | None = None
    actions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Positions:
    """0-based field positions, resolved against the header where there is one."""

    user: int
    item: int
    time: int
    rating: int | None
    actions: tuple[int, ...] = ()


@dataclass(frozen=True)
class TextLayout:
    sep: str
    has_header: bool
    quoted: bool  # honour "double quotes" around fields (CSV); off for formats that never quote
    fields: Fields
    field_count: int | None = None  # exact count for headerless layouts
    header_name: Callable[[str], str] = str.strip  # header cell -> field name
    rating_optional: bool = False  # a header without the rating field means "no ratings"


def read_delimited(data: bytes, layout: TextLayout, display: str) -> RawEvents:
    """Parse ``data`` (the file's bytes); ``display`` names the file in error messages."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    if not data.strip():
        raise DataError("empty file, no data rows", path=display, line=1)
    if layout.quoted and len(layout.sep) != 1:
        raise DataError(
            f"a quoted format needs a one-character separator, got {layout.sep!r}", path=display
        )
    positions, field_count = _resolve_positions(data, layout, display)
    try:
        table = _parse_fast(data, layout, positions, field_count)
        if table.num_rows == 0:
            line = 2 if layout.has_header else 1
            raise DataError("no data rows", path=display, line=line)
        return _events_from_table(table, tuple(layout.fields.actions))
    except (pa.ArrowInvalid, columns.ColumnProblem) as fast_error:
        _locate_first_problem(data, layout, positions, field_count, display)
        # The line walk found nothing it rejects: report what pyarrow said, still on one line.
        raise DataError(f"could not parse: {_first_line(fast_error)}", path=display) from None


def _resolve_positions(data: bytes, layout: TextLayout, display: str) -> tuple[Positions, int]:
    """Map field names to 0-based positions using the header line, if the layout has one."""
    fields = layout.fields
    if not layout.has_header:
        if layout.field_count is None:
            raise ValueError("a headerless layout needs field_count")
        positions = Positions(
            user=_as_position(fields.user),
            item=_as_position(fields.item),
            time=_as_position(fields.time),
            rating=None if fields.rating is None else _as_position(fields.rating),
        )
        return positions, layout.field_count
    header_text = _decode_line(_first_raw_line(data), 1, display)
    names = [layout.header_name(cell) for cell in _split(header_text, layout)]

    def position(name: str | int) -> int:
        if name not in names:
            raise DataError(
                f"header lacks column {name!r} (has {', '.join(map(repr, names))})",
                path=display,
                line=1,
                text=header_text,
            )
        return names.index(name)  # type: ignore[arg-type]

    rating_absent = fields.rating is None or (layout.rating_optional and fields.rating not in names)
    positions = Positions(
        user=position(fields.user),
        item=position(fields.item),
        time=position(fields.time),
        rating=None if rating_absent else position(fields.rating),  # type: ignore[arg-type]
        actions=tuple(position(name) for name in fields.actions),
    )
    taken = [positions.user, positions.item, positions.time, positions.rating]
    for name, at in zip(fields.actions, positions.actions, strict=True):
        if at in taken:
            raise DataError(
                f"action column {name!r} is already used as another field (user, item, "
                "timestamp, rating or an earlier action column)",
                path=display,
                line=1,
                text=header_text,
            )
        taken.append(at)
    return positions, len(names)


def _as_position(field: str | int) -> int:
    if not isinstance(field, int):
        raise TypeError("a headerless layout names fields by position")
    return field


def _parse_fast(
    data: bytes, layout: TextLayout, positions: Positions, field_count: int
) -> pa.Table:
    sep = layout.sep.encode()
    if len(sep) != 1:
        stand_in = next((b for b in _STAND_IN_SEPARATORS if b not in data), None)
        if stand_in is None:
            raise pa.ArrowInvalid("no free byte to stand in for the separator")
        data, sep = data.replace(sep, stand_in), stand_in
    names = [f"f{i}" for i in range(field_count)]
    wanted = [
        n
        for n in (positions.user, positions.item, positions.time, positions.rating)
        if n is not None
    ] + list(positions.actions)
    return pacsv.read_csv(
        pa.BufferReader(data),
        read_options=pacsv.ReadOptions(
            column_names=names, skip_rows=1 if layout.has_header else 0, block_size=_BLOCK_SIZE
        ),
        parse_options=pacsv.ParseOptions(
            delimiter=sep.decode(), quote_char='"' if layout.quoted else False
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            include_columns=[f"f{i}" for i in wanted],
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    ).rename_columns(
        ["user", "item", "time"]
        + (["rating"] if positions.rating is not None else [])
        + [f"action.{k}" for k in range(len(positions.actions))]
    )


def _events_from_table(table: pa.Table, action_names: tuple[str, ...]) -> RawEvents:
    def column(name: str) -> pa.Array:
        return table.column(name).combine_chunks()

    ratings = (
        columns.ratings_from_text(column("rating"))
        if "rating" in table.column_names
        else RawEvents.unknown_ratings(table.num_rows)
    )
    return RawEvents(
        users=columns.ids_from_text(column("user"), "user"),
        items=columns.ids_from_text(column("item"), "item"),
        ratings=ratings,
        timestamps=columns.timestamps_from_text(column("time")),
        actions={
            name: _action_column(column(f"action.{k}"), name)
            for k, name in enumerate(action_names)
        },
    )


def _action_column(column: pa.Array, name: str) -> np.ndarray:
    try:
        return columns.actions_from_text(column)
    except columns.ColumnProblem as problem:  # name the column: there may be several
        raise columns.ColumnProblem(
            problem.row, f"{name}: {problem.problem}", problem.text
        ) from None


def _locate_first_problem(
    data: bytes, layout: TextLayout, positions: Positions, field_count: int, display: str
) -> None:
    """Walk the rows and raise a DataError for the first one the rules reject."""
    for line_number, raw_line, cells in _rows(data, layout, display):
        if len(cells) != field_count:
            raise DataError(
                f"expected {field_count} fields separated by {layout.sep!r}, found {len(cells)}",
                path=display,
                line=line_number,
                text=raw_line,
            )
        checks: list[tuple[int | None, Callable[[str], object]]] = [  # same rules as the fast path
            (positions.user, lambda v: columns.check_id(v, "user")),
            (positions.item, lambda v: columns.check_id(v, "item")),
            (positions.time, columns.parse_timestamp),
            (positions.rating, columns.parse_rating),
        ]
        checks += [
            (at, _named(name, columns.parse_action))
            for name, at in zip(layout.fields.actions, positions.actions, strict=True)
        ]
        for position, rule in checks:
            if position is None:
                continue
            try:
                rule(cells[position])  # type: ignore[index]
            except ValueError as err:
                raise DataError(str(err), path=display, line=line_number, text=raw_line) from None


def _named(name: str, rule: Callable[[str], object]) -> Callable[[str], object]:
    """``rule`` with errors prefixed by the column's name (a file may have several actions)."""

    def check(text: str) -> object:
        try:
            return rule(text)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None

    return check


def _rows(data: bytes, layout: TextLayout, display: str) -> Iterator[tuple[int, str, list[str]]]:
    """(1-based line number, the line's text, its cells) for each non-blank data row."""
    first = 2 if layout.has_header else 1
    lines = data.splitlines()  # bytes.splitlines splits on \n, \r\n and \r only
    if not layout.quoted:
        for number, raw in enumerate(lines[first - 1 :], start=first):
            text = _decode_line(raw, number, display)
            if text:  # pyarrow skips empty lines, but a line of spaces is a (bad) row
                yield number, text, text.split(layout.sep)
        return
    # Quoted fields may span lines, so let the csv module track record boundaries.
    for number, raw in enumerate(lines[first - 1 :], start=first):
        _decode_line(raw, number, display)  # pin a decoding error to its line first
    body = io.StringIO(b"\n".join(lines[first - 1 :]).decode("utf-8"), newline="")
    reader = csv.reader(body, delimiter=layout.sep, strict=False)
    start = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            number = first + reader.line_num - 1
            raise DataError(
                f"bad quoting ({err})",
                path=display,
                line=number,
                text=_decode_line(lines[number - 1], number, display),
            ) from None
        number = first + start - 1
        start = reader.line_num + 1
        if cells:  # the csv module gives [] for an empty line
            yield number, _decode_line(lines[number - 1], number, display), cells


def _split(line: str, layout: TextLayout) -> list[str]:
    if layout.quoted:
        return next(csv.reader([line], delimiter=layout.sep), [])
    return line.split(layout.sep)


def _first_raw_line(data: bytes) -> bytes:
    # Not data.splitlines()[0]: that would split the whole (possibly huge) file for one line.
    ends = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
    return data[: min(ends)] if ends else data


def _decode_line(raw: bytes, number: int, display: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        raise DataError("not valid UTF-8", path=display, line=number, text=text) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
