"""``prepare``: any supported source to a prepared dataset directory; ``load_prepared`` back.

Preparing is idempotent: a directory whose meta.json records the same source (same file
contents by sha256, same format and column mapping, or the same built-in dataset) is reused
as it is. ``force=True`` rebuilds.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import pyarrow as pa

from flexgr.data.catalog import read_item_file
from flexgr.data.dataset import InteractionData
from flexgr.data.errors import DataError
from flexgr.data.events import RawEvents
from flexgr.data.fetch import BUILTINS, BuiltinDataset, fetch_builtin, sha256_of
from flexgr.data.indexing import build_interactions
from flexgr.data.meta import EVENT_ORDERS, FORMAT_VERSION, Counts, DatasetMeta, SourceInfo
from flexgr.data.progress import Reporter, reporter
from flexgr.data.readers import (
    FORMATS,
    DuplicateEventsWarning,
    action_names,
    check_format_options,
    describe_duplicates,
    drop_rows,
    find_duplicates,
    infer_format,
    read_events,
)
from flexgr.data.store import read_dataset, write_dataset
from flexgr.data.synthetic import (
    GENERATORS,
    generate,
    params_as_options,
    source_digest,
    synthetic_params,
)
from flexgr.data.ties import DEFAULT_TIE_SEED, TIE_ORDERS

HOME_ENV = "FLEXGR_HOME"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The data dir also holds the download caches of the built-in datasets.
_RESERVED_NAMES = frozenset({"downloads", "wheels"})

PathLike = str | os.PathLike[str]


def data_home(data_dir: PathLike | None = None) -> Path:
    """``data_dir``, else $FLEXGR_HOME, else ~/.cache/flexgr."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flexgr"


def dataset_dir(name: str, data_dir: PathLike | None = None) -> Path:
    """Where dataset ``name`` lives (whether or not it is prepared yet)."""
    _check_name(name)
    return data_home(data_dir) / name


def prepare(
    name_or_path: PathLike,
    *,
    fmt: str | None = None,
    name: str | None = None,
    data_dir: PathLike | None = None,
    force: bool = False,
    progress: bool | None = None,
    ties: str = "hash",
    tie_seed: int = DEFAULT_TIE_SEED,
    item_file: PathLike | None = None,
    synthetic: Mapping[str, object] | None = None,
    dedup: bool = False,
    **colmap: Any,
) -> Path:
    """Prepare a built-in dataset (``"ml-1m"``, ``"ml-100k"``) or a file; return its directory.

    ``fmt`` is one of :data:`flexgr.data.FORMATS` (inferred from the file name where it can
    be); ``colmap`` is ``user_col``, ``item_col``, ``time_col``, ``rating_col``, ``sep`` and
    ``action_cols`` (integer action columns, ``"click,like"`` or a list, kept per event for
    ranking) for the ``csv`` and ``parquet`` formats. ``progress=None`` shows progress bars only on a
    terminal. Raises :class:`DataError` for bad input and FileNotFoundError for a missing file.

    Events of a user with the same timestamp are ordered by a hash of (``tie_seed``, user id,
    item id) with ``ties="hash"``; ``ties="file"`` keeps the file's order, which can leak the
    file's item order into evaluation (docs/evaluation.md). ``item_file`` (files only; the
    built-ins bring their own) lists every item of the catalogue, one raw id per line or a
    Parquet column (``item_col``), so never-rated items can be ranked and sampled too.

    A file that repeats an event (the same user, item and timestamp on two rows) is reported
    with a :class:`DuplicateEventsWarning` (how many, the first example); ``dedup=True`` (files
    only) drops the repeats, keeping the first row of each, and is recorded in meta.json.

    ``"synthetic-streaming"``, ``"synthetic-long"`` and ``"synthetic-ranking"`` (with ratings)
    are generated, not read (:mod:`flexgr.data.synthetic`); ``synthetic`` overrides their
    parameters, e.g. ``{"users": 1000, "seed": 3}`` or, for synthetic-ranking, the rating
    model's ``{"noise_sd": 0.5}``, and a changed parameter rebuilds the directory.
    """
    colmap = {key: value for key, value in colmap.items() if value is not None}
    if "action_cols" in colmap:  # one spelling in meta.json whether given as "a,b" or a list
        colmap["action_cols"] = ",".join(action_names(colmap["action_cols"]))
    if ties not in TIE_ORDERS:
        raise DataError(f"ties must be one of {', '.join(TIE_ORDERS)}, got {ties!r}")
    order = _TieOrder(ties, int(tie_seed))
    if isinstance(name_or_path, str) and name_or_path in GENERATORS:
        if fmt is not None or colmap or item_file is not None:
            raise DataError(
                f"{name_or_path} is generated; format, columns and item_file do not apply"
            )
        if dedup:
            raise DataError(f"dedup applies to files; generated {name_or_path} has no duplicates")
        return _prepare_synthetic(name_or_path, synthetic, name, data_dir, force, progress, order)
    if synthetic is not None:
        raise DataError(
            f"synthetic= applies to {', '.join(GENERATORS)}, not to {str(name_or_path)!r}"
        )
    if fmt is None and not colmap and isinstance(name_or_path, str) and name_or_path in BUILTINS:
        if item_file is not None:
            raise DataError(f"built-in {name_or_path} brings its own item file; drop item_file")
        if dedup:
            raise DataError(f"dedup applies to files; built-in {name_or_path} has no duplicates")
        return _prepare_builtin(BUILTINS[name_or_path], name, data_dir, force, progress, order)
    items = Path(item_file) if item_file is not None else None
    return _prepare_file(
        Path(name_or_path), fmt, name, data_dir, force, progress, colmap, order, items, dedup
    )


