from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

import flexgr
from flexgr.train import dump_config, load_preset
from tests.cli.helpers import assert_one_line_error, run
from tests.conftest import tiny_config

COMMANDS = ["train", "eval", "export", "recommend", "score", "presets", "data", "env"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"flexgr {flexgr.__version__}"


def test_no_arguments_means_the_ml1m_hstu_preset() -> None:
    result = run("train", "--print-config")
    assert result.exit_code == 0, result.output
    assert result.stdout == dump_config(load_preset("ml-1m-hstu"))


def test_print_config_applies_overrides_in_type() -> None:
    result = run(
        "train",
        "--preset",
        "ml-1m-sasrec",
        "--set",
        "train.lr=2e-4",
        "-s",
        "eval.ks=5,10",
        "--deterministic",
        "--print-config",
    )
    parsed = tomllib.loads(result.stdout)
    assert parsed["train"]["lr"] == 2e-4 and parsed["eval"]["ks"] == [5, 10]
    assert parsed["train"]["deterministic"] is True and parsed["model"]["arch"] == "sasrec"


def test_presets_command() -> None:
    listed = json.loads(run("presets", "--json").stdout)
    assert "ml-100k-hstu" in listed
    assert "[model]" in run("presets", "ml-1m-hstu-large").stdout
    assert_one_line_error(run("presets", "nope"), "unknown preset 'nope'")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "--set", "train.lrr=1", "--print-config"], ["unknown key 'train.lrr'"]),
        (["train", "--set", "model.heads=2", "--print-config"], ["'model.heads'", "arch 'hstu'"]),
        (["train", "--preset", "nope"], ["unknown preset 'nope'"]),
        (["train", "x.toml", "--preset", "ml-1m-hstu"], ["not both"]),
        (["train", "--resume"], ["--resume needs --run-dir"]),
        (["train", "missing.toml"], ["no such config file: missing.toml"]),
        (
            ["train", "--set", "model.arch=sasrec", "--set", "parallel.cp=2", "--print-config"],
            ["parallel.cp=2 needs a model with context parallelism (hstu)", "sasrec"],
        ),
        (
            ["train", "--set", "parallel.cp=2", "--run-dir", "never/created"],
            ["parallel.cp=2 does not divide the world size 1", "torchrun --nproc-per-node"],
        ),
        (["eval", "--run-dir", "no/such/run"], ["no run directory at no/such/run"]),
        (["recommend", "--run-dir", "no/such/run", "--user", "1"], ["no run directory"]),
        (["export", "--run-dir", "no/such/run", "--out", "x"], ["no run directory"]),
    ],
)
def test_user_errors_are_one_line(args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(run(*args), *fragments)


@pytest.fixture(scope="module")
def trained_run(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained through the CLI from a config file plus overrides."""
    root = tmp_path_factory.mktemp("cli-run")
    config = root / "tiny.toml"
    config.write_text(dump_config(tiny_config(tiny_home)))
    run_dir = root / "run"
    result = run(
        "train", config, "--set", "train.max_epochs=2", "--run-dir", run_dir, "--json", "-q"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epoch"] in (1, 2) and 0 <= summary["test"]["ndcg@10"] <= 1
    return run_dir


def test_eval_matches_the_final_record(trained_run: Path) -> None:
    result = run("eval", "--run-dir", trained_run, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    final = next(
        r
        for r in map(json.loads, (trained_run / "metrics.jsonl").read_text().splitlines())
        if r.get("final")
    )
    assert metrics["split"] == "test"
    for name in ("hr@10", "ndcg@10", "mrr", "users"):
        assert metrics[name] == pytest.approx(final[name], abs=1e-12)
    table = run("eval", "--run-dir", trained_run, "--split", "val", "--weights", "last")
    assert table.exit_code == 0 and "NDCG@K" in table.stdout
    # Fewer exclusions leave more items in the way: the rank can only get worse.
    by_rule = {}
    for rule in ("all", "window", "none"):
        result = run("eval", "--run-dir", trained_run, "--exclude-history", rule, "--json")
        assert result.exit_code == 0, result.output
        by_rule[rule] = json.loads(result.stdout)["mrr"]
    assert by_rule["all"] == pytest.approx(metrics["mrr"], abs=1e-12)
    assert by_rule["all"] >= by_rule["window"] >= by_rule["none"]
    assert by_rule["all"] > by_rule["none"]


def test_export_then_load(trained_run: Path, tmp_path: Path) -> None:
    result = run("export", "--run-dir", trained_run, "--out", tmp_path / "exported")
    assert result.exit_code == 0, result.output
    rec = flexgr.load(tmp_path / "exported")
    original = flexgr.load(trained_run)
    history = ["i1", "i2", "i3"]
    assert rec.recommend(history, k=5) == original.recommend(history, k=5)
    best = run("export", "--run-dir", trained_run, "--out", tmp_path / "best", "--weights", "best")
    assert best.exit_code == 0, best.output
    assert flexgr.load(tmp_path / "best").recommend(history, k=5) == rec.recommend(history, k=5)


def test_recommend_for_a_dataset_user(trained_run: Path, tiny_home: Path) -> None:
    from flexgr.data import load_prepared

    result = run("recommend", "--run-dir", trained_run, "--user", "u3", "--k", "4", "--json")
    assert result.exit_code == 0, result.output
    items = json.loads(result.stdout)
    data = load_prepared("tiny", data_dir=tiny_home)
    seen = {data.item_ids[i - 1] for i in data.items[data.events_of(data.user_index("u3"))]}
    assert len(items) == 4 and not seen & set(items)
    with_seen = json.loads(
        run(
            "recommend",
            "--run-dir",
            trained_run,
            "--user",
            "u3",
            "--k",
            "30",
            "--include-seen",
            "--json",
        ).stdout
    )
    assert seen <= set(with_seen)
    table = run("recommend", "--run-dir", trained_run, "--user", "u3")
    assert table.exit_code == 0 and "rank" in table.stdout


def test_recommend_unknown_user(trained_run: Path) -> None:
    assert_one_line_error(
        run("recommend", "--run-dir", trained_run, "--user", "ghost"), "unknown user id 'ghost'"
    )


def test_train_refuses_an_existing_run_and_resumes_it(trained_run: Path) -> None:
    assert_one_line_error(run("train", "--run-dir", trained_run), "already holds a run", "--resume")
    resumed = run("train", "--run-dir", trained_run, "--resume", "-q")
    assert resumed.exit_code == 0, resumed.output


def test_gr_compatible_run_has_no_val_split(tiny_home: Path, tmp_path: Path) -> None:
    config = tmp_path / "gr.toml"
    config.write_text(
        dump_config(tiny_config(tiny_home, "data.protocol=gr-compatible", "train.max_steps=2"))
    )
    assert run("train", config, "--run-dir", tmp_path / "run", "-q").exit_code == 0
    assert_one_line_error(
        run("eval", "--run-dir", tmp_path / "run", "--split", "val"),
        "gr-compatible has no validation",
    )


def test_resume_without_checkpoint(tmp_path: Path, tiny_home: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(dump_config(tiny_config(tiny_home)))
    assert_one_line_error(
        run("train", "--run-dir", run_dir, "--resume"), "no checkpoint to resume from"
    )
    assert_one_line_error(run("eval", "--run-dir", run_dir), "no exported model yet")


def test_unavailable_device_is_a_one_line_error(tiny_home: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    config = tmp_path / "c.toml"
    config.write_text(dump_config(tiny_config(tiny_home, "train.device=cuda")))
    run_dir = tmp_path / "run"
    assert_one_line_error(run("train", config, "--run-dir", run_dir), "CUDA is not available")
    # Nothing was trained, so the same run directory can be used once the config is fixed.
    config.write_text(dump_config(tiny_config(tiny_home, "train.max_steps=1")))
    assert run("train", config, "--run-dir", run_dir, "-q").exit_code == 0


def test_score_candidates_with_m_falcon(trained_run: Path, tiny_home: Path) -> None:
    import torch

    from flexgr.batch import JaggedBatch
    from flexgr.data import load_prepared
    from flexgr.model import encode

    result = run("score", "--run-dir", trained_run, "--user", "u3", "--candidates",
                 "i1,i5,i9", "--microbatch", "2", "--json")
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert [item for item, _ in scored] == ["i1", "i5", "i9"]
    # Each score is the candidate scored alone as the one target after the user's history.
    rec = flexgr.load(trained_run)
    data = load_prepared("tiny", data_dir=tiny_home)
    events = data.events_of(data.user_index("u3"))
    ids, ts, qt = rec.history_tensors([data.item_ids[i - 1] for i in data.items[events]],
                                      data.timestamps[events].tolist())
    for item, score in scored:
        c = rec.item_index(item)
        batch = JaggedBatch(torch.cat([ids, torch.tensor([c])]), torch.tensor([0, len(ids) + 1]),
                            torch.cat([ts, torch.tensor([qt])]), torch.tensor([qt]),
                            torch.tensor([1]))
        with torch.no_grad():
            want = float(encode(rec.model, batch)[-1] @ rec.model.item_embeddings()[c])
        assert score == pytest.approx(want, abs=1e-5)
    assert_one_line_error(run("score", "--run-dir", trained_run, "--user", "u3",
                              "--candidates", "nope"), "unknown item id 'nope'")
    assert_one_line_error(run("score", "--run-dir", trained_run, "--user", "u3",
                              "--candidates", ","), "--candidates is empty")
