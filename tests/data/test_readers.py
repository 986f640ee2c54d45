from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from flexgr.data import DataError, read_events
from flexgr.data.readers import (
    infer_format,
    read_amazon,
    read_csv,
    read_movielens_100k,
    read_movielens_csv,
    read_movielens_dat,
    read_parquet,
    read_recbole,
    read_text_bytes,
)

WriteFile = Callable[[str, bytes | str], Path]
RECBOLE_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def columns_of(events) -> tuple[list[str], list[str], list[float], list[int]]:
    return (
        events.users.to_pylist(),
        events.items.to_pylist(),
        events.ratings.tolist(),
        events.timestamps.tolist(),
    )


def assert_one_line_error(
    err: pytest.ExceptionInfo[DataError], path: Path | str, line: int, text: str
) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert f"line {line}" in message
    assert text in message
    assert err.value.line == line
    assert isinstance(err.value, ValueError)


# ---- well-formed input ------------------------------------------------------------------------


def test_movielens_dat(write_file: WriteFile) -> None:
    path = write_file(
        "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
    )
    events = read_movielens_dat(path)
    assert columns_of(events) == (
        ["1", "1", "2"],
        ["1193", "661", "1193"],
        [5.0, 3.0, 4.0],
        [978300760, 978302109, 978298413],
    )
    assert events.ratings.dtype == np.float32
    assert events.timestamps.dtype == np.int64


def test_movielens_csv(write_file: WriteFile) -> None:
    path = write_file(
        "ratings.csv",
        "userId,movieId,rating,timestamp\r\n1,2,3.5,1112486027\r\n1,29,3.5,1112484676\r\n",
    )
    assert columns_of(read_movielens_csv(path)) == (
        ["1", "1"],
        ["2", "29"],
        [3.5, 3.5],
        [1112486027, 1112484676],
    )


def test_movielens_csv_columns_in_other_order(write_file: WriteFile) -> None:
    path = write_file("r.csv", "timestamp,rating,movieId,userId\n10,4,7,3\n")
    assert columns_of(read_movielens_csv(path)) == (["3"], ["7"], [4.0], [10])


def test_movielens_100k_u_data(write_file: WriteFile) -> None:
    path = write_file("u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    assert columns_of(read_movielens_100k(path)) == (
        ["196", "186"],
        ["242", "302"],
        [3.0, 3.0],
        [881250949, 891717742],
    )


def test_amazon_csv_with_quoted_field(write_file: WriteFile) -> None:
    path = write_file(
        "ratings_Books.csv", 'A2SUAM1J3GNN3B,0000013714,5.0,1400457600\n"A,1",B2,1.0,7\n'
    )
    assert columns_of(read_amazon(path)) == (
        ["A2SUAM1J3GNN3B", "A,1"],
        ["0000013714", "B2"],
        [5.0, 1.0],
        [1400457600, 7],
    )


def test_recbole_inter_with_float_timestamps_and_crlf(write_file: WriteFile) -> None:
    body = (
        RECBOLE_HEADER.replace("\n", "\r\n")
        + '1m_1\tOne Flew (1975)\t5\t978300760.0\r\n1m_2\tHeat "95"\t3\t978302109\r\n'
    )
    events = read_recbole(write_file("ml.inter", body))
    assert columns_of(events) == (
        ["1m_1", "1m_2"],
        ["One Flew (1975)", 'Heat "95"'],
        [5.0, 3.0],
        [978300760, 978302109],
    )


def test_recbole_maps_fields_by_name_and_ignores_extra_fields(write_file: WriteFile) -> None:
    body = "timestamp:float\tlabel:float\titem_id:token\tuser_id:token\n5.\t1\ti9\tu1\n"
    assert columns_of(read_recbole(write_file("x.inter", body))) == (
        ["u1"],
        ["i9"],
        [pytest.approx(float("nan"), nan_ok=True)],
        [5],
    )


def test_recbole_without_rating_gives_nan(write_file: WriteFile) -> None:
    events = read_recbole(
        write_file("x.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t3\n")
    )
    assert np.isnan(events.ratings).all()


def test_generic_csv_with_mapping_and_separator(write_file: WriteFile) -> None:
    path = write_file("log.csv", "ts;who;what;stars;extra\n100;u1;i1;4;x\n90;u2;i2;;y\n")
    events = read_csv(
        path, user_col="who", item_col="what", time_col="ts", rating_col="stars", sep=";"
    )
    users, items, ratings, stamps = columns_of(events)
    assert (users, items, stamps) == (["u1", "u2"], ["i1", "i2"], [100, 90])
    assert ratings[0] == 4.0 and np.isnan(ratings[1])


def test_generic_csv_multichar_separator(write_file: WriteFile) -> None:
    path = write_file("log.txt", "u||i||t\na||b||1\n")
    events = read_csv(path, user_col="u", item_col="i", time_col="t", sep="||")
    assert columns_of(events)[:2] == (["a"], ["b"])
    assert np.isnan(events.ratings).all()