class _TieOrder:
    """How ties are ordered, as prepare was asked and as meta.json records it."""

    def __init__(self, ties: str, seed: int) -> None:
        self.ties, self.seed = ties, seed if ties == "hash" else 0

    def matches(self, meta: DatasetMeta) -> bool:
        return (meta.ties, meta.tie_seed) == (self.ties, self.seed)


def load_prepared(path: PathLike, *, data_dir: PathLike | None = None) -> InteractionData:
    """Load a prepared dataset from its directory, or by name from the data dir."""
    return _load(path, data_dir)[0]


def read_meta(path: PathLike, *, data_dir: PathLike | None = None) -> DatasetMeta:
    """The meta.json of a prepared dataset (directory or name), validated like a load."""
    return DatasetMeta.read(_resolve_prepared(path, data_dir))


def _load(path: PathLike, data_dir: PathLike | None) -> tuple[InteractionData, DatasetMeta]:
    return read_dataset(_resolve_prepared(path, data_dir))


def _resolve_prepared(path: PathLike, data_dir: PathLike | None) -> Path:
    directory = Path(path)
    if not directory.is_dir() and isinstance(path, str) and _NAME_RE.match(path):
        directory = dataset_dir(path, data_dir)
    if not directory.is_dir():
        raise DataError(f"no prepared dataset at {directory} (run: flexgr data prepare ...)")
    return directory


def _prepare_builtin(
    spec: BuiltinDataset,
    name: str | None,
    data_dir: PathLike | None,
    force: bool,
    progress: bool | None,
    order: _TieOrder,
) -> Path:
    target = dataset_dir(name or spec.name, data_dir)
    existing = _existing_meta(target)
    if (
        not force
        and _is_current(existing)
        and _same_builtin(existing.source, spec)
        and order.matches(existing)
    ):
        return target
    _refuse_to_clobber(
        target, existing, force, f"built-in {spec.name}", lambda s: s.builtin == spec.name
    )
    with reporter(progress) as report:
        fetched = fetch_builtin(spec, data_home(data_dir), report)
        data = _build(target.name, fetched.events, report, order, fetched.catalog)
        _check_expected(data, spec, fetched.source)
        _write(data, fetched.source, target, report, order)
    return target


def _prepare_synthetic(
    generator: str,
    overrides: Mapping[str, object] | None,
    name: str | None,
    data_dir: PathLike | None,
    force: bool,
    progress: bool | None,
    order: _TieOrder,
) -> Path:
    params = synthetic_params(generator, overrides)
    source = SourceInfo(
        kind="synthetic",
        location=f"flexgr.data.synthetic:{generator}",
        sha256=source_digest(generator, params),
        format="synthetic",
        builtin=generator,
        options=params_as_options(params),
    )
    target = dataset_dir(name or generator, data_dir)
    existing = _existing_meta(target)
    if (
        not force
        and _is_current(existing)
        and existing.source == source
        and order.matches(existing)
    ):
        return target
    _refuse_to_clobber(target, existing, force, generator, lambda s: s.builtin == generator)
    with reporter(progress) as report:
        with report.step(f"generating {generator} ({params.users:,} users)"):
            stream = generate(params)
        data = _build(target.name, stream.events, report, order, stream.catalog)
        _write(data, source, target, report, order)
    return target


