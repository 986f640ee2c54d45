"""Request bodies of the HTTP API (docs/serving.md). Ids may be JSON strings or integers."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Longer histories are allowed (the model reads the most recent max_seq_len); the body-size
# limit bounds them in practice, this bounds the work of validating one.
MAX_LIST = 100_000

RawId = str | int


class HistoryQuery(BaseModel):
    """Who the user is: ``user`` (a user of the run's dataset) or ``history`` (+ timestamps)."""

    model_config = ConfigDict(extra="forbid")

    user: RawId | None = Field(None, description="A raw user id of the run's dataset.")
    history: list[RawId] | None = Field(
        None, max_length=MAX_LIST, description="Raw item ids, oldest first."
    )
    timestamps: list[int] | None = Field(
        None, max_length=MAX_LIST, description="One per history item (seconds), non-decreasing."
    )
    query_time: int | None = Field(
        None, description="When the prediction is for (default: the last event's timestamp)."
    )


class RecommendRequest(HistoryQuery):
    k: int = Field(10, description="How many items, 1..max_k (and at most the item count).")
    exclude: list[RawId] = Field(default_factory=list, max_length=MAX_LIST)
    exclude_history: bool = Field(True, description="Leave out the items of the history.")


class ScoreRequest(HistoryQuery):
    candidates: list[RawId] = Field(..., max_length=MAX_LIST, description="Raw item ids to score.")


# One value per history event; null is an unknown rating (NaN to the model).
ActionValues = Annotated[list[float | None], Field(max_length=MAX_LIST)]


class RankScoreRequest(ScoreRequest):
    """``/score`` on a ranking model: a history also brings each event's actions."""

    actions: ActionValues | dict[str, ActionValues] | None = Field(
        None,
        description="Each history event's action inputs: one list for a model with one input "
        "(e.g. the rating), else an object by input name. Only with history.",
    )
    truncate: bool = Field(
        False, description="Read the most recent max_seq_len events of a longer history."
    )
    cache_key: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Keep this history's keys and values under this key (e.g. your user id); "
        "only with history. Dataset users are keyed by their id.",
    )
