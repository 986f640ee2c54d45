"""VISTA's summary cache: stage-1 summaries quantised row-wise, stored by (user_id, version_ts),
read back by stage 2 instead of recomputing them from the history.

- :func:`quantise` / :func:`dequantise`: symmetric row-wise int8 (or int4, two per byte), one
  fp32 scale per summary row: ``x ~= scale_r * q``, ``scale_r = max_j |x_rj| / 127`` (int4: 7),
  so an element's error is at most ``scale_r / 2``.
- :class:`SummaryStore`: the interface a key-value store implements (``put``, ``get``,
  ``versions``); :class:`DirectorySummaryStore` is the local one, a file per (user, version)
  written atomically (temp file, fsync, rename: a reader never sees a torn summary).
- :func:`export_summaries`: every user's summary of a split from a trained model;
  :func:`predict_cached`: a split's predictions with stage 2 reading the store
  (:func:`score_summaries`, which ``flexgr serve --summaries`` scores through too).

A version ``version_ts`` is the timestamp of the newest event the summary read: a summary of
version v holds the user's events up to v, and a reader at time t takes the newest version
``<= t`` (:func:`latest_version`). docs/vista.md#summary-cache.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from flexgr.atomic import atomic_write_bytes
from flexgr.ranking.batch import ranges, request_batch
from flexgr.ranking.evaluate import predict_requests
from flexgr.ranking.metrics import task_metrics
from flexgr.ranking.requests import Which
from flexgr.ranking.setup import RankingData
from flexgr.ranking.tasks import predictions
from flexgr.vista.model import VistaRanker, prepare, prepare_stage2

BITS = (8, 4)
_QMAX = {8: 127, 4: 7}
_MAGIC = b"VSUM"
_HEADER = struct.Struct("<4sBBII")  # magic, format version, bits, rows, dim


@dataclass(frozen=True, eq=False)
class QuantisedSummary:
    """One user's summary: ``values`` int8 [S, d] (bits 8) or uint8 [S, ceil(d / 2)] (bits 4,
    element 2j in the low nibble, 2j + 1 in the high one), ``scales`` float32 [S]."""

    values: np.ndarray
    scales: np.ndarray
    bits: int
    dim: int

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(_MAGIC, 1, self.bits, self.scales.shape[0], self.dim)
        return header + self.scales.astype("<f4").tobytes() + self.values.tobytes()

    @staticmethod
    def from_bytes(data: bytes, source: str = "summary") -> QuantisedSummary:
        if len(data) < _HEADER.size:
            raise ValueError(f"{source}: not a VISTA summary (too short)")
        magic, version, bits, rows, dim = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != 1 or bits not in BITS:
            raise ValueError(f"{source}: not a VISTA summary (bad header)")
        width = dim if bits == 8 else (dim + 1) // 2
        scales_end = _HEADER.size + 4 * rows
        if len(data) != scales_end + rows * width:
            raise ValueError(f"{source}: truncated VISTA summary")
        scales = np.frombuffer(data, "<f4", rows, _HEADER.size).astype(np.float32)
        dtype = np.int8 if bits == 8 else np.uint8
        values = np.frombuffer(data, dtype, rows * width, scales_end).reshape(rows, width)
        return QuantisedSummary(values.copy(), scales, bits, dim)


def quantise(summary_SD: Tensor | np.ndarray, bits: int = 8) -> QuantisedSummary:
    """Row-wise symmetric quantisation of one summary [S, d]."""
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    x = summary_SD.detach().float().cpu().numpy() if isinstance(summary_SD, Tensor) else summary_SD
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"a summary is [S, d], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("a summary has a NaN or infinite value")
    qmax = _QMAX[bits]
    scales = (np.abs(x).max(axis=1) / qmax).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / safe[:, None]), -qmax, qmax).astype(np.int8)
    S, d = x.shape
    if bits == 8:
        return QuantisedSummary(q, scales, 8, d)
    nibbles = (q.astype(np.int16) & 0xF).astype(np.uint8)
    if d % 2:
        nibbles = np.concatenate([nibbles, np.zeros((S, 1), np.uint8)], axis=1)
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return QuantisedSummary(packed.astype(np.uint8), scales, 4, d)


def dequantise(summary: QuantisedSummary) -> np.ndarray:
    """float32 [S, d]."""
    if summary.bits == 8:
        q = summary.values.astype(np.float32)
    else:
        low = (summary.values & 0xF).astype(np.int16)
        high = (summary.values >> 4).astype(np.int16)
        nibbles = np.stack([low, high], axis=2).reshape(summary.values.shape[0], -1)
        q = np.where(nibbles >= 8, nibbles - 16, nibbles)[:, : summary.dim].astype(np.float32)
    return q * summary.scales[:, None]


@runtime_checkable
class SummaryStore(Protocol):
    """A key-value store of summaries by (user_id, version_ts); a production store (an
    in-memory KV service) implements the same three calls."""

    def put(self, user_id: str, version_ts: int, summary: QuantisedSummary) -> None: ...

    def get(self, user_id: str, version_ts: int) -> QuantisedSummary:
        """KeyError when the store has no such version."""
        ...

    def versions(self, user_id: str) -> list[int]:
        """The user's stored versions, ascending (empty for an unknown user)."""
        ...


