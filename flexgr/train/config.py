"""Run configuration: one small dataclass per concern, read from TOML, overridable by ``--set``.

A config file has the sections ``[data]``, ``[model]``, ``[train]``, ``[eval]``, ``[parallel]``,
``[kernel]`` (:class:`flexgr.ops.kernel_options.KernelOptions`) and ``[versioned]``;
every key is optional and takes the default below. ``[model]`` holds ``arch`` plus the settings of
that architecture's config class (:class:`flexgr.model.HSTUConfig` or
:class:`flexgr.model.SASRecConfig`), except ``num_items`` and ``max_seq_len``, which come from the
dataset and ``data.max_seq_len``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from flexgr.data import PROTOCOLS
from flexgr.ops.kernel_options import KernelOptions
from flexgr.model.registry import MODELS, arch_fields, get_spec
from flexgr.ranking.config import RankingConfig, validate_ranking


class ConfigError(ValueError):
    """A config file, preset name or override that cannot be used; the message is one line."""


@dataclass
class DataConfig:
    dataset: str = "ml-1m"  # a built-in (prepared on first use) or a prepared dataset's name/path
    data_dir: str = ""  # "" means $FLEXGR_HOME, else ~/.cache/flexgr
    protocol: str = "loo-val"  # "loo-val" or "gr-compatible"; see docs/train.md
    max_seq_len: int = 200  # the most recent events a sequence keeps
    # Items the model ranks and samples negatives from: "rated" (every item some event
    # mentions), "catalog" (also the item file's never-rated items, as the reference HSTU
    # does), "auto" (catalog under gr-compatible, rated under loo-val).
    item_pool: Literal["auto", "rated", "catalog"] = "auto"
    # Where training sequences come from: "table" (the prepared dataset) or "versioned" (a
    # versioned-example store rebuilt by the late-materialization loader, docs/late-
    # materialization.md; dataset then names the store, evaluation reads its table).
    source: Literal["table", "versioned"] = "table"


@dataclass
class VersionedConfig:
    """The versioned-example loader (data.source = "versioned")."""

    affinity: bool = False  # group each shuffle window by user: one tier scan per user and batch
    shuffle_window: int = 1024  # examples grouped together under affinity
    prefetch: int = 0  # batches rebuilt ahead on a background thread; 0 = inline
    cache_stripes: int = 64  # decoded tier stripes kept for neighbouring batches


@dataclass
class ModelConfig:
    arch: str = "hstu"
    # Settings of the architecture's config class; unset keys take that class's defaults.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    seed: int = 42
    max_epochs: int = 100
    patience: int = 20  # epochs without a better validation metric before stopping; 0 = never
    max_steps: int = 0  # stop after this many optimizer steps in total; 0 = no limit
    # Stop training after this many minutes of this invocation's wall time (evaluations
    # included; a resumed run starts a new budget); 0 = no limit. Like max_steps, the cut epoch
    # is evaluated and test is read at the selected epoch, so a run cut by a job's time limit
    # still reports. One process only: ranks would reach the deadline at different steps.
    max_minutes: float = 0.0
    batch_size: int = 128  # users (sequences) per step
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up to lr, then the schedule
    # "constant", or "cosine": a half cosine from lr to lr * min_lr_ratio over the run
    # (max_steps if set, else max_epochs epochs); see flexgr/train/schedule.py
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping
    # Stochastic Length (HSTU paper 3.2): alpha in (1, 2] shortens long training windows at
    # random so a step's attention cost is O(N^alpha); 0 = off. sl_selection picks the events
    # kept: "recent", "random" or "weighted" (docs/stochastic-length.md).
    sl_alpha: float = 0.0
    sl_selection: Literal["recent", "random", "weighted"] = "recent"
    # Load-balanced SL (ULTRA-HSTU) for data parallelism: after sl_balance_warmup plain-SL
    # steps, each rank's lengths are chosen so its cost sum n^2 + beta n is close to the mean
    # plain-SL rank load, re-estimated every sl_balance_every steps; beta < 0 derives it from
    # the model's FLOPs (flexgr/train/load_balance.py, docs/long-sequences.md).
    sl_balance: bool = False
    sl_balance_warmup: int = 20
    sl_balance_every: int = 100
    sl_balance_beta: float = -1.0
    num_negatives: int = 128
    temperature: float = 0.05
    # The softmax's negatives (flexgr/train/loss.py, docs/train.md#loss): "uniform" (the
    # reference's: num_negatives drawn per position), "full" (every item of the pool),
    # "in_batch" (the batch's other targets plus num_negatives uniform ones).
    negatives: Literal["uniform", "full", "in_batch"] = "uniform"
    # in_batch: subtract log(I q_i) from each in-batch item's logit, q_i its frequency among
    # the batch's targets (its in-batch sampling probability); false: no correction.
    logq_correction: bool = True
    label_smoothing: float = 0.0  # share of the target spread evenly over the candidates
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32", or "tf32" (fp32 with TF32
    # matmuls on CUDA: the reference HSTU trainer's enable_tf32 setting)
    precision: str = "auto"
    # Opt-in: on the H100, a compiled ml-1m-hstu run had not finished its first epoch after 100 s
    # (a recompile per new packed length), while eager runs at ~18 ms a step.
    compile: bool = False  # torch.compile the model on CUDA; CPU runs stay eager
    # Replay the whole step (forward, loss, backward, optimizer) from CUDA graphs, one per
    # padded shape: T rounded up to graph_bucket tokens (flexgr/train/graphs.py). One process,
    # retrieval, no compile/recompute/in-batch negatives; CPU runs stay eager.
    cuda_graphs: bool = False
    graph_bucket: int = 1024
    # "layers": run each layer under activation checkpointing (keep its input only, recompute
    # the rest in backward; docs/train.md); "selective" (HSTU only): keep the attention, recompute
    # the projections and the gated norm around it; "none": keep every activation.
    recompute: Literal["none", "layers", "selective"] = "none"
    # Refuse to start when model.backend cannot run as configured (instead of running the
    # backend it would fall back to); the choice is logged in metrics.jsonl either way.
    strict_backend: bool = False
    deterministic: bool = False
    num_workers: int = -1  # DataLoader workers; -1 = auto (0: batches build in the main process)
    log_every: int = 50  # steps between training records (and host syncs for the loss)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    # Warm start (flexgr/train/warm_start.py): an exported model (a run directory, or PATH for
    # PATH.safetensors + PATH.json) whose weights start a new run, and the submodule they load
    # into ("" = the whole model; "towers" starts GESR from a two-tower run). Same items only;
    # a resumed run ignores both (its checkpoint holds every weight).
    init_from: str = ""
    init_module: str = ""


@dataclass
class EvalConfig:
    # Users per evaluation batch; 0 = auto: 1024 on CUDA, 64 on CPU (measured: on 2 CPU cores
    # ML-100K evaluates in 0.5 s with 64 and 4 s with 1024, as the dense CPU attention spills
    # out of cache).
    batch_size: int = 0
    ks: list[int] = field(default_factory=lambda: [1, 10, 50, 200])
    # Items left out of a user's ranking: "all" its earlier items, "window" only those in the
    # model's input (the max_seq_len most recent events; the reference HSTU rule), "none";
    # "auto": window under gr-compatible, all under loo-val.
    exclude_history: Literal["auto", "all", "window", "none"] = "auto"
    item_chunk: int = 65536  # items scored at once: bounds memory at batch_size x item_chunk
    metric: str = "ndcg@10"  # validation metric for best epoch and early stopping
    # "train": evaluate under the training autocast (bf16 on CUDA by default); "fp32": without
    # autocast, as `flexgr eval` and the reference trainer's evaluation do.
    precision: Literal["train", "fp32"] = "train"


def item_pool(cfg: Config) -> Literal["rated", "catalog"]:
    """The item pool the run uses, ``data.item_pool`` with "auto" resolved by the protocol."""
    pool = cfg.data.item_pool
    if pool == "auto":
        return "catalog" if cfg.data.protocol == "gr-compatible" else "rated"
    return pool


def exclusion(cfg: Config) -> Literal["all", "window", "none"]:
    """What evaluation excludes, ``eval.exclude_history`` with "auto" resolved by the protocol."""
    mode = cfg.eval.exclude_history
    if mode == "auto":
        return "window" if cfg.data.protocol == "gr-compatible" else "all"
    return mode


def eval_batch_size(cfg: EvalConfig, device_type: str) -> int:
    if cfg.batch_size:
        return cfg.batch_size
    return 1024 if device_type == "cuda" else 64


@dataclass
class ParallelConfig:
    """Data and context parallel degrees under torchrun (see docs/distributed.md). ``dp = 1``
    means world_size / cp; a ``dp`` above 1 must make dp * cp equal the world size."""

    dp: int = 1
    cp: int = 1


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernel: KernelOptions = field(default_factory=KernelOptions)  # the Triton kernels' knobs
    versioned: VersionedConfig = field(default_factory=VersionedConfig)
    # What a ranking model predicts and how events become examples (flexgr.ranking); written
    # out for ranking archs only.
    ranking: RankingConfig = field(default_factory=RankingConfig)

    @property
    def is_ranking(self) -> bool:
        return get_spec(self.model.arch).task == "ranking"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Resolved config: every key with its value (model settings included), for TOML."""
        out: dict[str, dict[str, Any]] = {}
        for name in SECTIONS:
            if name == "ranking" and not self.is_ranking:
                continue
            if name == "model":
                out[name] = {"arch": self.model.arch, **self.model_options()}
            else:
                out[name] = dataclasses.asdict(getattr(self, name))
        return out

    def model_options(self) -> dict[str, Any]:
        """All settings of the model's config class: the defaults, then the given options."""
        fields = arch_fields(self.model.arch)
        resolved = {name: _field_default(f) for name, f in fields.items()}
        resolved.update(self.model.options)
        return resolved


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "parallel": ParallelConfig,
    "kernel": KernelOptions,
    "versioned": VersionedConfig,
    "ranking": RankingConfig,
}


