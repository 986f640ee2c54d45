"""Small synthetic event logs with ratings and actions, and tiny ranking models."""

from __future__ import annotations

import random

import numpy as np

from flexgr.data import InteractionData, RawEvents, build_interactions
from flexgr.ranking.batch import RankingEvents
from flexgr.ranking.config import RankingConfig
from flexgr.ranking.tasks import action_codes, action_vocab, parse_tasks

NUM_ITEMS = 40


def synthetic_data(
    users: int = 12, seed: int = 0, min_len: int = 3, max_len: int = 30
) -> InteractionData:
    """Users with random histories: ratings 1..5 that depend on (user + item) parity, so they
    are learnable; timestamps with ties; a 0..3 'click' action column."""
    rng = random.Random(seed)
    rows: dict[str, list] = {"users": [], "items": [], "ts": [], "ratings": [], "click": []}
    for user in range(users):
        ts = 1_000_000
        for _ in range(rng.randint(min_len, max_len)):
            ts += rng.choice([0, 0, 5, 60, 4000])
            item = rng.randrange(1, NUM_ITEMS + 1)
            like = (user + item) % 2 == 0
            rows["users"].append(f"u{user}")
            rows["items"].append(f"i{item}")
            rows["ts"].append(ts)
            rows["ratings"].append(float(rng.choice([4, 5]) if like else rng.choice([1, 2, 3])))
            rows["click"].append(rng.randrange(4))
    raw = RawEvents.from_lists(
        rows["users"], rows["items"], rows["ts"], rows["ratings"], actions={"click": rows["click"]}
    )
    return build_interactions("synthetic", raw)


def model_options(
    data: InteractionData, cfg: RankingConfig, max_seq_len: int, encoding: str = "categorical"
) -> dict:
    tasks = parse_tasks(cfg.tasks, cfg.like_threshold, cfg.dislike_threshold)
    codes = action_codes(cfg.action_inputs, data)
    return {
        "num_items": data.num_items,
        "max_seq_len": max_seq_len,
        "action_inputs": list(cfg.action_inputs),
        "action_vocab": action_vocab(cfg.action_inputs, codes, encoding),
        "tasks": [t.name for t in tasks],
        "task_kinds": [t.kind for t in tasks],
    }


def events_of(data: InteractionData, cfg: RankingConfig) -> RankingEvents:
    return RankingEvents.of(
        data, cfg.action_inputs, parse_tasks(cfg.tasks, cfg.like_threshold, cfg.dislike_threshold)
    )


def as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy()