def _prepare_file(
    path: Path,
    fmt: str | None,
    name: str | None,
    data_dir: PathLike | None,
    force: bool,
    progress: bool | None,
    colmap: dict[str, Any],
    order: _TieOrder,
    item_file: Path | None,
    dedup: bool = False,
) -> Path:
    if not path.is_file():
        if path.is_dir():
            raise DataError("is a directory, not an interaction file", path=path)
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    fmt = fmt or infer_format(path)
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path}; pass a format (one of {', '.join(FORMATS)})"
        )
    check_format_options(fmt, colmap)
    options = {key: str(value) for key, value in colmap.items() if value is not None}
    if item_file is not None:
        if not item_file.is_file():
            raise DataError("no such item file", path=item_file)
        options["item_file"] = str(item_file.resolve())
        options["item_file_sha256"] = sha256_of(item_file)
    if dedup:
        options["dedup"] = "true"  # recorded only when on, so older datasets stay current
    target = dataset_dir(name or _name_from_file(path), data_dir)
    location = str(path.resolve())
    digest = sha256_of(path)
    existing = _existing_meta(target)
    source = SourceInfo(kind="file", location=location, sha256=digest, format=fmt, options=options)
    if (
        not force
        and _is_current(existing)
        and existing.source == source
        and order.matches(existing)
    ):
        return target
    _refuse_to_clobber(target, existing, force, location, lambda s: s.location == location)
    with reporter(progress) as report:
        with report.step(f"reading {path.name}"):
            events = read_events(path, fmt, **colmap)
        events = _duplicates_checked(events, str(path), dedup)
        catalog = None
        if item_file is not None:
            with report.step(f"reading {item_file.name}"):
                catalog = read_item_file(item_file, colmap.get("item_col"))
        data = _build(target.name, events, report, order, catalog)
        _write(data, source, target, report, order)
    return target


def _duplicates_checked(events: RawEvents, display: str, dedup: bool) -> RawEvents:
    """Warn about repeated events; without them when ``dedup``."""
    found = find_duplicates(events)
    if found.count == 0:
        return events
    warnings.warn(
        describe_duplicates(found, events, display, dropped=dedup),
        DuplicateEventsWarning,
        stacklevel=4,
    )
    return drop_rows(events, found.rows) if dedup else events


def _build(
    name: str, events: RawEvents, report: Reporter, order: _TieOrder, catalog: pa.Array | None
) -> InteractionData:
    with report.step(f"indexing and sorting {len(events):,} events"):
        return build_interactions(
            name, events, ties=order.ties, tie_seed=order.seed, catalog=catalog
        )


def counts_of(data: InteractionData) -> Counts:
    return Counts(
        users=data.num_users,
        items=data.num_items,
        events=data.num_events,
        catalog_items=data.num_catalog_items,
    )


def _write(
    data: InteractionData, source: SourceInfo, target: Path, report: Reporter, order: _TieOrder
) -> None:
    import flexgr  # deferred: flexgr/__init__ pulls in the model code

    meta = DatasetMeta(
        name=target.name,
        source=source,
        counts=counts_of(data),
        created=DatasetMeta.now(),
        flexgr_version=flexgr.__version__,
        event_order=EVENT_ORDERS[order.ties],
        ties=order.ties,
        tie_seed=order.seed,
    )
    with report.step(f"writing {target}"):
        write_dataset(data, meta, target)


def _check_expected(data: InteractionData, spec: BuiltinDataset, source: SourceInfo) -> None:
    got = counts_of(data)
    if got != spec.expected:
        raise DataError(
            f"{spec.name} from {source.location} holds {got}, expected {spec.expected}; "
            "refusing a copy that differs from the published dataset"
        )


def _existing_meta(target: Path) -> DatasetMeta | None:
    try:
        return DatasetMeta.read(target)
    except DataError:
        return None


def _is_current(meta: DatasetMeta | None) -> TypeGuard[DatasetMeta]:
    return meta is not None and meta.format_version == FORMAT_VERSION


def _same_builtin(source: SourceInfo, spec: BuiltinDataset) -> bool:
    # Either source of a built-in is fine to keep; the wheel one must still be the pinned wheel.
    if source.builtin != spec.name:
        return False
    return source.kind == "url" or source.sha256 == spec.wheel.sha256


def _refuse_to_clobber(
    target: Path,
    existing: DatasetMeta | None,
    force: bool,
    new_source: str,
    same_origin: Callable[[SourceInfo], bool],
) -> None:
    """Rebuilding over the same origin (the file changed) is fine; anything else needs force."""
    if force or not target.exists():
        return
    if existing is None:
        raise DataError(
            f"{target} exists and is not a prepared dataset; pass force=True (--force) to "
            "replace it"
        )
    if not same_origin(existing.source):
        raise DataError(
            f"dataset {target.name!r} already exists from {existing.source.location}, not "
            f"{new_source}; choose another name or pass force=True (--force)"
        )


def _name_from_file(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "dataset"
    return stem


def _check_name(name: str) -> None:
    if name in _RESERVED_NAMES:
        raise DataError(f"dataset name {name!r} is reserved for flexgr's download cache")
    if not _NAME_RE.match(name):
        raise DataError(
            f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