# ---------------------------------------------------------------- reading


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a Config from parsed TOML."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section [{unknown[0]}] (sections: {', '.join(SECTIONS)})"
        )
    cfg = Config()
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {name} must be a [{name}] table")
        if name == "model":
            cfg.model = _model_from_table(table, source)
            continue
        section = getattr(cfg, name)
        hints = typing.get_type_hints(cls)
        if name == "eval" and isinstance(table.get("exclude_history"), bool):
            # Before the window rule, this key was a boolean (run dirs keep old config.toml).
            table = {**table, "exclude_history": "all" if table["exclude_history"] else "none"}
        for key, value in table.items():
            if key not in hints:
                raise ConfigError(_unknown_key(source, f"{name}.{key}", list(hints)))
            setattr(section, key, _check_type(value, hints[key], f"{name}.{key}", source))
    if raw.get("ranking") and not cfg.is_ranking:
        raise ConfigError(
            f"{source}: [ranking] applies to ranking models (model.arch one of "
            f"{', '.join(n for n, s in MODELS.items() if s.task == 'ranking')}), not "
            f"{cfg.model.arch!r}"
        )
    validate(cfg)
    return cfg


def _model_from_table(table: dict[str, Any], source: str) -> ModelConfig:
    arch = table.get("arch", ModelConfig.arch)
    if arch not in MODELS:
        raise ConfigError(f"{source}: model.arch {arch!r} is not one of {', '.join(MODELS)}")
    fields = arch_fields(arch)
    options: dict[str, Any] = {}
    for key, value in table.items():
        if key == "arch":
            continue
        if key not in fields:
            raise ConfigError(
                _unknown_key(source, f"model.{key}", ["arch", *fields], f" for arch {arch!r}")
            )
        hint = typing.get_type_hints(_config_cls(arch))[key]
        options[key] = _check_type(value, hint, f"model.{key}", source)
    return ModelConfig(arch=arch, options=options)


