"""model.json records the sha256 of its safetensors; loading checks it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import flexgr.export.files
from flexgr.export import ExportError, export_model, load
from flexgr.model import HSTU, HSTUConfig

ITEMS = [f"m{i}" for i in range(1, 21)]


def model(seed: int) -> HSTU:
    torch.manual_seed(seed)  # same config, different weights: two runs of one config
    return HSTU(HSTUConfig(num_items=20, d_model=8, num_layers=1, dqk=4, dv=4, max_seq_len=5))


def test_the_description_records_the_weights_checksum(tmp_path: Path) -> None:
    weights, description = export_model(model(0), tmp_path / "m", item_ids=ITEMS)
    recorded = json.loads(description.read_text())["weights_sha256"]
    assert recorded == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_weights_swapped_between_runs_fail_to_load(tmp_path: Path) -> None:
    export_model(model(0), tmp_path / "a", item_ids=ITEMS)
    export_model(model(1), tmp_path / "b", item_ids=ITEMS)
    shutil.copy(tmp_path / "b.safetensors", tmp_path / "a.safetensors")  # same names and shapes
    with pytest.raises(ExportError, match=r"a.safetensors does not belong to .*a.json"):
        load(tmp_path / "a")
    assert load(tmp_path / "b").num_items == 20


def test_descriptions_without_a_checksum_still_load(tmp_path: Path) -> None:
    export_model(model(0), tmp_path / "m", item_ids=ITEMS)
    document = json.loads((tmp_path / "m.json").read_text())
    del document["weights_sha256"]  # written before the checksum existed
    (tmp_path / "m.json").write_text(json.dumps(document))
    assert load(tmp_path / "m").num_items == 20


def test_missing_exports_say_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no exported model at .*nonexist: no model description"):
        load(tmp_path / "nonexist")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(ExportError, match="has no exported model .*--weights last"):
        load(run_dir)
    export_model(model(0), tmp_path / "m", item_ids=ITEMS)
    (tmp_path / "m.json").unlink()
    with pytest.raises(ExportError, match="no model description .*m.json beside .*m.safetensors"):
        load(tmp_path / "m")
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ExportError, match="not UTF-8"):
        load(tmp_path / "bad")


def test_a_failed_export_leaves_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_model(model(0), tmp_path / "m", item_ids=ITEMS)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_fsync = os.fsync
    calls = {"n": 0}

    def full(fd: int) -> None:  # the second temp file (the description) hits a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(flexgr.export.files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left") as caught:
        export_model(model(1), tmp_path / "m", item_ids=ITEMS)
    assert caught.value.filename == str(tmp_path / "m.json")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left
    assert load(tmp_path / "m").num_items == 20
