"""Synthetic streaming interactions: the HSTU paper's Dirichlet-process data (Appendix C).

The paper's dataset: 20k items in 100 categories, 1M records of length 128 (first 90% for
training), 40% of the item ids available at the start and the rest released linearly over the
stream, each record's Dirichlet-process concentration drawn from U(1, 500). Where it leaves a
detail open, this module chooses, and says so here and in docs/data.md:

- **The process is over items.** User u's events are draws from G_u ~ DP(a_u, H_t), sampled by
  the Blackwell-MacQueen urn (the Chinese restaurant process): event j (0-based) is a fresh draw
  from the base measure with probability a_u / (a_u + j), else a copy of the item of one of the
  user's j earlier events, picked uniformly (so item k comes back in proportion to its count).
  Why over items and not over categories: the paper's best model reaches HR@10 .0893; if only
  categories recurred (items uniform inside a category of 200), no predictor could beat
  10/200 = .05, and a DP over categories with a second DP over the items of each category (same
  a_u) gives an oracle HR@10 of about .02. A DP over items gives an oracle of about .17 (known
  a_u, last event of a 128-event record), leaving room for .0893.
- **Categories shape the base measure.** A fresh draw picks a category uniformly, then an item
  uniformly among that category's items released by the event's time. Item of release rank r
  (raw id ``str(r)``) is in category ``r % categories``, so every category has its share of each
  release wave and of the initial pool.
- **Release is per event, linear in time** from the first to the last timestamp of the whole
  stream: at time t the ranks ``< R0 + (I - R0) * (t - t_min) // (t_max - t_min)`` exist, with
  R0 = floor(I * initial_fraction). No event uses an item before its release (tested).
- **Time.** Record u (raw user id ``str(u)``, so user index = stream position) starts at
  ``EPOCH_S + u * span_days * 86400 // users``; its events follow at integer gaps drawn from a
  geometric distribution with mean ``mean_gap_s`` (>= 1 s, so a user's timestamps are strictly
  increasing and tie ordering never reorders the urn's sequence).
- **Lengths.** ``min_length == max_length`` gives fixed-length records (synthetic-streaming,
  128); otherwise lengths are log-uniform integers in [min_length, max_length]
  (synthetic-long: 256..16384, median about 2k).
- **Ratings** are NaN (implicit feedback) for synthetic-streaming and synthetic-long.
  synthetic-ranking turns on the latent-score rating model of
  :mod:`flexgr.data.synthetic_ratings` (``SyntheticParams.ratings``): history-dependent
  ratings 1..5 whose noiseless part the stream keeps (``SyntheticStream.rating_truth``), so an
  oracle is computable (:mod:`flexgr.data.synthetic_oracle`). Its draws come from a fifth child
  of the SeedSequence, so the urn's events are the same with ratings on or off; off, the digest
  and meta.json options are what they were before the model existed (tested).
- The paper's record-order 90/10 split is not applied here; user ids are in stream order so a
  later split can take the last 10% of users.

Same parameters and seed give byte-identical events; the draws come from children of
``numpy.random.SeedSequence(seed)``, one per stage, in a fixed order. Bump
:data:`GENERATOR_VERSION` whenever the output for some parameters changes, so prepared copies
are rebuilt (the rating model's own changes bump its ``RATING_MODEL_VERSION``, which only the
rated generators' digests include).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from flexgr.data.errors import DataError
from flexgr.data.events import RawEvents
from flexgr.data.synthetic_ratings import (
    RATING_MODEL_VERSION,
    RatingParams,
    RatingTruth,
    check_rating_params,
    rate,
)

GENERATOR_VERSION = 1
EPOCH_S = 1_700_000_000  # 2023-11-14 UTC: plausible Unix seconds for the time-bias buckets
_DAY_S = 86_400


@dataclass(frozen=True)
class SyntheticParams:
    users: int = 10_000  # records, in stream order (paper: 1,000,000)
    items: int = 20_000
    categories: int = 100
    min_length: int = 128  # events per record (paper: 128)
    max_length: int = 128
    seed: int = 0
    initial_fraction: float = 0.4  # of the items available at the first event
    min_concentration: float = 1.0  # a_u ~ U(min, max)
    max_concentration: float = 500.0
    mean_gap_s: float = 600.0  # mean seconds between a user's consecutive events
    span_days: float = 30.0  # record start times are spread evenly over this many days
    # The rating model's scales (flexgr.data.synthetic_ratings); None: implicit feedback.
    ratings: RatingParams | None = None


GENERATORS: dict[str, SyntheticParams] = {
    "synthetic-streaming": SyntheticParams(),
    "synthetic-long": SyntheticParams(users=256, min_length=256, max_length=16_384),
    # Long histories with ratings, for the ranking models (issue 19): median length 489.
    "synthetic-ranking": SyntheticParams(
        users=6_000, min_length=64, max_length=4_096, ratings=RatingParams()
    ),
}
_URN_KEYS = tuple(f.name for f in dataclasses.fields(SyntheticParams) if f.name != "ratings")
_RATING_KEYS = tuple(f.name for f in dataclasses.fields(RatingParams))


@dataclass(frozen=True)
class SyntheticStream:
    """Generated events plus the ground truth that produced them (for tests and analysis)."""

    events: RawEvents  # user-major, each user's events in time order
    catalog: pa.Array  # raw ids of every item, released or used or not
    concentration: np.ndarray  # float64 [users], a_u of each record
    item_category: np.ndarray  # int64 [items], category of release rank r
    release_time: np.ndarray  # int64 [items], first timestamp at which rank r can be drawn
    fresh: np.ndarray  # bool [E], the event is a draw from the base measure, not a copy
    rating_truth: RatingTruth | None = None  # the rating model's parts, where ratings are on


def synthetic_params(name: str, overrides: Mapping[str, object] | None = None) -> SyntheticParams:
    """The defaults of generator ``name`` with ``overrides`` applied and checked."""
    if name not in GENERATORS:
        raise DataError(f"unknown synthetic dataset {name!r} (one of {', '.join(GENERATORS)})")
    defaults = GENERATORS[name]
    known = _URN_KEYS + (_RATING_KEYS if defaults.ratings is not None else ())
    values: dict[str, object] = {}
    rating_values: dict[str, object] = {}
    for key, value in (overrides or {}).items():
        if key in _RATING_KEYS and defaults.ratings is None:
            rated = ", ".join(n for n, p in GENERATORS.items() if p.ratings is not None)
            raise DataError(
                f"{name}: {key} is a rating-model parameter; {name} has no ratings "
                f"(generators with ratings: {rated})"
            )
        if key not in known:
            raise DataError(f"{name}: unknown parameter {key!r} (parameters: {', '.join(known)})")
        if key in _RATING_KEYS:
            default = getattr(defaults.ratings, key)
            rating_values[key] = _checked_type(name, key, value, type(default))
        else:
            values[key] = _checked_type(name, key, value, type(getattr(defaults, key)))
    if defaults.ratings is not None:
        ratings = dataclasses.replace(defaults.ratings, **rating_values)  # type: ignore[arg-type]
        values["ratings"] = ratings
    params = dataclasses.replace(defaults, **values)  # type: ignore[arg-type]
    _check_ranges(name, params)
    return params


def params_from_options(name: str, options: Mapping[str, str]) -> SyntheticParams:
    """The parameters meta.json's ``source.options`` records (:func:`params_as_options`)."""
    overrides: dict[str, object] = {}
    for key in _URN_KEYS + _RATING_KEYS:
        if key in options:
            overrides[key] = _number(options[key])
    return synthetic_params(name, overrides)