def test_parquet_with_typed_columns(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    table = pa.table(
        {
            "uid": pa.array([10, 11], pa.int64()),
            "iid": pa.array(["a", "b"]).dictionary_encode(),
            "when": pa.array([1_000_000, 2_500_000], pa.timestamp("ms")),
            "score": pa.array([1, None], pa.int32()),
        }
    )
    pq.write_table(table, path)
    events = read_parquet(path, user_col="uid", item_col="iid", time_col="when", rating_col="score")
    users, items, ratings, stamps = columns_of(events)
    assert (users, items, stamps) == (["10", "11"], ["a", "b"], [1000, 2500])  # datetimes -> s
    assert ratings[0] == 1.0 and np.isnan(ratings[1])


def test_parquet_float_timestamps_must_be_integral(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"u": ["a", "b"], "i": ["x", "y"], "t": [1.0, 2.5]}), path)
    with pytest.raises(DataError) as err:
        read_parquet(path, user_col="u", item_col="i", time_col="t")
    assert "row 2" in str(err.value) and "2.5" in str(err.value) and str(path) in str(err.value)


def test_blank_lines_and_bom_are_tolerated(write_file: WriteFile) -> None:
    path = write_file("r.csv", b"\xef\xbb\xbfuserId,movieId,rating,timestamp\n1,2,3,4\n\n5,6,7,8\n")
    assert columns_of(read_movielens_csv(path))[0] == ["1", "5"]


def test_read_text_bytes_names_the_member_in_errors() -> None:
    with pytest.raises(DataError, match=r"pkg\.whl!data/x\.inter, line 2"):
        read_text_bytes(RECBOLE_HEADER.encode() + b"u\ti\t1\n", "recbole", "pkg.whl!data/x.inter")


def test_infer_format(write_file: WriteFile, tmp_path: Path) -> None:
    assert infer_format(tmp_path / "ratings.dat") == "movielens-dat"
    assert infer_format(tmp_path / "ml-1m.inter") == "recbole"
    assert infer_format(tmp_path / "x.parquet") == "parquet"
    assert infer_format(tmp_path / "u.data") == "movielens-100k"
    assert (
        infer_format(write_file("ratings.csv", "userId,movieId,rating,timestamp\n"))
        == "movielens-csv"
    )
    assert infer_format(write_file("other.csv", "a,b,c,d\n")) is None


# ---- malformed input: one line naming file, line number and text ------------------------------


@pytest.mark.parametrize(
    ("fmt", "name", "content", "line", "text"),
    [
        ("movielens-dat", "a.dat", "1::2::5::100\n1::3::4\n", 2, "1::3::4"),
        ("movielens-dat", "b.dat", "1::2::5::100\n1::2::3::4::5\n", 2, "1::2::3::4::5"),
        ("movielens-dat", "c.dat", "1::2::5::100\n   \n", 2, "'   '"),
        ("movielens-csv", "d.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2\n", 3, "1,2"),
        ("amazon", "e.csv", "u,i,1,2\nu,i,1,2,3\n", 2, "u,i,1,2,3"),
        ("recbole", "f.inter", RECBOLE_HEADER + "u\ti\t1\n", 2, "u\\ti\\t1"),
        ("movielens-100k", "u.data", "1\t2\t3\t4\n\n1\t2\t3\n", 3, "1\\t2\\t3"),
    ],
)
def test_wrong_field_count(
    write_file: WriteFile, fmt: str, name: str, content: str, line: int, text: str
) -> None:
    path = write_file(name, content)
    with pytest.raises(DataError, match="expected .* fields") as err:
        read_events(path, fmt)
    assert_one_line_error(err, path, line, text)


@pytest.mark.parametrize(
    ("fmt", "content", "missing"),
    [
        ("movielens-csv", "userId,movieId,rating\n1,2,3\n", "timestamp"),
        ("recbole", "user_id:token\trating:float\ttimestamp:float\nu\t1\t2\n", "item_id"),
        ("recbole", "196\t242\t3\t881250949\n", "user_id"),  # no header at all
    ],
)
def test_missing_column(write_file: WriteFile, fmt: str, content: str, missing: str) -> None:
    path = write_file("x.data", content)
    with pytest.raises(DataError, match=f"header lacks column '{missing}'") as err:
        read_events(path, fmt)
    assert_one_line_error(err, path, 1, content.splitlines()[0].split("\t")[0])


def test_missing_column_generic_csv(write_file: WriteFile) -> None:
    path = write_file("log.csv", "user,item,time\nu,i,1\n")
    with pytest.raises(DataError) as err:
        read_csv(path, user_col="user", item_col="item", time_col="when")
    assert_one_line_error(err, path, 1, "user,item,time")
    assert "'when'" in str(err.value)


