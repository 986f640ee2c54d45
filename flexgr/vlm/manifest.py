"""The tier's manifest: which files make up a version, with their sizes and checksums.

Layout of a tier directory::

    CURRENT                                  name of the committed manifest (one line)
    manifest-000005.json                     version 5: watermarks, files, sizes, CRC32s
    bucket=003/v000005-<token>.parquet       events of the users hashed to bucket 3
    _index/bucket=003/v000005-<token>.parquet   per-user stripe index of that file

A version becomes visible in one step, the atomic rename of CURRENT, after every file it names
is on disk. A crash before that leaves CURRENT naming the previous version, whose files the new
one never modified (new files always get new names). Files that are not in a manifest are
leftovers of a crashed compaction and are ignored, then collected.

Engines other than flexgr (DuckDB, Spark) read the data files the manifest lists; a glob over
``bucket=*/`` may also see old versions or crash leftovers until they are collected.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from flexgr.atomic import atomic_write_text
from flexgr.data.errors import DataError

FORMAT = "flexgr-vlm-tier"
FORMAT_VERSION = 1
CURRENT = "CURRENT"


@dataclass(frozen=True)
class DataFile:
    bucket: int
    path: str  # relative to the tier root
    bytes: int
    rows: int
    footer_crc32: int
    stripe_rows: tuple[int, ...]  # rows of each row group
    chunk_crc32: tuple[tuple[int, ...], ...]  # per row group, per column (schema order)
    index_path: str
    index_bytes: int
    index_crc32: int


@dataclass(frozen=True)
class Manifest:
    version: int  # 1 for the first compaction
    watermarks: tuple[int, ...]  # watermarks[k - 1]: version k holds events arrived before it
    num_buckets: int
    stripe_rows: int  # largest stripe of one user
    pack_rows: int  # short users share stripes up to this many rows
    columns: tuple[str, ...]  # data file schema, in order
    side_dtypes: dict[str, str]  # side feature name -> numpy dtype
    files: tuple[DataFile, ...]

    @property
    def watermark(self) -> int:
        return self.watermarks[-1]

    @property
    def side_names(self) -> tuple[str, ...]:
        return tuple(self.side_dtypes)

    def file_names(self) -> set[str]:
        return {name for entry in self.files for name in (entry.path, entry.index_path)}

    def to_json(self) -> str:
        body = asdict(self)
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **body}) + "\n"

    @staticmethod
    def from_json(text: str, path: Path) -> Manifest:
        try:
            body = json.loads(text)
            if body.pop("format") != FORMAT:
                raise DataError("not a flexgr tier manifest", path=path)
            version = body.pop("format_version")
            if version != FORMAT_VERSION:
                raise DataError(
                    f"tier format version {version}, this flexgr reads {FORMAT_VERSION}", path=path
                )
            files = tuple(
                DataFile(
                    **{
                        **entry,
                        "stripe_rows": tuple(entry["stripe_rows"]),
                        "chunk_crc32": tuple(tuple(group) for group in entry["chunk_crc32"]),
                    }
                )
                for entry in body.pop("files")
            )
            return Manifest(
                **{
                    **body,
                    "watermarks": tuple(body["watermarks"]),
                    "columns": tuple(body["columns"]),
                    "files": files,
                }
            )
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"damaged tier manifest ({err!r})", path=path) from None


def manifest_name(version: int) -> str:
    return f"manifest-{version:06d}.json"


def read_current(root: Path) -> Manifest | None:
    """The committed manifest, or None for a tier that has never been compacted."""
    pointer = root / CURRENT
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = root / name
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"CURRENT names {name!r}, which does not exist", path=root) from None
    return Manifest.from_json(text, path)


def commit(root: Path, manifest: Manifest) -> None:
    """Write the manifest, then point CURRENT at it: the one step that publishes a version."""
    name = manifest_name(manifest.version)
    atomic_write_text(root / name, manifest.to_json())
    atomic_write_text(root / CURRENT, name + "\n")