def latest_version(store: SummaryStore, user_id: str, at_ts: int) -> int:
    """The newest version of ``user_id`` at or before ``at_ts`` (KeyError when none is)."""
    usable = [v for v in store.versions(user_id) if v <= at_ts]
    if not usable:
        raise KeyError(f"no summary of user {user_id!r} at or before {at_ts}")
    return usable[-1]


class DirectorySummaryStore:
    """Summaries as files ``ROOT/u<hex of the user id>/<version_ts>.vsum`` (the id's UTF-8
    bytes hex-encoded, so any string, the empty one too, is a safe name), each written
    atomically."""

    SUFFIX = ".vsum"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"{self.root} is not a directory")

    def _dir(self, user_id: str) -> Path:
        return self.root / ("u" + user_id.encode("utf-8").hex())

    def put(self, user_id: str, version_ts: int, summary: QuantisedSummary) -> None:
        path = self._dir(user_id) / f"{int(version_ts)}{self.SUFFIX}"
        atomic_write_bytes(path, lambda handle: handle.write(summary.to_bytes()))

    def get(self, user_id: str, version_ts: int) -> QuantisedSummary:
        path = self._dir(user_id) / f"{int(version_ts)}{self.SUFFIX}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyError(f"no summary of user {user_id!r} at version {version_ts}") from None
        return QuantisedSummary.from_bytes(data, str(path))

    def versions(self, user_id: str) -> list[int]:
        folder = self._dir(user_id)
        if not folder.is_dir():
            return []
        names = (p.name for p in folder.iterdir())
        return sorted(int(n[: -len(self.SUFFIX)]) for n in names if n.endswith(self.SUFFIX))

    def users(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(bytes.fromhex(p.name[1:]).decode("utf-8") for p in self.root.iterdir()
                      if p.is_dir() and p.name.startswith("u"))  # fmt: skip


# ---------------------------------------------------------------- export and cached scoring


@dataclass(frozen=True)
class RequestKeys:
    """The (user id, version) of each request's summary, and the rows that have a history."""

    user_ids: list[str]
    versions: np.ndarray  # int64: the newest history event's timestamp
    has_history: np.ndarray  # bool


def request_keys(examples: RankingData, rows: np.ndarray) -> RequestKeys:
    chosen = examples.requests.take(rows)
    has = chosen.start > chosen.history_start
    last = np.where(has, chosen.start - 1, 0)
    versions = np.where(has, examples.events.timestamps[last], np.iinfo(np.int64).min)
    ids = examples.data.user_ids
    return RequestKeys([ids[u] for u in chosen.user], versions.astype(np.int64), has)


@dataclass(frozen=True)
class ExportReport:
    summaries: int
    skipped_empty: int  # requests whose history is empty (no summary to store)
    bytes: int  # stored payload (values and scales)
    seconds: float


@torch.no_grad()
def export_summaries(
    model: VistaRanker,
    examples: RankingData,
    store: SummaryStore,
    *,
    which: Which = "test",
    bits: int = 8,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
) -> ExportReport:
    """Summarise the history of every ``which`` request (one per user) with ``model``'s stage 1 and store it under (the user's raw id, the newest history event's
    timestamp)."""
    if not isinstance(model, VistaRanker):
        raise TypeError(f"summaries come from a vista-ranking model, not {type(model).__name__}")
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if which not in ("val", "test"):
        # Training requests are several per user: two could share a newest-event timestamp
        # (ties) and so a key, with different histories.
        raise ValueError(f"summaries are exported for the val or test requests, not {which!r}")
    device = torch.device(device)
    rows = examples.split.rows(which)
    was_training = model.training
    model.eval()
    start, written, skipped, nbytes = time.perf_counter(), 0, 0, 0
    total = -(-len(rows) // batch_size)
    try:
        for index, lo in enumerate(range(0, len(rows), batch_size)):
            chunk = rows[lo : lo + batch_size]
            keys = request_keys(examples, chunk)
            batch = request_batch(examples.events, examples.requests, chunk).to(device)
            summary_BSD = model.summarise(batch, prepare(model, batch).summary).float().cpu()
            for b in range(len(chunk)):
                if not keys.has_history[b]:
                    skipped += 1
                    continue
                q = quantise(summary_BSD[b], bits)
                store.put(keys.user_ids[b], int(keys.versions[b]), q)
                written, nbytes = written + 1, nbytes + q.nbytes
            if on_batch is not None:
                on_batch(index + 1, total)
    finally:
        model.train(was_training)
    return ExportReport(written, skipped, nbytes, time.perf_counter() - start)


def load_summaries(
    store: SummaryStore, user_ids: list[str], versions: np.ndarray, num_seeds: int, dim: int
) -> Tensor:
    """[B, S, d] float32, dequantised (KeyError naming the first missing key)."""
    out = np.empty((len(user_ids), num_seeds, dim), dtype=np.float32)
    for b, (user, version) in enumerate(zip(user_ids, versions)):
        summary = dequantise(store.get(user, int(version)))
        if summary.shape != (num_seeds, dim):
            raise ValueError(
                f"the summary of user {user!r} is {summary.shape}, the model reads "
                f"{(num_seeds, dim)}"
            )
        out[b] = summary
    return torch.from_numpy(out)


@torch.no_grad()
def score_summaries(
    model: VistaRanker,
    summary_BSD: Tensor,
    candidates: Tensor,
    candidate_offsets: Tensor,
    kinds: list[str],
) -> Tensor:
    """Stage 2 alone: [C, K] predictions of the candidates [C] (item indices), sequence b's
    ``[candidate_offsets[b], candidate_offsets[b + 1])`` read against summary b of [B, S, d].
    :func:`predict_cached` and ``flexgr serve --summaries`` both score through it."""
    target = prepare_stage2(model, candidate_offsets, int(candidates.numel()))
    logits = model.score(summary_BSD, candidates, target)
    return predictions(logits.float(), kinds)


@torch.no_grad()
def predict_cached(
    model: VistaRanker,
    examples: RankingData,
    rows: np.ndarray,
    store: SummaryStore,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """[N, K] predictions of every impression of the requests ``rows`` (as
    :func:`flexgr.ranking.evaluate.predict_requests`), stage 2 reading each request's summary
    from ``store`` at the version :func:`export_summaries` wrote; the history is not read."""
    device = torch.device(device)
    cfg, out = model.cfg, []
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            keys = request_keys(examples, chunk)
            if not keys.has_history.all():
                user = keys.user_ids[int(np.flatnonzero(~keys.has_history)[0])]
                raise KeyError(f"user {user!r} has an empty history here: no summary to read")
            summary = load_summaries(store, keys.user_ids, keys.versions, cfg.num_seeds,
                                     cfg.d_model).to(device)  # fmt: skip
            batch = request_batch(examples.events, examples.requests, chunk).to(device)
            scored = score_summaries(model, summary, batch.candidates, batch.candidate_offsets,
                                     examples.kinds)  # fmt: skip
            out.append(scored.cpu().numpy())
    finally:
        model.train(was_training)
    K = len(examples.tasks)
    return np.concatenate(out) if out else np.zeros((0, K), dtype=np.float32)


def _metrics(examples: RankingData, rows: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """NE and AUC of each BCE task and each MSE task's error (flexgr.ranking.metrics)."""
    chosen = examples.requests.take(rows)
    impressions = ranges(chosen.start, chosen.end)
    ev, out = examples.events, {}
    for k, task in enumerate(examples.tasks):
        metrics = task_metrics(
            task.name, task.kind, preds[:, k], ev.labels[impressions, k],
            ev.known[impressions, k], ev.users[impressions],
        )  # fmt: skip
        out.update({key: v for key, v in metrics.items() if key.split(":")[0] in KEPT})
    return out


KEPT = ("ne", "auc", "mse")


def compare_cached(
    model: VistaRanker,
    examples: RankingData,
    store: SummaryStore,
    *,
    which: Which = "test",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict:
    """Score the ``which`` requests from the store and from their histories: the largest
    absolute prediction difference and both sets of metrics."""
    rows = examples.split.rows(which)
    device = torch.device(device)
    cached = predict_cached(model, examples, rows, store, batch_size=batch_size, device=device)
    recomputed = predict_requests(model, examples, rows, batch_size=batch_size, device=device)
    return {
        "max_abs_diff": float(np.abs(cached - recomputed).max()) if len(cached) else 0.0,
        "cached": _metrics(examples, rows, cached),
        "recomputed": _metrics(examples, rows, recomputed),
    }
