"""Turning parsed columns into typed arrays, with one rule set shared by the fast (vectorised)
and slow (per-line) paths so both accept and reject exactly the same values."""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Integers, or integral decimals such as RecBole's "978300760.0". Anything else (fractions,
# exponents, dates) is rejected rather than silently rounded: a timestamp we misread reorders
# a user's history.
TIMESTAMP_PATTERN = r"^\s*[+-]?[0-9]+(\.0*)?\s*$"
_TIMESTAMP_RE = re.compile(TIMESTAMP_PATTERN)
# Action values: non-negative integers (a category, a count, or a bit field of several actions).
ACTION_PATTERN = r"^\s*\+?[0-9]+(\.0*)?\s*$"
_ACTION_RE = re.compile(ACTION_PATTERN)
ACTION_MAX = 2**62  # bit fields up to 62 bits; larger values are an error, not a wrap-around
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


class ColumnProblem(Exception):
    """A value that fails the rules, at 0-based ``row`` of the parsed column."""

    def __init__(self, row: int, problem: str, text: str) -> None:
        super().__init__(row, problem, text)
        self.row = row
        self.problem = problem
        self.text = text


def parse_timestamp(text: str) -> int:
    """One timestamp by the shared rule; ValueError names what is wrong."""
    if not _TIMESTAMP_RE.match(text):
        raise ValueError(f"timestamp {text.strip()!r} is not an integer")
    value = int(text.strip().split(".")[0])
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"timestamp {text.strip()!r} does not fit in int64")
    return value


def parse_rating(text: str) -> float:
    """One rating: empty (or "nan") means unknown; infinities are rejected."""
    if not text.strip():
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"rating {text.strip()!r} is not a number") from None
    if math.isinf(value):
        raise ValueError(f"rating {text.strip()!r} is infinite")
    return value


def parse_action(text: str) -> int:
    """One action value by the shared rule: a non-negative integer; ValueError says why not."""
    if not _ACTION_RE.match(text):
        raise ValueError(f"action {text.strip()!r} is not a non-negative integer")
    value = int(text.strip().lstrip("+").split(".")[0])
    if value >= ACTION_MAX:
        raise ValueError(f"action {text.strip()!r} is too large (at most 2**62 - 1)")
    return value


def check_id(text: str, what: str) -> None:
    if not text.strip():
        raise ValueError(f"empty {what} id")


def timestamps_from_text(column: pa.Array) -> np.ndarray:
    valid = pc.match_substring_regex(column, TIMESTAMP_PATTERN)
    _raise_first_false(valid, column, "timestamp is not an integer")
    integral = pc.replace_substring_regex(pc.utf8_trim_whitespace(column), r"\.0*$", "")
    try:
        return pc.cast(integral, pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        _raise_first_python_failure(column, parse_timestamp)
        raise


def ratings_from_text(column: pa.Array) -> np.ndarray:
    trimmed = pc.utf8_trim_whitespace(column)
    as_null = pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)
    try:
        values = pc.cast(as_null, pa.float64())
    except pa.ArrowInvalid:
        _raise_first_python_failure(column, parse_rating)
        raise
    out = values.to_numpy(zero_copy_only=False)
    if np.isinf(out).any():
        _raise_first_python_failure(column, parse_rating)
    return out.astype(np.float32)


def actions_from_text(column: pa.Array) -> np.ndarray:
    valid = pc.match_substring_regex(column, ACTION_PATTERN)
    _raise_first_false(valid, column, "action is not a non-negative integer")
    integral = pc.replace_substring_regex(pc.utf8_trim_whitespace(column), r"\.0*$", "")
    try:
        values = pc.cast(pc.utf8_ltrim(integral, "+"), pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        _raise_first_python_failure(column, parse_action)
        raise
    if len(values) and values.max() >= ACTION_MAX:
        _raise_first_python_failure(column, parse_action)
    return values


def actions_from_typed(column: pa.Array) -> np.ndarray:
    """Action values from a typed (Parquet) column: integers or booleans, never missing."""
    _raise_first_null(column, "missing action value")
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return actions_from_text(pc.cast(column, pa.string()))
    if pa.types.is_boolean(kind):
        return pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
    if pa.types.is_integer(kind):
        values = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
        bad = (values < 0) | (values >= ACTION_MAX)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            problem = "action is not a non-negative integer below 2**62"
            raise ColumnProblem(row, problem, str(values[row]))
        return values
    raise ColumnProblem(0, f"action column has unsupported type {kind}", str(column[0]))


def ids_from_text(column: pa.Array, what: str) -> pa.Array:
    present = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    _raise_first_false(present, column, f"empty {what} id")
    return column


def timestamps_from_typed(column: pa.Array) -> np.ndarray:
    """Timestamps from a typed (Parquet) column, in whole seconds for datetime types."""
    _raise_first_null(column, "missing timestamp")
    kind = column.type
    if pa.types.is_date(kind):
        column, kind = pc.cast(column, pa.timestamp("s")), pa.timestamp("s")
    if pa.types.is_timestamp(kind):
        # The model's time-bias buckets are calibrated in seconds, like MovieLens timestamps.
        ticks = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
        return np.floor_divide(ticks, _UNITS_PER_SECOND[kind.unit])
    if pa.types.is_integer(kind):
        return pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
    if pa.types.is_floating(kind):
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(values) | (np.floor(values) != values) | (np.abs(values) >= 2.0**63)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ColumnProblem(row, "timestamp is not an integer", repr(values[row]))
        return values.astype(np.int64)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return timestamps_from_text(pc.cast(column, pa.string()))
    raise ColumnProblem(0, f"timestamp column has unsupported type {kind}", str(column[0]))


def ratings_from_typed(column: pa.Array) -> np.ndarray:
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return ratings_from_text(pc.cast(column, pa.string()))
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)):
        raise ColumnProblem(0, f"rating column has unsupported type {kind}", str(column[0]))
    values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    return values.astype(np.float32)  # nulls come out as NaN: unknown rating


def ids_from_typed(column: pa.Array, what: str) -> pa.Array:
    _raise_first_null(column, f"missing {what} id")
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.dictionary_decode()
        kind = column.type
    if not (
        pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
    ):
        raise ColumnProblem(0, f"{what} id column has unsupported type {kind}", str(column[0]))
    return ids_from_text(pc.cast(column, pa.string()), what)


def _raise_first_false(mask: pa.Array, column: pa.Array, problem: str) -> None:
    if len(mask) == 0 or pc.all(mask).as_py():
        return
    row = pc.index(mask, False).as_py()
    raise ColumnProblem(row, problem, str(column[row].as_py()))


def _raise_first_null(column: pa.Array, problem: str) -> None:
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise ColumnProblem(row, problem, "")


def _raise_first_python_failure(column: pa.Array, rule: object) -> None:
    # Only reached once a vectorised check has failed, so a Python loop here costs nothing normally.
    for row, value in enumerate(column.to_pylist()):
        try:
            rule(value)  # type: ignore[operator]
        except ValueError as err:
            raise ColumnProblem(row, str(err), value) from None