def _config_cls(arch: str) -> type:
    return get_spec(arch).config_cls


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no such config file: {path}") from None
    return _parse(text, str(path))


def _parse(text: str, source: str) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: invalid TOML: {err}") from None
    return config_from_dict(raw, source)


# ---------------------------------------------------------------- presets


def preset_names() -> list[str]:
    root = resources.files("flexgr.configs")
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r} (presets: {', '.join(names)})")
    return resources.files("flexgr.configs").joinpath(f"{name}.toml").read_text(encoding="utf-8")


def load_preset(name: str) -> Config:
    return _parse(preset_text(name), f"preset {name}")


# ---------------------------------------------------------------- overrides


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings in order; values are parsed by the field's type.

    ``model.arch`` is applied first, so the other model keys are checked against the new arch.
    """
    raw = cfg.to_dict()
    raw["model"] = {"arch": cfg.model.arch, **cfg.model.options}  # keep "unset" unset
    parsed = [_split_override(text) for text in overrides]
    parsed.sort(key=lambda item: (item[0], item[1]) != ("model", "arch"))
    raw.setdefault("ranking", {})
    for section, key, value in parsed:
        if section not in SECTIONS:
            raise ConfigError(
                f"--set {section}.{key}: unknown section {section!r} "
                f"(sections: {', '.join(SECTIONS)})"
            )
        if section == "model":
            if key == "arch":
                raw["model"]["arch"] = value
                continue
            arch = raw["model"]["arch"]
            if arch not in MODELS:
                raise ConfigError(f"--set model.arch: {arch!r} is not one of {', '.join(MODELS)}")
            fields = arch_fields(arch)
            if key not in fields:
                raise ConfigError(
                    _unknown_key("--set", f"model.{key}", ["arch", *fields], f" for arch {arch!r}")
                )
            hint = typing.get_type_hints(_config_cls(arch))[key]
        else:
            hints = typing.get_type_hints(SECTIONS[section])
            if key not in hints:
                raise ConfigError(_unknown_key("--set", f"{section}.{key}", list(hints)))
            hint = hints[key]
        raw[section][key] = _parse_value(value, hint, f"{section}.{key}")
    new_arch = raw["model"]["arch"]
    if new_arch in MODELS and MODELS[new_arch].task != "ranking":
        if not any(s == "ranking" for s, _, _ in parsed):
            raw.pop("ranking")  # the old arch's [ranking]; a --set ranking.* is still refused
    if raw["model"]["arch"] != cfg.model.arch:
        # Settings shared by both archs carry over; the rest belonged to the old arch.
        fields = arch_fields(raw["model"]["arch"]) if raw["model"]["arch"] in MODELS else {}
        set_keys = {k for s, k, _ in parsed if s == "model"}
        raw["model"] = {
            k: v for k, v in raw["model"].items() if k == "arch" or k in fields or k in set_keys
        }
    return config_from_dict(_drop_none(raw), "--set")


def _split_override(text: str) -> tuple[str, str, str]:
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.lr=3e-4")
    return section, key.strip(), value.strip()


def _parse_value(text: str, hint: Any, name: str) -> Any:
    inner, optional = _unwrap_optional(hint)
    if optional and text.lower() in ("none", "null", ""):
        return None
    if typing.get_origin(inner) is Literal:
        if text not in typing.get_args(inner):
            raise ConfigError(f"--set {name}={text}: expected {_type_name(hint)}")
        return text
    try:
        if inner is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
        if inner is str:
            return text
        if typing.get_origin(inner) is list:
            (item,) = typing.get_args(inner)
            parts = [p.strip() for p in text.strip("[]").split(",") if p.strip()]
            return [_parse_value(p, item, name) for p in parts]
    except ValueError:
        raise ConfigError(f"--set {name}={text}: expected {_type_name(hint)}") from None
    raise ConfigError(f"--set {name}: unsupported field type {_type_name(hint)}")


# ---------------------------------------------------------------- checks


def validate(cfg: Config) -> None:
    """Value checks that the types alone do not catch; raise ConfigError naming the key."""
    d, t, e, p = cfg.data, cfg.train, cfg.eval, cfg.parallel
    _require(d.protocol in PROTOCOLS, f"data.protocol must be one of {', '.join(PROTOCOLS)}")
    _require(d.max_seq_len >= 1, "data.max_seq_len must be >= 1")
    _require(t.max_epochs >= 1, "train.max_epochs must be >= 1")
    for key in ("patience", "max_steps", "warmup_steps", "checkpoint_every"):
        _require(getattr(t, key) >= 0, f"train.{key} must be >= 0")
    _require(t.max_minutes >= 0, "train.max_minutes must be >= 0")
    _require(not t.init_module or bool(t.init_from), "train.init_module needs train.init_from")
    _require(t.batch_size >= 1, "train.batch_size must be >= 1")
    _require(t.lr > 0, "train.lr must be > 0")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
    _require(t.num_negatives >= 1, "train.num_negatives must be >= 1")
    _require(t.sl_alpha == 0 or 1 < t.sl_alpha <= 2, "train.sl_alpha must be 0 (off) or in (1, 2]")
    _require(not t.sl_balance or t.sl_alpha > 0, "train.sl_balance needs train.sl_alpha")
    _require(
        t.sl_balance_warmup >= 1 and t.sl_balance_every >= 1,
        "train.sl_balance_warmup and train.sl_balance_every must be >= 1",
    )
    _require(t.temperature > 0, "train.temperature must be > 0")
    _require(0 <= t.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
    _require(
        t.logq_correction or t.negatives == "in_batch",
        "train.logq_correction = false applies to train.negatives = 'in_batch' only",
    )
    _require(t.log_every >= 1, "train.log_every must be >= 1")
    _require(t.num_workers >= -1, "train.num_workers must be >= 0, or -1 for auto")
    _require(
        t.precision in ("auto", "bf16", "fp32", "tf32"),
        "train.precision must be auto, bf16, fp32 or tf32",
    )
    _require(e.batch_size >= 0, "eval.batch_size must be >= 1, or 0 for auto")
    _require(e.item_chunk >= 1, "eval.item_chunk must be >= 1")
    _require(bool(e.ks) and all(k >= 1 for k in e.ks), "eval.ks must be a list of K >= 1")
    allowed = {f"{m}@{k}" for m in ("hr", "ndcg") for k in e.ks} | {"mrr"}
    _require(e.metric in allowed, f"eval.metric must be one of {', '.join(sorted(allowed))}")
    try:
        dataclasses.replace(cfg.kernel)  # runs KernelOptions' own checks
    except ValueError as err:
        raise ConfigError(str(err)) from None
    v = cfg.versioned
    _require(v.shuffle_window >= 1, "versioned.shuffle_window must be >= 1")
    _require(v.prefetch >= 0 and v.cache_stripes >= 0, "versioned.prefetch/cache_stripes >= 0")
    _require(
        d.source == "table" or t.sl_alpha == 0,
        "train.sl_alpha (Stochastic Length) needs data.source=table",
    )
    _require(p.dp >= 1, "parallel.dp must be >= 1")
    _require(p.cp >= 1, "parallel.cp must be >= 1")
    spec = get_spec(cfg.model.arch)
    if p.cp > 1 and cfg.model_options().get("truncate_after", 0):
        raise ConfigError("attention truncation (model.truncate_after) needs parallel.cp=1")
    if p.cp > 1 and not spec.capabilities.context_parallel:
        able = ", ".join(n for n, s in MODELS.items() if s.capabilities.context_parallel)
        raise ConfigError(
            f"parallel.cp={p.cp} needs a model with context parallelism ({able}): it splits each "
            f"sequence over ranks and adds the ranks' partial attention sums, which works for "
            f"HSTU's pointwise attention; {cfg.model.arch}'s softmax attention would need a "
            f"log-sum-exp merge across ranks (not implemented); use parallel.cp=1 (data "
            f"parallelism only)"
        )
    if spec.task == "retrieval" and t.recompute == "selective" and cfg.model.arch != "hstu":
        # flexgr/train/recompute.py splits HSTU layers around their attention; other stacks
        # have no such split (refused, not run as "layers": the two measure differently).
        raise ConfigError(
            f"train.recompute = 'selective' needs HSTU layers; {cfg.model.arch} has none "
            f"(use train.recompute = 'layers')"
        )
    if t.cuda_graphs:
        _validate_graphs(cfg, spec.task)
    if spec.validate is not None:
        try:
            spec.validate(cfg.model_options())
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.model_options().get("drop_path", 0.0) and cfg.model.arch != "hstu":
        # hstu-ranking inherits the field from HSTUConfig; its trainer is not tested with it.
        raise ConfigError(f"model.drop_path is implemented for arch 'hstu', not {cfg.model.arch!r}")
    if spec.task == "ranking":
        if p.cp > 1 or p.dp > 1 or d.source != "table":
            raise ConfigError(
                "ranking models train in one process from the prepared table "
                "(parallel.dp = cp = 1, data.source = table)"
            )
        if t.negatives != "uniform" or t.label_smoothing or not t.logq_correction:
            raise ConfigError(
                "train.negatives, train.logq_correction and train.label_smoothing set the "
                "retrieval loss; ranking models take none of them (leave uniform, true, 0)"
            )
        if t.sl_alpha or t.recompute != "none" or t.compile:
            raise ConfigError(
                "train.sl_alpha, train.recompute and train.compile are not implemented for "
                "ranking models; leave them at 0, none and false"
            )
        try:
            validate_ranking(cfg.ranking)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _validate_graphs(cfg: Config, task: str) -> None:
    """train.cuda_graphs replays one process's whole retrieval step at fixed shapes; what would
    change a step's shapes or sync with the host inside it is refused here, by name."""
    t, p, options = cfg.train, cfg.parallel, cfg.model_options()
    _require(t.graph_bucket >= 1, "train.graph_bucket must be >= 1")
    # Dummy sequences hold the padding: up to max_seq_len tokens each, at least 2.
    _require(cfg.data.max_seq_len >= 2, "train.cuda_graphs needs data.max_seq_len >= 2")
    _require(task == "retrieval", "train.cuda_graphs is implemented for retrieval models only")
    # Under torchrun parallel.dp = 1 still means "all ranks": train.parallel checks the launch.
    _require(
        p.dp == 1 and p.cp == 1, "train.cuda_graphs runs in one process (parallel.dp = cp = 1)"
    )
    _require(
        cfg.data.source == "table",
        "train.cuda_graphs needs data.source = table (versioned batches are not padded yet)",
    )
    refused = {
        "train.compile": t.compile,
        "train.recompute": t.recompute != "none",
        # The padding's dummy targets would join the in-batch candidates.
        "train.negatives = 'in_batch'": t.negatives == "in_batch",
        # Truncation keeps a data-dependent row count (a host sync); a mixture of transducers
        # splits the batch by stream, likewise.
        "model.truncate_after": bool(options.get("truncate_after", 0)),
        "model.mot_streams > 1": options.get("mot_streams", 1) > 1,
    }
    named = [name for name, on in refused.items() if on]
    _require(not named, f"train.cuda_graphs does not combine with {', '.join(named)}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_type(value: Any, hint: Any, name: str, source: str) -> Any:
    inner, _ = _unwrap_optional(hint)
    ok: bool
    if typing.get_origin(inner) is Literal:
        ok = value in typing.get_args(inner) and isinstance(value, str)
    elif inner is bool:
        ok = isinstance(value, bool)
    elif inner is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif inner is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif inner is str:
        ok = isinstance(value, str)
    elif typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner)
        ok = isinstance(value, list)
        if ok:
            value = [_check_type(v, item, name, source) for v in value]
    else:
        ok = True
    if not ok:
        raise ConfigError(
            f"{source}: {name} must be {_type_name(hint)}, got {type(value).__name__} {value!r}"
        )
    return value


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _type_name(hint: Any) -> str:
    inner, optional = _unwrap_optional(hint)
    if typing.get_origin(inner) is Literal:
        name = "one of " + ", ".join(map(str, typing.get_args(inner)))
    elif typing.get_origin(inner) is list:
        name = f"a list of {_type_name(typing.get_args(inner)[0])}"
    else:
        name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
            inner, str(inner)
        )
    return f"{name} or none" if optional else name


def _unknown_key(source: str, name: str, known: list[str], extra: str = "") -> str:
    section = name.split(".")[0]
    return f"{source}: unknown key {name!r}{extra} (keys of [{section}]: {', '.join(known)})"


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ConfigError(f"model setting {f.name!r} has no default")


def _drop_none(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    # TOML has no null; an absent key means "the default", which is what None stands for here.
    return {s: {k: v for k, v in t.items() if v is not None} for s, t in raw.items()}


# ---------------------------------------------------------------- writing


def dump_config(cfg: Config) -> str:
    """The resolved config as TOML (keys whose value is None are left out: TOML has no null)."""
    lines: list[str] = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text if any(c in text for c in ".eEn") else text + ".0"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
