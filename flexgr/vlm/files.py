"""Parquet files written whole then renamed, and read through a file object that counts bytes
and checks column-chunk CRC32s as pyarrow reads them.

Why a Python file object: it is the one place that sees every byte pyarrow asks for, which
gives exact bytes-read accounting (the benchmark's read bandwidth, the pushdown tests) and lets
each column chunk be checked against the manifest's CRC *before* pyarrow decodes it. Parquet's
own page checksums do not cover page headers (a flipped header byte decodes silently), so the
manifest CRCs are the integrity check and page checksums are kept for other engines.

Readers open files with ``pre_buffer=False``: pyarrow then reads exactly one column chunk per
request instead of coalescing neighbours (which would read unprojected columns too).
"""

from __future__ import annotations

import bisect
import io
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flexgr.atomic import atomic_write_bytes
from flexgr.data.errors import DataError

_MAGIC = b"PAR1"


@dataclass
class ReadStats:
    """Bytes and read calls issued to storage, shared by the files of one reader."""

    bytes_read: int = 0
    reads: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.reads += 1


@dataclass(frozen=True)
class Chunk:
    """One column chunk of one row group: its byte range and the CRC32 the manifest recorded."""

    row_group: int
    column: str
    offset: int
    length: int
    crc32: int


class TrackedFile(io.RawIOBase):
    """Read-only file: counts every byte read into ``stats``; verifies registered chunks."""

    def __init__(self, path: Path, stats: ReadStats, chunks: Sequence[Chunk] = ()) -> None:
        super().__init__()
        self.path = path
        self.stats = stats
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._size = os.fstat(self._file.fileno()).st_size
        self.verified: set[tuple[int, str]] = set()
        self.register(chunks)

    def register(self, chunks: Sequence[Chunk]) -> None:
        """The chunks to check from now on (known once the footer has been read)."""
        self._chunks = sorted(chunks, key=lambda chunk: chunk.offset)
        self._offsets = [chunk.offset for chunk in self._chunks]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        return self._size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def read(self, size: int = -1) -> bytes:
        start = self._file.tell()
        data = self._file.read(size)
        self.stats.add(len(data))
        self._verify(start, data)
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read_at(self, offset: int, length: int) -> bytes:
        self._file.seek(offset)
        return self.read(length)

    def close(self) -> None:
        self._file.close()
        super().close()

    def _verify(self, start: int, data: bytes) -> None:
        end = start + len(data)
        first = bisect.bisect_left(self._offsets, start)
        for chunk in self._chunks[first:]:
            if chunk.offset + chunk.length > end:
                break
            piece = data[chunk.offset - start : chunk.offset - start + chunk.length]
            if zlib.crc32(piece) != chunk.crc32:
                raise DataError(
                    f"stripe {chunk.row_group}, column {chunk.column!r}: checksum mismatch "
                    "(torn or corrupted write)",
                    path=self.path,
                )
            self.verified.add((chunk.row_group, chunk.column))

    def verify(self, wanted: Sequence[Chunk]) -> None:
        """Check chunks pyarrow did not read whole in one call (it normally does)."""
        for chunk in wanted:
            if (chunk.row_group, chunk.column) not in self.verified:
                self.read_at(chunk.offset, chunk.length)
                if (chunk.row_group, chunk.column) not in self.verified:
                    raise DataError(
                        f"stripe {chunk.row_group}, column {chunk.column!r}: file too short",
                        path=self.path,
                    )


def read_footer(file: TrackedFile) -> tuple[pq.FileMetaData, int]:
    """The file's Parquet metadata and the CRC32 of its footer, reading only the footer."""
    size = file.size()
    if size < 12:
        raise DataError("not a Parquet file (too short)", path=file.path)
    tail = file.read_at(size - 8, 8)
    (length,) = struct.unpack("<i", tail[:4])
    if tail[4:] != _MAGIC or not 0 < length <= size - 12:
        raise DataError("not a Parquet file (bad footer; torn write?)", path=file.path)
    footer = file.read_at(size - 8 - length, length)
    try:
        metadata = pq.read_metadata(pa.BufferReader(_MAGIC + footer + tail))
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"damaged Parquet footer ({err})", path=file.path) from None
    return metadata, zlib.crc32(footer)


def footer_crc32(data: bytes) -> int:
    (length,) = struct.unpack("<i", data[-8:-4])
    return zlib.crc32(data[-8 - length : -8])


def chunk_layout(metadata: pq.FileMetaData) -> list[list[tuple[str, int, int]]]:
    """Per row group, per column: (name, first byte, byte length) of its column chunk."""
    layout = []
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        columns = []
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            start = (
                chunk.dictionary_page_offset
                if chunk.has_dictionary_page
                else chunk.data_page_offset
            )
            columns.append((chunk.path_in_schema, start, chunk.total_compressed_size))
        layout.append(columns)
    return layout


def chunk_crc32s(data: bytes, metadata: pq.FileMetaData) -> list[list[int]]:
    return [
        [zlib.crc32(data[start : start + length]) for _, start, length in group]
        for group in chunk_layout(metadata)
    ]


def parquet_bytes(
    parts: Sequence[pa.Table],
    schema: pa.Schema,
    delta_columns: Sequence[str] = (),
    statistics: Sequence[str] = (),
    compression: str = "zstd",
) -> tuple[bytes, pq.FileMetaData]:
    """Encode ``parts`` as one Parquet file in memory, one row group per part.

    One encoding policy for every file (tier, examples, fat rows), so that byte counts compare
    stores, not settings: ``delta_columns`` (timestamps, ids) are delta-encoded, floats are
    byte-stream-split, other integers dictionary-encoded (they are low-cardinality: actions,
    versions, users), with page checksums. Statistics only for ``statistics`` columns (those
    worth pruning on): per-chunk statistics of every column made the footers of small stripes
    cost as much as a data column.

    ``compression``: zstd by default; the tier uses lz4, see flexgr.vlm.stripes.
    """
    sink = pa.BufferOutputStream()
    floats = [f.name for f in schema if pa.types.is_floating(_leaf_type(f.type))]
    special = {*delta_columns, *floats}
    encoding = {_leaf(schema, name): "DELTA_BINARY_PACKED" for name in delta_columns}
    encoding |= {_leaf(schema, name): "BYTE_STREAM_SPLIT" for name in floats}
    with pq.ParquetWriter(
        sink,
        schema,
        compression=compression,
        use_dictionary=[name for name in schema.names if name not in special],
        column_encoding=encoding,
        write_page_checksum=True,
        write_statistics=[_leaf(schema, name) for name in statistics] or False,
    ) as writer:
        for part in parts:
            writer.write_table(part, row_group_size=max(1, part.num_rows))
    data = sink.getvalue().to_pybytes()
    return data, pq.read_metadata(pa.BufferReader(data))


def _leaf_type(kind: pa.DataType) -> pa.DataType:
    return kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else kind


def _leaf(schema: pa.Schema, name: str) -> str:
    # Encodings apply to leaf columns; a list column's leaf is "<name>.list.element".
    kind = schema.field(name).type
    nested = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    return f"{name}.list.element" if nested else name


def write_file(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename: ``path`` is absent or complete, never torn."""
    atomic_write_bytes(path, lambda handle: handle.write(data))
