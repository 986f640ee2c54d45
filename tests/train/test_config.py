from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from flexgr.train import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    load_preset,
    preset_names,
)

REPO = Path(__file__).resolve().parents[2]


def test_presets_are_the_top_level_configs_directory() -> None:
    on_disk = sorted(p.stem for p in (REPO / "configs").glob("*.toml"))
    assert on_disk == preset_names()
    assert {"ml-1m-sasrec", "ml-1m-hstu", "ml-1m-hstu-large", "ml-100k-hstu"} <= set(on_disk)


@pytest.mark.parametrize("name", ["ml-1m-sasrec", "ml-1m-hstu", "ml-1m-hstu-large"])
def test_ml1m_presets_use_the_reference_settings(name: str) -> None:
    cfg = load_preset(name)
    opts = cfg.model_options()
    assert cfg.data.dataset == "ml-1m" and cfg.data.max_seq_len == 200
    assert opts["d_model"] == 50 and opts["dropout"] == 0.2
    # 512 negatives: flexgr's choice on validation, the one departure (reference-differences.md)
    assert cfg.train.num_negatives == 512 and cfg.train.temperature == 0.05
    assert cfg.train.batch_size == 128 and cfg.train.lr == 1e-3
    assert (cfg.train.beta1, cfg.train.beta2, cfg.train.weight_decay) == (0.9, 0.98, 0.0)
    if name == "ml-1m-hstu-large":
        assert (opts["num_layers"], opts["num_heads"], opts["dqk"], opts["dv"]) == (8, 2, 25, 25)
    else:
        assert (opts["num_layers"], opts["num_heads"]) == (2, 1)
    assert cfg.model.arch == ("sasrec" if "sasrec" in name else "hstu")
    if name == "ml-1m-sasrec":  # the reference's block, chosen on validation
        assert opts["layout"] == "reference"


@pytest.mark.parametrize("name", preset_names())
def test_dump_then_load_is_identity(name: str, tmp_path: Path) -> None:
    cfg = load_preset(name)
    path = tmp_path / "c.toml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()


def test_dump_escapes_strings_and_writes_floats_toml_reads_back() -> None:
    cfg = apply_overrides(Config(), ['data.data_dir=C:\\x "y"\ttab', "train.lr=1e-05"])
    parsed = tomllib.loads(dump_config(cfg))
    assert parsed["data"]["data_dir"] == 'C:\\x "y"\ttab'
    assert parsed["train"]["lr"] == 1e-05
    assert isinstance(parsed["train"]["weight_decay"], float)


def test_overrides_are_typed_by_the_field() -> None:
    cfg = apply_overrides(
        Config(),
        [
            "train.lr=3e-4",
            "train.max_steps=7",
            "train.compile=false",
            "eval.ks=1,5,10",
            "model.alpha=0.25",
            "data.protocol=gr-compatible",
        ],
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.train.compile is False
    assert cfg.eval.ks == [1, 5, 10]
    assert cfg.model_options()["alpha"] == 0.25
    assert cfg.data.protocol == "gr-compatible"
    back = apply_overrides(cfg, ["model.alpha=none"])
    assert back.model_options()["alpha"] is None


def test_unknown_keys_are_named() -> None:
    with pytest.raises(ConfigError, match="'train.lrr'"):
        apply_overrides(Config(), ["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        apply_overrides(Config(), ["trian.lr=1"])
    with pytest.raises(ConfigError, match="'model.ffn_dim' for arch 'hstu'"):
        apply_overrides(Config(), ["model.ffn_dim=3"])
    with pytest.raises(ConfigError, match="unknown key 'eval.k'"):
        config_from_dict({"eval": {"k": 3}})
    with pytest.raises(ConfigError, match=r"unknown section \[optim\]"):
        config_from_dict({"optim": {}})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lr=abc", "expected a number"),
        ("train.compile=maybe", "expected a boolean"),
        ("train.max_steps=1.5", "expected an integer"),
        ("train.lr", "expected section.key=value"),
        ("data.protocol=random", "data.protocol must be one of"),
        ("eval.metric=ndcg@7", "eval.metric must be one of"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
    ],
)
def test_bad_values_are_clear_errors(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides(Config(), [override])


def test_file_values_are_type_checked(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[train]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_config(path)
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_parallel_section_is_checked_where_no_launch_is_needed() -> None:
    cfg = config_from_dict({"parallel": {"dp": 2, "cp": 4}})
    assert (cfg.parallel.dp, cfg.parallel.cp) == (2, 4)  # checked against the world at launch
    with pytest.raises(ConfigError, match="parallel.cp must be >= 1"):
        config_from_dict({"parallel": {"cp": 0}})
    with pytest.raises(ConfigError, match=r"parallel.cp=2 needs a model with context parallelism \(hstu\)"):
        config_from_dict({"model": {"arch": "sasrec"}, "parallel": {"cp": 2}})
    assert config_from_dict({"model": {"arch": "sasrec"}, "parallel": {"dp": 2}}).parallel.dp == 2


def test_switching_arch_keeps_shared_settings_and_drops_the_rest() -> None:
    cfg = apply_overrides(
        load_preset("ml-1m-hstu-large"), ["model.arch=sasrec", "model.ffn_dim=64"]
    )
    opts = cfg.model_options()
    assert cfg.model.arch == "sasrec"
    assert opts["num_layers"] == 8 and opts["ffn_dim"] == 64
    assert "dqk" not in opts


def test_unset_model_settings_take_the_architecture_defaults() -> None:
    from flexgr.model import HSTUConfig

    opts = config_from_dict({"model": {"arch": "hstu", "d_model": 8}}).model_options()
    assert opts["d_model"] == 8
    assert opts["num_time_buckets"] == HSTUConfig.num_time_buckets


def test_protocol_picks_exclusion_and_item_pool_unless_set() -> None:
    from flexgr.train.config import exclusion, item_pool

    loo = Config()
    assert (exclusion(loo), item_pool(loo)) == ("all", "rated")
    gr = apply_overrides(Config(), ["data.protocol=gr-compatible"])
    assert (exclusion(gr), item_pool(gr)) == ("window", "catalog")
    mine = apply_overrides(gr, ["eval.exclude_history=none", "data.item_pool=rated"])
    assert (exclusion(mine), item_pool(mine)) == ("none", "rated")
    assert tomllib.loads(dump_config(mine))["eval"]["exclude_history"] == "none"


def test_choice_fields_name_their_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one of auto, all, window, none"):
        apply_overrides(Config(), ["eval.exclude_history=most"])
    with pytest.raises(ConfigError, match="data.item_pool must be one of auto, rated, catalog"):
        config_from_dict({"data": {"item_pool": "every"}})
    # Run directories from before the window rule wrote a boolean; it still reads.
    old = tmp_path / "old.toml"
    old.write_text("[eval]\nexclude_history = false\n")
    assert load_config(old).eval.exclude_history == "none"
