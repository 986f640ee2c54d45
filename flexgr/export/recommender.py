"""A loaded model plus its item id map: recommendations from raw item ids in, raw ids out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Self

import torch
from torch import Tensor, nn

from flexgr.batch import JaggedBatch
from flexgr.eval.ranking import top_k
from flexgr.export.files import load_model
from flexgr.model.registry import spec_of


class UnknownItemError(KeyError):
    """A raw item id the model was not trained with."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class LoadedModel:
    """``model`` (eval mode), ``item_ids`` (raw id of item index i is ``item_ids[i - 1]``) and the
    exported description (``arch``, ``config``, ``metadata``): what every loaded model (retrieval
    or ranking) has, and the raw-id lookup."""

    def __init__(self, model: nn.Module, item_ids: list[str], description: dict[str, Any]) -> None:
        self.model = model
        self.item_ids = list(item_ids)
        self.arch: str = description["arch"]
        self.config: dict[str, Any] = description["config"]
        self.metadata: dict[str, Any] = description.get("metadata", {})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Self:
        model, description = load_model(path, device)
        return cls(model, description["item_ids"], description)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def _index(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.item_ids, start=1)}

    def item_index(self, raw_id: str) -> int:
        """Index (1..num_items) of a raw item id; UnknownItemError naming it otherwise."""
        try:
            return self._index[str(raw_id)]
        except KeyError:
            raise UnknownItemError(f"unknown item id {raw_id!r}") from None


