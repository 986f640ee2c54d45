"""The on-disk cache of tuned tile choices: reused across processes, never trusted when stale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("triton")

from flexgr.ops.triton_hstu import tuning  # noqa: E402
from flexgr.ops.triton_hstu.tuning import TileConfig  # noqa: E402

A, B, C = TileConfig(64, 64, 4, 3), TileConfig(128, 128, 8, 2), TileConfig(32, 64, 4, 3)
COST = {A: 2.0, B: 1.0, C: 3.0}
KEY = ("fwd", "NVIDIA H100 sm_90", "torch.bfloat16", 4, 128, 128, 17, 13, 128, 128, ())


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "tiles.json"
    monkeypatch.setenv("FLEXGR_TRITON_TILE_CACHE", str(path))
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "_timings", {})
    return path


def _tune(monkeypatch: pytest.MonkeyPatch, options: list, key=KEY) -> tuple[object, list]:  # noqa: ANN001
    """pick() with a fake timer; returns (choice, options that were timed)."""
    timed: list = []

    def launch(cfg: object) -> None:
        timed.append(cfg)

    def fake_time(fn) -> float:  # noqa: ANN001
        fn()
        return COST[timed[-1]] if timed[-1] in COST else sum(COST[c] for c in timed[-1])

    monkeypatch.setattr(tuning, "time_ms", fake_time)
    tuning._chosen.clear()  # a new process
    return tuning.pick(key, options, launch), timed


def test_choice_is_reused_from_disk_without_timing(store, monkeypatch) -> None:
    best, timed = _tune(monkeypatch, [A, B, C])
    assert best == B and timed == [A, B, C]
    assert store.exists()
    best, timed = _tune(monkeypatch, [A, B, C])
    assert best == B and timed == []


def test_pairs_of_tiles_round_trip(store, monkeypatch) -> None:
    pairs = [(A, A), (C, A), (B, C)]
    best, _ = _tune(monkeypatch, pairs)
    assert best == (A, A)
    again, timed = _tune(monkeypatch, pairs)
    assert again == (A, A) and timed == []


def test_other_keys_and_dropped_candidates_are_tuned_again(store, monkeypatch) -> None:
    _tune(monkeypatch, [A, B, C])
    _, timed = _tune(monkeypatch, [A, B, C], key=KEY[:-1] + ((("HAS_RAB", True),),))
    assert timed == [A, B, C]
    best, timed = _tune(monkeypatch, [A, C])  # B is no longer a candidate
    assert best == A and timed == [A, C]


def test_stale_or_corrupt_files_are_ignored_and_replaced(store, monkeypatch) -> None:
    _tune(monkeypatch, [A, B, C])
    data = json.loads(store.read_text())
    data["fingerprint"] = "another-kernel"
    store.write_text(json.dumps(data))
    _, timed = _tune(monkeypatch, [A, B, C])
    assert timed == [A, B, C]
    assert json.loads(store.read_text())["fingerprint"] == tuning._fingerprint()
    store.write_text("{not json")
    best, timed = _tune(monkeypatch, [A, B, C])
    assert best == B and timed == [A, B, C]
    assert json.loads(store.read_text())["entries"]
    assert not list(store.parent.glob("*.tmp"))


def test_cache_can_be_switched_off_or_unwritable(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setenv("FLEXGR_TRITON_TILE_CACHE", "0")
    _tune(monkeypatch, [A, B, C])
    assert not list(tmp_path.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FLEXGR_TRITON_TILE_CACHE", str(blocker / "tiles.json"))  # parent is a file
    best, _ = _tune(monkeypatch, [A, B, C])
    assert best == B


def test_backward_mode_choice_round_trips(store) -> None:
    tuning.remember(("bwd_mode",) + KEY[1:], "merged")
    assert tuning.recall(("bwd_mode",) + KEY[1:], ("split", "fused", "merged")) == "merged"
    assert tuning.recall(("bwd_mode",) + KEY[1:], ("split", "fused")) is None


def test_biased_forward_has_its_own_tiles_and_follows_the_forward_pin(monkeypatch) -> None:
    """With the relative bias the forward's untuned tile is the bias pool's first (the plain
    pool's first spilled there), and a pinned forward tile still pins the biased forward."""
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "autotune_enabled", lambda: False)
    monkeypatch.setattr(tuning, "_forced", {})
    assert tuning.default("fwd", 128, 128, 128) == tuning.FWD_CANDIDATES[0]
    assert tuning.default("fwd_rab", 128, 128, 128) == tuning.FWD_RAB_CANDIDATES[0]
    assert tuning.FWD_RAB_CANDIDATES[0] != tuning.FWD_CANDIDATES[0]
    tuning._forced["fwd"] = C
    assert tuning.candidates("fwd_rab", 128, 128, 128) == [C]
    tuning._forced["dkdv"] = A
    assert tuning.default("fused", 128, 128, 128) == A