def test_missing_column_parquet(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"u": ["a"], "i": ["b"]}), path)
    with pytest.raises(DataError, match="missing column 't'") as err:
        read_parquet(path, user_col="u", item_col="i", time_col="t")
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("fmt", "name", "content", "line", "bad"),
    [
        ("movielens-dat", "a.dat", "1::2::5::100\n1::3::4::abc\n", 2, "abc"),
        ("movielens-dat", "b.dat", "1::2::5::100\n1::3::4::\n", 2, "''"),
        (
            "movielens-csv",
            "c.csv",
            "userId,movieId,rating,timestamp\n1,2,3,2001-09-09\n",
            2,
            "2001-09-09",
        ),
        (
            "recbole",
            "d.inter",
            RECBOLE_HEADER + "u\ti\t1\t97830.0\nu\ti\t1\t978300760.5\n",
            3,
            "978300760.5",
        ),
        ("amazon", "e.csv", "u,i,1,1e9\n", 1, "1e9"),
        ("amazon", "f.csv", "u,i,1,99999999999999999999\n", 1, "99999999999999999999"),
    ],
)
def test_non_numeric_timestamp(
    write_file: WriteFile, fmt: str, name: str, content: str, line: int, bad: str
) -> None:
    path = write_file(name, content)
    with pytest.raises(DataError, match="timestamp") as err:
        read_events(path, fmt)
    assert_one_line_error(err, path, line, bad)


@pytest.mark.parametrize(
    ("fmt", "content", "line"),
    [
        ("movielens-dat", "", 1),
        ("movielens-dat", "\n\n  \n", 1),
        ("movielens-csv", "userId,movieId,rating,timestamp\n", 2),
        ("recbole", RECBOLE_HEADER, 2),
        ("recbole", RECBOLE_HEADER + "\n\n", 2),
    ],
)
def test_empty_file(write_file: WriteFile, fmt: str, content: str, line: int) -> None:
    path = write_file("empty.txt", content)
    with pytest.raises(DataError, match="no data rows") as err:
        read_events(path, fmt)
    message = str(err.value)
    assert str(path) in message and f"line {line}" in message and "\n" not in message


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pq.write_table(
        pa.table(
            {
                "u": pa.array([], pa.string()),
                "i": pa.array([], pa.string()),
                "t": pa.array([], pa.int64()),
            }
        ),
        path,
    )
    with pytest.raises(DataError, match="no data rows"):
        read_parquet(path, user_col="u", item_col="i", time_col="t")


def test_bad_rating(write_file: WriteFile) -> None:
    path = write_file("r.dat", "1::2::5::100\n1::3::five::100\n")
    with pytest.raises(DataError, match="rating 'five' is not a number") as err:
        read_movielens_dat(path)
    assert_one_line_error(err, path, 2, "1::3::five::100")


def test_empty_id(write_file: WriteFile) -> None:
    path = write_file("r.csv", "u,i,1,2\n,i,1,2\n")
    with pytest.raises(DataError, match="empty user id") as err:
        read_amazon(path)
    assert_one_line_error(err, path, 2, ",i,1,2")


def test_invalid_utf8(write_file: WriteFile) -> None:
    path = write_file("r.dat", b"1::2::5::100\n1::\xff::5::100\n")
    with pytest.raises(DataError, match="not valid UTF-8") as err:
        read_movielens_dat(path)
    assert_one_line_error(err, path, 2, "1::")


def test_line_numbers_count_blank_lines(write_file: WriteFile) -> None:
    path = write_file("r.dat", "1::2::5::100\n\n\n1::2::5::x\n")
    with pytest.raises(DataError) as err:
        read_movielens_dat(path)
    assert err.value.line == 4


def test_long_offending_line_is_shortened(write_file: WriteFile) -> None:
    path = write_file("r.csv", "u,i,1,2\n" + "x" * 10_000 + "\n")
    with pytest.raises(DataError) as err:
        read_amazon(path)
    assert len(str(err.value)) < 400


def test_unknown_format_and_options() -> None:
    with pytest.raises(DataError, match="unknown format 'xml'"):
        read_events("whatever", "xml")
    with pytest.raises(DataError, match="needs the column mapping --time-col"):
        read_events("whatever", "csv", user_col="u", item_col="i")
    with pytest.raises(DataError, match="fixed layout"):
        read_events("whatever", "movielens-dat", user_col="u")
    with pytest.raises(TypeError, match="user_column"):
        read_events("whatever", "csv", user_column="u")


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_movielens_dat(tmp_path / "nope.dat")


# ---- speed ------------------------------------------------------------------------------------


def test_reads_a_million_rows_quickly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 1_000_209  # ML-1M's size
    parts = [
        pa.array(rng.integers(1, 6041, n)).cast(pa.string()),
        pa.array(rng.integers(1, 3953, n)).cast(pa.string()),
        pa.array(rng.integers(1, 6, n)).cast(pa.string()),
        pa.array(rng.integers(956_703_932, 1_046_454_590, n)).cast(pa.string()),
    ]
    lines = pc.binary_join_element_wise(*parts, "::")
    path = tmp_path / "ratings.dat"
    path.write_bytes(("\n".join(lines.to_pylist()) + "\n").encode())
    start = time.perf_counter()
    events = read_movielens_dat(path)
    elapsed = time.perf_counter() - start
    assert len(events) == n
    assert events.timestamps[-1] == int(parts[3][-1].as_py())
    assert elapsed < 5.0, f"reading 1M rows took {elapsed:.2f} s"