class Recommender(LoadedModel):
    """A retrieval model (see :class:`LoadedModel`).

    Histories are raw item ids, oldest first; the model reads the most recent ``max_seq_len``.
    Timestamps (seconds) feed HSTU's time bias; without them every event counts as simultaneous.
    The query time defaults to the last event's timestamp; in serving, pass the request time.
    """

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def max_seq_len(self) -> int:
        return int(self.config["max_seq_len"])

    def to(self, device: str | torch.device) -> Recommender:
        self.model.to(device)
        return self

    def history_tensors(
        self,
        history: Sequence[str],
        timestamps: Sequence[int] | None = None,
        query_time: int | None = None,
    ) -> tuple[Tensor, Tensor, int]:
        """(item indices [n], timestamps [n], query time) of the most recent ``max_seq_len``
        events, checked: ValueError for an empty history or mismatched timestamps,
        UnknownItemError for an id the model does not know."""
        if len(history) == 0:
            raise ValueError("history is empty: the model needs at least one item")
        if timestamps is not None and len(timestamps) != len(history):
            raise ValueError(f"{len(timestamps)} timestamps for {len(history)} history items")
        recent = slice(max(0, len(history) - self.max_seq_len), len(history))
        ids = torch.tensor([self.item_index(raw) for raw in history[recent]], dtype=torch.int64)
        if timestamps is None:
            ts = torch.zeros_like(ids)
        else:
            ts = torch.tensor(list(timestamps[recent]), dtype=torch.int64)
        return ids, ts, int(ts[-1]) if query_time is None else int(query_time)

    @torch.no_grad()
    def embed(
        self, histories: Sequence[tuple[Tensor, Tensor, int]], *, chunk_tokens: int = 0
    ) -> Tensor:
        """[B, d] user states for B histories from :meth:`history_tensors`, packed into one
        jagged batch (``chunk_tokens`` > 0: several batches of at most that many tokens each;
        a history is never split). Each row equals that history encoded alone."""
        states = []
        start = 0
        while start < len(histories):
            stop, tokens = start, 0
            while stop < len(histories) and (
                stop == start
                or not chunk_tokens
                or tokens + len(histories[stop][0]) <= chunk_tokens
            ):
                tokens += len(histories[stop][0])
                stop += 1
            states.append(self._encode(histories[start:stop]))
            start = stop
        if not states:
            return torch.empty(0, self.model.item_embeddings().shape[1], device=self.device)
        return torch.cat(states)

    def _encode(self, histories: Sequence[tuple[Tensor, Tensor, int]]) -> Tensor:
        device = self.device
        lengths = torch.tensor([len(ids) for ids, _, _ in histories], dtype=torch.int64)
        offsets = torch.zeros(len(histories) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        batch = JaggedBatch(
            torch.cat([ids for ids, _, _ in histories]).to(device),
            offsets.to(device),
            torch.cat([ts for _, ts, _ in histories]).to(device),
            torch.tensor([q for _, _, q in histories], dtype=torch.int64, device=device),
        )
        inputs = spec_of(self.model).prepare(self.model, batch)
        states = self.model(batch.item_ids, inputs)
        ends = getattr(inputs, "output_offsets", None)  # attention truncation keeps the last row
        return states[(batch.offsets if ends is None else ends)[1:] - 1]

    @torch.no_grad()
    def score_candidates(
        self,
        history: Sequence[str],
        candidates: Sequence[str],
        *,
        timestamps: Sequence[int] | None = None,
        query_time: int | None = None,
        microbatch: int = 1024,
    ) -> list[tuple[str, float]]:
        """(raw id, score) of every candidate, in the order given. HSTU models score with
        M-FALCON (each candidate a target of the history, the history's keys and values
        computed once; docs/m-falcon.md); other models, and HSTU configs M-FALCON does not
        take (``falcon.unsupported``: truncation, windows, custom masks, ...), with the
        retrieval dot product."""
        if len(candidates) == 0:
            raise ValueError("no candidates to score")
        ids, ts, qt = self.history_tensors(history, timestamps, query_time)
        cand = torch.tensor([self.item_index(raw) for raw in candidates], dtype=torch.int64)
        from flexgr.model.hstu.falcon import score_candidates, unsupported

        device = self.device
        falcon = spec_of(self.model).name == "hstu" and unsupported(self.model.cfg) is None
        if falcon and len(ids) + 1 <= self.model.cfg.attn_len:
            scores, _ = score_candidates(
                self.model,
                ids.to(device),
                ts.to(device),
                qt,
                cand.to(device),
                microbatch=microbatch,
            )
        else:
            user = self.embed([(ids, ts, qt)])[0].float()
            scores = self.model.item_embeddings(cand.to(device)).float() @ user
        return list(zip(candidates, scores.tolist(), strict=True))

    @torch.no_grad()
    def user_embedding(
        self,
        history: Sequence[str],
        timestamps: Sequence[int] | None = None,
        query_time: int | None = None,
    ) -> Tensor:
        """[d] L2-normalised representation of a user with this history (raw ids, oldest first)."""
        return self.embed([self.history_tensors(history, timestamps, query_time)])[0]

    @torch.no_grad()
    def scores(
        self,
        history: Sequence[str],
        timestamps: Sequence[int] | None = None,
        query_time: int | None = None,
    ) -> Tensor:
        """[num_items] score of every item; entry i - 1 belongs to ``item_ids[i - 1]``."""
        user = self.user_embedding(history, timestamps, query_time).float()
        return self.model.item_embeddings()[1:].float() @ user

    def recommend_scored(
        self,
        history: Sequence[str],
        k: int = 10,
        *,
        timestamps: Sequence[int] | None = None,
        query_time: int | None = None,
        exclude: Iterable[str] | None = None,
        exclude_history: bool = True,
    ) -> list[tuple[str, float]]:
        """The k best (raw item id, score) pairs, best first, leaving out the history's items
        (unless ``exclude_history=False``) and any raw ids in ``exclude``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        user = self.user_embedding(history, timestamps, query_time).float()
        dropped = {self.item_index(raw) for raw in exclude or ()}
        if exclude_history:
            dropped |= {self.item_index(raw) for raw in history}
        device = self.device
        excluded = torch.tensor(sorted(dropped), dtype=torch.int64, device=device)
        offsets = torch.tensor([0, excluded.numel()], dtype=torch.int64, device=device)
        table = self.model.item_embeddings().float()
        best_scores, best_items = top_k(user.unsqueeze(0), table, k, excluded, offsets)
        pairs = zip(best_items[0].tolist(), best_scores[0].tolist())
        return [(self.item_ids[i - 1], s) for i, s in pairs if s != float("-inf")]

    def recommend(
        self,
        history: Sequence[str],
        k: int = 10,
        *,
        timestamps: Sequence[int] | None = None,
        query_time: int | None = None,
        exclude: Iterable[str] | None = None,
        exclude_history: bool = True,
    ) -> list[str]:
        """The k best raw item ids, best first (see :meth:`recommend_scored`)."""
        scored = self.recommend_scored(
            history,
            k,
            timestamps=timestamps,
            query_time=query_time,
            exclude=exclude,
            exclude_history=exclude_history,
        )
        return [raw for raw, _ in scored]

    def __repr__(self) -> str:
        return f"Recommender(arch={self.arch!r}, items={self.num_items}, device={self.device})"


def load(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Load an exported model: ``PATH`` (``PATH.safetensors`` + ``PATH.json``), either file, or a
    run directory (its ``model.safetensors``). Raises :class:`ExportError` on a bad export.

    A retrieval model comes back as a :class:`Recommender`; a ranking model (``hstu-ranking``
    and its baselines) as a :class:`flexgr.ranking.scorer.Ranker` (``.score`` gives per-task
    predictions)."""
    from flexgr.export.files import read_model_json
    from flexgr.model.registry import get_spec

    if get_spec(read_model_json(path)["arch"]).task == "ranking":
        from flexgr.ranking.scorer import Ranker

        return Ranker.load(path, device)
    return Recommender.load(path, device)
