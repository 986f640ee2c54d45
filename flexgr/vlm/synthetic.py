"""A seeded synthetic multi-tenant log: long-tailed histories, K requests per user per day.

Each user has a background history before ``start_ts`` whose length is log-normal (median
``history_median``, capped at ``history_max``), so a few users carry thousands of events and
most a few hundred, as in production. Over ``days`` days each user makes ``requests_per_day``
requests, each showing ``impressions`` items at one timestamp (ties by construction); those
impressions, with their action bits, become history for later requests. A fraction of all
events arrives late (up to ``max_lateness`` seconds after its timestamp), so some compactions
absorb events older than ones already in the tier. Two side features: ``dwell`` (float32
seconds) and ``surface`` (int8).

Compaction runs daily: at ``start_ts`` (the background history) and at the end of each day.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from flexgr.data.errors import DataError
from flexgr.vlm.asof import RequestSpec
from flexgr.vlm.schema import ACTIONS, SIDE, Tenant

DAY = 86_400

# The three tenants: short, mid and long sequences over the same store.
TENANTS: tuple[Tenant, ...] = (
    Tenant("short", 256, ()),
    Tenant("mid", 4096, (ACTIONS,)),
    Tenant("long", 16384, (ACTIONS, SIDE)),
)


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 64
    days: int = 4
    requests_per_day: int = 4  # K
    impressions: int = 4  # candidates per request
    items: int = 200_000
    history_median: float = 400.0
    history_sigma: float = 1.4
    history_max: int = 20_000
    history_days: int = 365  # span of the background history
    tie_fraction: float = 0.1  # background events that share the previous one's timestamp
    late_fraction: float = 0.03
    max_lateness: int = 2 * DAY
    seed: int = 0
    start_ts: int = 1_700_006_400  # a UTC midnight

    def __post_init__(self) -> None:
        for name in ("users", "days", "requests_per_day", "impressions", "items", "history_max"):
            if getattr(self, name) < 1:
                raise DataError(f"synthetic log: {name} must be >= 1, got {getattr(self, name)}")
        if self.requests_per_day >= DAY:
            raise DataError(f"synthetic log: requests_per_day must be < {DAY}")
        if not (self.history_median > 0 and self.history_sigma >= 0):
            raise DataError("synthetic log: history_median must be > 0, history_sigma >= 0")
        if not (0 <= self.tie_fraction < 1 and 0 <= self.late_fraction <= 1):
            raise DataError("synthetic log: tie_fraction must be in [0, 1), late_fraction [0, 1]")

    def watermarks(self) -> list[int]:
        return [self.start_ts + day * DAY for day in range(self.days + 1)]

    def request_spec(self, log_max_len: int = 16384) -> RequestSpec:
        return RequestSpec(group_by="timestamp", start_ts=self.start_ts, log_max_len=log_max_len)


def synthetic_log(spec: SyntheticSpec) -> pa.Table:
    rng = np.random.default_rng(spec.seed)
    lengths = np.minimum(
        np.maximum(1, rng.lognormal(np.log(spec.history_median), spec.history_sigma, spec.users)),
        spec.history_max,
    ).astype(np.int64)
    users, stamps = [], []
    for user, length in enumerate(lengths.tolist()):
        gaps = rng.exponential(spec.history_days * DAY / length, length).astype(np.int64) + 1
        gaps[rng.random(length) < spec.tie_fraction] = 0
        running = np.cumsum(gaps)
        users.append(np.full(length, user))
        stamps.append(spec.start_ts - 1 - (running[-1] - running))  # the newest at start - 1
    # Requests: K distinct seconds per user and day, each with `impressions` tied events.
    per_day = spec.requests_per_day
    for day in range(spec.days):
        base = spec.start_ts + day * DAY
        for user in range(spec.users):
            seconds = np.sort(rng.choice(DAY - 1, size=per_day, replace=False)) + base
            users.append(np.full(per_day * spec.impressions, user))
            stamps.append(np.repeat(seconds, spec.impressions))
    user = np.concatenate(users).astype(np.int64)
    ts = np.concatenate(stamps).astype(np.int64)
    n = len(user)
    # Zipf-like popularity: a few items take most events.
    item = (spec.items * rng.random(n) ** 3).astype(np.int64) + 1
    late = rng.random(n) < spec.late_fraction
    arrival = ts + np.where(late, rng.integers(1, spec.max_lateness + 1, n), 0)
    action = (
        (rng.random(n) < 0.3).astype(np.int64)
        | (rng.random(n) < 0.05).astype(np.int64) << 1
        | (rng.random(n) < 0.01).astype(np.int64) << 2
    )
    order = rng.permutation(n)  # a log is not sorted; the converters must not rely on it
    return pa.table(
        {
            "user": user[order],
            "item": item[order],
            "timestamp": ts[order],
            "arrival_ts": arrival[order],
            "action": action[order],
            "dwell": rng.exponential(12.0, n).astype(np.float32)[order],
            "surface": rng.integers(0, 8, n).astype(np.int8)[order],
        }
    )
