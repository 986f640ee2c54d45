from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's interpreter. The variable must be set before
# anything imports triton.language: its standard functions are decorated at import time, and ones
# decorated outside interpreter mode fail inside an interpreted kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.attention.flex_attention as flex_module  # noqa: E402

# Tuned Triton tiles stay in the test process instead of the user's ~/.cache; the tuning tests
# point the cache at a temporary file themselves.
os.environ.setdefault("FLEXGR_TRITON_TILE_CACHE", "0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kernel-autotune",
        action="store_true",
        help="time the Triton tile candidates (kernel.autotune); off by default in tests",
    )


def pytest_configure(config: pytest.Config) -> None:
    from flexgr.ops.kernel_options import KernelOptions, set_kernel_options

    # Tile timing only picks the fastest correct tile; tests check correctness, so they take
    # the first candidate and start faster on a GPU.
    set_kernel_options(KernelOptions(autotune=config.getoption("--kernel-autotune")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_offsets(lengths: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    lens = torch.tensor(lengths, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(device)


@pytest.fixture
def cpu_flex_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let eager FlexAttention run its (dense, math) backward on CPU.

    torch refuses CPU backward in flex_attention's argument checks only; the eager math path
    itself is differentiable. Tests use this to check our score_mod transform's gradients in CI.
    """
    monkeypatch.setattr(flex_module, "_validate_device", lambda *a, **k: None)


# ---------------------------------------------------------------- datasets shared by test packages


def _grouplens_unreachable(*args: object, **kwargs: object) -> None:
    from flexgr.data.fetch import SourceUnavailable

    raise SourceUnavailable("disabled in tests")


@pytest.fixture(scope="session")
def ml100k_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data dir holding ML-100K prepared from the real recbole wheel on PyPI.

    The GroupLens download is switched off so the PyPI path is the one exercised even on a
    machine that could reach GroupLens. Prepared once per session (one ~2 MB download).
    """
    from flexgr.data import fetch, prepare

    home = tmp_path_factory.mktemp("ml100k-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch, "download", _grouplens_unreachable)
        prepare("ml-100k", data_dir=home, progress=False)
    yield home


TINY_ITEMS = 30


def write_tiny_csv(path: Path, users: int = 48, seed: int = 0) -> Path:
    """A learnable toy log: each user walks the items in a cycle (item i is followed by i + 1),
    from a random start, 6 to 20 events, with increasing timestamps."""
    import random

    rng = random.Random(seed)
    lines = ["user,item,ts"]
    for user in range(users):
        start, length, ts = rng.randrange(TINY_ITEMS), rng.randint(6, 20), 1_000_000
        for step in range(length):
            ts += rng.randint(1, 5000)
            lines.append(f"u{user},i{(start + step) % TINY_ITEMS},{ts}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the toy dataset ``tiny`` (see write_tiny_csv)."""
    from flexgr.data import prepare

    home = tmp_path_factory.mktemp("tiny-home")
    csv = write_tiny_csv(home / "tiny.csv")
    prepare(
        str(csv),
        fmt="csv",
        name="tiny",
        data_dir=home,
        progress=False,
        user_col="user",
        item_col="item",
        time_col="ts",
    )
    return home


def tiny_config(home: Path, *overrides: str):
    """A config that trains a very small HSTU on ``tiny`` in about a second per epoch on CPU."""
    from flexgr.train import Config, apply_overrides

    base = [
        "data.dataset=tiny",
        f"data.data_dir={home}",
        "data.max_seq_len=12",
        "model.d_model=16",
        "model.num_layers=1",
        "model.dqk=8",
        "model.dv=8",
        "train.batch_size=8",
        "train.num_negatives=8",
        "train.max_epochs=3",
        "train.log_every=2",
        "eval.batch_size=16",
        "eval.item_chunk=7",
    ]
    return apply_overrides(Config(), [*base, *overrides])
