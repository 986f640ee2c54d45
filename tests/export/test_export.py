from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexgr
from flexgr.batch import JaggedBatch
from flexgr.export import ExportError, Recommender, UnknownItemError, export_model, load
from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, SASRec, SASRecConfig, encode, encode

ITEMS = [f"m{i}" for i in range(1, 21)]


def trained_like(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "hstu":
        model = HSTU(HSTUConfig(num_items=20, d_model=8, num_layers=2, dqk=4, dv=4, max_seq_len=5))
    else:
        model = SASRec(
            SASRecConfig(num_items=20, d_model=8, num_layers=1, ffn_dim=8, max_seq_len=5)
        )
    with torch.no_grad():  # move away from the init so a fresh model could not pass
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_export_then_load_gives_identical_scores(arch: str, tmp_path: Path) -> None:
    model = trained_like(arch)
    weights, description = export_model(
        model, tmp_path / "m", item_ids=ITEMS, metadata={"epoch": 3}
    )
    assert (weights.name, description.name) == ("m.safetensors", "m.json")
    rec = flexgr.load(tmp_path / "m")
    assert isinstance(rec, Recommender) and rec.arch == arch and rec.metadata == {"epoch": 3}
    assert not rec.model.training
    history, times = ["m3", "m7", "m1", "m12", "m5", "m9", "m2"], [10, 20, 30, 40, 50, 60, 70]
    ids = torch.tensor([ITEMS.index(h) + 1 for h in history[-5:]])
    with torch.no_grad():
        state = encode(
            model,
            JaggedBatch(ids, torch.tensor([0, 5]), torch.tensor(times[-5:]), torch.tensor([70])),
        )[-1]
        expected = model.item_embeddings()[1:] @ state
    assert torch.equal(rec.scores(history, times), expected)
    for other in (tmp_path / "m.safetensors", tmp_path / "m.json"):
        assert torch.equal(load(other).scores(history, times), expected)


def test_recommend_leaves_out_history_and_exclusions(tmp_path: Path) -> None:
    export_model(trained_like("hstu"), tmp_path / "m", item_ids=ITEMS)
    rec = load(tmp_path / "m")
    history = ["m3", "m7", "m1"]
    full = rec.recommend(history, k=20, exclude_history=False)
    assert len(full) == 20 and sorted(full) == sorted(ITEMS)
    scores = rec.scores(history)
    assert full == [ITEMS[i] for i in scores.argsort(descending=True).tolist()]
    top = rec.recommend(history, k=5, exclude=["m4"])
    assert top == [i for i in full if i not in {"m3", "m7", "m1", "m4"}][:5]
    assert len(rec.recommend(history, k=100)) == 17  # everything that is left
    scored = rec.recommend_scored(history, k=2)
    assert [item for item, _ in scored] == top[:2]
    assert scored[0][1] >= scored[1][1]


def test_unknown_items_and_bad_arguments(tmp_path: Path) -> None:
    export_model(trained_like("hstu"), tmp_path / "m", item_ids=ITEMS)
    rec = load(tmp_path / "m")
    with pytest.raises(UnknownItemError, match="'nope'"):
        rec.recommend(["m1", "nope"])
    with pytest.raises(ValueError, match="history is empty"):
        rec.recommend([])
    with pytest.raises(ValueError, match="k must be >= 1"):
        rec.recommend(["m1"], k=0)
    with pytest.raises(ValueError, match="2 timestamps for 1 history items"):
        rec.recommend(["m1"], timestamps=[1, 2])


def test_weights_that_do_not_match_the_config_are_refused(tmp_path: Path) -> None:
    export_model(trained_like("hstu"), tmp_path / "m", item_ids=ITEMS)
    description = json.loads((tmp_path / "m.json").read_text())
    description["config"]["d_model"] = 12
    (tmp_path / "m.json").write_text(json.dumps(description))
    with pytest.raises(
        ExportError, match="m.safetensors does not match the config in m.json: .*shape"
    ):
        load(tmp_path / "m")


def test_missing_and_extra_tensors_are_named(tmp_path: Path) -> None:
    export_model(trained_like("hstu"), tmp_path / "m", item_ids=ITEMS)
    tensors = load_file(tmp_path / "m.safetensors")
    tensors.pop("item_emb.weight")
    tensors["stray"] = torch.zeros(1)
    save_file(tensors, tmp_path / "m.safetensors")
    with pytest.raises(ExportError, match="missing item_emb.weight; unexpected stray"):
        load(tmp_path / "m")


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda d: d.pop("config"), "missing 'config'"),
        (lambda d: d.update(arch="gpt"), "unknown arch 'gpt'"),
        (lambda d: d.update(format_version=99), "format version 99"),
        (lambda d: d.update(item_ids=["a"]), "1 item ids for 20 items"),
    ],
)
def test_a_damaged_description_is_a_clear_error(tmp_path: Path, damage, fragment: str) -> None:
    export_model(trained_like("hstu"), tmp_path / "m", item_ids=ITEMS)
    description = json.loads((tmp_path / "m.json").read_text())
    damage(description)
    (tmp_path / "m.json").write_text(json.dumps(description))
    with pytest.raises(ExportError, match=fragment):
        load(tmp_path / "m")


def test_missing_or_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no model description"):
        load(tmp_path / "absent")
    export_model(trained_like("hstu"), tmp_path / "m", item_ids=ITEMS)
    (tmp_path / "m.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        load(tmp_path / "m")


def test_export_checks_the_id_map_length(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="3 item ids for a model of 20 items"):
        export_model(trained_like("hstu"), tmp_path / "m", item_ids=["a", "b", "c"])
