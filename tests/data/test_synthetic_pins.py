"""The implicit-feedback generators' output, pinned: digests computed before the rating model
was added (prepared copies and recorded results depend on them staying byte-identical)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from flexgr.data.synthetic import (
    SyntheticStream,
    generate,
    params_as_options,
    source_digest,
    synthetic_params,
)


def content_digest(stream: SyntheticStream) -> str:
    """sha256 over every array of the stream (events, catalogue and ground truth), in order."""
    digest = hashlib.sha256()
    arrays = (
        stream.events.users.cast("int64").to_numpy(),
        stream.events.items.cast("int64").to_numpy(),
        stream.events.timestamps,
        stream.events.ratings,  # NaN: implicit feedback
        stream.concentration,
        stream.item_category,
        stream.release_time,
        stream.fresh,
        stream.catalog.cast("int64").to_numpy(),
    )
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


PINNED = [
    (
        "synthetic-streaming",
        {},
        "6d789ad5e72b30d3e5f88bc60d56c7f3e991bfccf832f1e07499a0b82202f09e",
        "90c32a146e9511c026a246fd1c967b4f3062a90cb64433d1a5202babb7742e06",
    ),
    (
        "synthetic-long",
        {},
        "17d8f9ecbf47e793b0b2607d898baa8455043c200833fe9b96d553383be75c8b",
        "19e30acf9b91624f57ffde2469eaa8a5e5d403a0ba982b6ea369f64d55cb939e",
    ),
    (
        "synthetic-streaming",
        {"users": 40, "items": 500, "categories": 10},
        "3aebb59f356b614bb11fc4d2364e0628d1aaf66a8770fe6ece3979e64a226731",
        "45263e72ca2337c331e0d88c223be49a84cf8b62ba4837346122ee5e8c3b4e60",
    ),
    (
        "synthetic-long",
        {"users": 30, "items": 800, "categories": 8, "min_length": 5, "max_length": 900, "seed": 3},
        "f23c8f3bb0113b2e14003f6a8ed5880f96fba8e22d7d6e8d3880c539de1e4189",
        "220c0b3b45ea58af710cdc012e8e94656ed1fded5d34351ea85570c539464b9d",
    ),
]


@pytest.mark.parametrize(("name", "overrides", "source", "content"), PINNED)
def test_implicit_generators_are_unchanged(
    name: str, overrides: dict[str, object], source: str, content: str
) -> None:
    params = synthetic_params(name, overrides)
    assert source_digest(name, params) == source
    assert content_digest(generate(params)) == content


def test_implicit_generators_record_the_same_options() -> None:
    # meta.json's source.options is compared on reuse: a new key would rebuild every copy.
    options = params_as_options(synthetic_params("synthetic-long", {"users": 30, "seed": 3}))
    assert options == {
        "generator_version": "1",
        "users": "30",
        "items": "20000",
        "categories": "100",
        "min_length": "256",
        "max_length": "16384",
        "seed": "3",
        "initial_fraction": "0.4",
        "min_concentration": "1.0",
        "max_concentration": "500.0",
        "mean_gap_s": "600.0",
        "span_days": "30.0",
    }