def test_backward_mode_choice_is_kept_per_kernel_options(monkeypatch) -> None:
    """kernel.backward = "auto" remembers its choice per set of kernel options (as tile choices
    are): a choice made under one rab_lanes is not the one used under another."""
    import torch

    from flexgr.masks import build_hstu_mask
    from flexgr.ops.kernel_options import kernel_options_set
    from flexgr.ops.triton_backend import hstu_attention_triton
    from flexgr.ops.triton_hstu import launch
    from tests.conftest import make_offsets

    monkeypatch.setattr(launch, "_bwd_modes", {})
    offsets = make_offsets([5, 11])
    q, k, v = (torch.randn(16, 1, 16, requires_grad=True) for _ in range(3))
    mask = build_hstu_mask(offsets)
    for lanes in (16, 4):
        with kernel_options_set(backward="auto", rab_lanes=lanes):
            hstu_attention_triton(q, k, v, mask, max_seq_len=11, alpha=0.5).sum().backward()
    options = sorted(key[1] for key in launch.bwd_choices())
    assert len(options) == 2 and "lanes=16" in options[0] + options[1]
    assert any("lanes=4" in o for o in options)


def test_tuning_threads_compile_every_candidate_off_the_main_thread_first(store, monkeypatch) -> None:
    """kernel.tuning_threads: each candidate is launched once from the pool (a failing one does
    not stop the others or the timing), the device is synchronised, then the timing loop runs
    on the calling thread; the choice is the same as without threads."""
    import contextlib
    import threading

    import torch

    from flexgr.ops.kernel_options import kernel_options_set

    events: list[tuple[str, object]] = []
    main = threading.get_ident()

    def launch(cfg: object) -> None:
        where = "main" if threading.get_ident() == main else "pool"
        events.append((where, cfg))
        if cfg == C and where == "pool":
            raise RuntimeError("out of shared memory")  # a candidate that cannot compile

    def fake_time(fn) -> float:  # noqa: ANN001
        fn()
        return COST[events[-1][1]]

    monkeypatch.setattr(tuning, "time_ms", fake_time)
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda device=None: events.append(("sync", device)))
    with kernel_options_set(tuning_threads=4):
        choice = tuning.pick(KEY, [A, B, C], launch)
    assert choice == B
    first = events[:4]
    assert sorted(str(e) for e in first[:3]) == sorted(str(("pool", c)) for c in (A, B, C))
    assert first[3] == ("sync", 0)
    assert [e for e in events[4:] if e[0] != "main"] == []  # timing: caller's thread only

    events.clear()
    monkeypatch.setattr(tuning, "_chosen", {})
    store.unlink()
    with kernel_options_set(tuning_threads=0):
        assert tuning.pick(KEY, [A, B, C], launch) == B
    assert all(where == "main" for where, _ in events)  # no pool, no extra sync


def test_tuning_threads_must_not_be_negative() -> None:
    from flexgr.ops.kernel_options import KernelOptions

    with pytest.raises(ValueError, match="kernel.tuning_threads"):
        KernelOptions(tuning_threads=-1)