def _number(text: str) -> int | float:
    try:
        return int(text)  # a seed can exceed float64's exact integers
    except ValueError:
        return float(text)


def _checked_type(name: str, key: str, value: object, kind: type) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{name}: {key} must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise DataError(f"{name}: {key} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _check_ranges(name: str, p: SyntheticParams) -> None:
    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise DataError(f"{name}: {key} must be {rule}, got {getattr(p, key)!r}")

    need(p.users >= 1, "users", ">= 1")
    need(p.categories >= 1, "categories", ">= 1")
    need(p.items >= p.categories, "items", f">= categories ({p.categories})")
    need(p.min_length >= 1, "min_length", ">= 1")
    need(p.max_length >= p.min_length, "max_length", f">= min_length ({p.min_length})")
    need(p.seed >= 0, "seed", ">= 0")
    need(0.0 < p.initial_fraction <= 1.0, "initial_fraction", "in (0, 1]")
    # A fresh draw picks a category first, so each needs an item from the first event on.
    need(
        int(p.items * p.initial_fraction) >= p.categories,
        "initial_fraction",
        f"large enough that items * initial_fraction >= categories ({p.categories})",
    )
    need(p.min_concentration > 0.0, "min_concentration", "> 0")
    need(
        p.max_concentration >= p.min_concentration,
        "max_concentration",
        f">= min_concentration ({p.min_concentration})",
    )
    need(p.mean_gap_s >= 1.0, "mean_gap_s", ">= 1")
    need(p.span_days >= 0.0, "span_days", ">= 0")
    if p.ratings is not None:
        ratings = p.ratings

        def need_rating(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise DataError(f"{name}: {key} must be {rule}, got {getattr(ratings, key)!r}")

        check_rating_params(ratings, need_rating)


def generate(params: SyntheticParams) -> SyntheticStream:
    """Generate the events of ``params`` (validate them first with :func:`synthetic_params`)."""
    root = np.random.SeedSequence(params.seed)
    concentration_rng, length_rng, gap_rng, urn_rng = (
        np.random.default_rng(child) for child in root.spawn(4)
    )
    concentration = concentration_rng.uniform(
        params.min_concentration, params.max_concentration, params.users
    )
    lengths = _record_lengths(params, length_rng)
    starts = np.zeros(params.users + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    timestamps = _timestamps(params, lengths, starts, gap_rng)
    schedule = ReleaseSchedule.of(params, timestamps)
    released = schedule.released(timestamps)
    items, fresh = _urn(params, concentration, lengths, starts, released, urn_rng)
    users = np.repeat(np.arange(params.users, dtype=np.int64), lengths)
    truth = None
    if params.ratings is not None:
        # The fifth child: spawned after the urn's four, so theirs are unchanged.
        rating_seed = root.spawn(1)[0]
        truth = rate(params.ratings, rating_seed, params.items, users, items, lengths, starts)
    events = RawEvents(
        users=pa.array(users).cast(pa.string()),
        items=pa.array(items).cast(pa.string()),
        ratings=truth.ratings if truth is not None else RawEvents.unknown_ratings(len(items)),
        timestamps=timestamps,
    )
    ranks = np.arange(params.items, dtype=np.int64)
    return SyntheticStream(
        events=events,
        catalog=pa.array(ranks).cast(pa.string()),
        concentration=concentration,
        item_category=ranks % params.categories,
        release_time=schedule.release_times(),
        fresh=fresh,
        rating_truth=truth,
    )


def _record_lengths(params: SyntheticParams, rng: np.random.Generator) -> np.ndarray:
    if params.min_length == params.max_length:
        return np.full(params.users, params.min_length, dtype=np.int64)
    # Log-uniform on [min, max + 1), floored: every integer in range is reachable.
    logs = rng.uniform(np.log(params.min_length), np.log(params.max_length + 1), params.users)
    return np.clip(np.floor(np.exp(logs)), params.min_length, params.max_length).astype(np.int64)


def _timestamps(
    params: SyntheticParams, lengths: np.ndarray, starts: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    span_s = int(params.span_days * _DAY_S)
    record_start = EPOCH_S + np.arange(params.users, dtype=np.int64) * span_s // params.users
    gaps = rng.geometric(1.0 / params.mean_gap_s, int(starts[-1])).astype(np.int64)
    gaps[starts[:-1]] = 0  # the first event of a record is at its start
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[starts[:-1]], lengths)
    return np.repeat(record_start, lengths) + elapsed


@dataclass(frozen=True)
class ReleaseSchedule:
    """Item ranks released linearly in time: R0 at t_min, all of them at t_max."""

    items: int
    initial: int  # R0
    t_min: int
    span: int  # t_max - t_min, at least 1 so a one-instant stream divides cleanly

    @staticmethod
    def of(params: SyntheticParams, timestamps: np.ndarray) -> ReleaseSchedule:
        t_min, t_max = int(timestamps.min()), int(timestamps.max())
        initial = int(params.items * params.initial_fraction)
        return ReleaseSchedule(params.items, initial, t_min, max(t_max - t_min, 1))

    def released(self, timestamps: np.ndarray) -> np.ndarray:
        """int64 [E]: how many ranks (0..count-1) exist at each timestamp."""
        elapsed = np.maximum(timestamps - self.t_min, 0)
        growth = (self.items - self.initial) * elapsed // self.span
        return np.minimum(self.initial + growth, self.items)

    def release_times(self) -> np.ndarray:
        """int64 [items]: the first time at which each rank exists (inverse of ``released``)."""
        ranks = np.arange(self.items, dtype=np.int64)
        later = ranks - self.initial + 1  # rank r needs growth >= r - R0 + 1
        waiting = -(-later * self.span // max(self.items - self.initial, 1))  # ceil division
        return np.where(ranks < self.initial, self.t_min, self.t_min + waiting)


def _urn(
    params: SyntheticParams,
    concentration: np.ndarray,
    lengths: np.ndarray,
    starts: np.ndarray,
    released: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """The Chinese-restaurant draws of every record, step j for all records at once."""
    categories = params.categories
    items = np.empty(int(starts[-1]), dtype=np.int64)
    fresh = np.empty(int(starts[-1]), dtype=bool)
    # Records sorted longest first, so the ones still drawing at step j are a prefix.
    order = np.argsort(-lengths, kind="stable")
    row_start, row_alpha = starts[:-1][order], concentration[order]
    # still_drawing[j] = number of records longer than j.
    still_drawing = np.searchsorted(-lengths[order], -np.arange(params.max_length), side="left")
    for step in range(params.max_length):
        rows = int(still_drawing[step])
        at = row_start[:rows] + step
        is_fresh = rng.random(rows) * (row_alpha[:rows] + step) < row_alpha[:rows]
        category = rng.integers(0, categories, rows)
        in_category = (released[at] - category + categories - 1) // categories  # >= 1
        drawn = rng.integers(0, in_category) * categories + category
        if step:
            earlier = row_start[:rows] + rng.integers(0, step, rows)
            drawn = np.where(is_fresh, drawn, items[earlier])
        items[at], fresh[at] = drawn, is_fresh
    return items, fresh


def source_digest(name: str, params: SyntheticParams) -> str:
    """sha256 of what determines the output: generator, version and every parameter. Without
    ratings the spec is what it was before the rating model existed (no key for it)."""
    spec: dict[str, object] = {"generator": name, "version": GENERATOR_VERSION}
    spec.update({key: getattr(params, key) for key in _URN_KEYS})
    if params.ratings is not None:
        spec["ratings"] = {"version": RATING_MODEL_VERSION, **dataclasses.asdict(params.ratings)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def params_as_options(params: SyntheticParams) -> dict[str, str]:
    """The parameters as meta.json's ``source.options`` (strings), plus the generator version
    and, where ratings are on, the rating model's version and scales."""
    options = {"generator_version": str(GENERATOR_VERSION)}
    options.update({key: repr(getattr(params, key)) for key in _URN_KEYS})
    if params.ratings is not None:
        options["rating_model_version"] = str(RATING_MODEL_VERSION)
        ratings = dataclasses.asdict(params.ratings)
        options.update({key: repr(value) for key, value in ratings.items()})
    return options
