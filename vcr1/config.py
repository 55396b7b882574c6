"""One typed config tree. Defaults are the paper's (docs/paper.md §1–2). A run reads one recipe file:
`--config FILE`, or without it configs/tiny.yaml (the tiny embedded default). Precedence: defaults < the file <
--key value flags.

This module is a leaf: it imports no vcr1 module. Checks that need other modules, the data or this machine
(tasks and annotation formats, loss types and LM-head backends, files, videos, the GPU) are vcr1/preflight.py's.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DTYPE_NAMES = ("bf16", "fp16", "fp32")
SCHEDULERS = ("linear", "cosine", "constant")
# HF attention implementations vcr1 runs. Not "eager": the packed forward replaces attention through
# transformers' attention registry, which eager bypasses; sdpa is the exact reference.
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2")
# The recipe a run reads when --config is not given: the tiny embedded default.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


class ConfigError(ValueError):
    """A bad option, value or YAML file: reported before any work starts."""


def opt(default, help: str, choices=None):
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DatasetConfig:
    task: str = opt("", "task of this dataset: a built-in name (tg, tracking, gqa, mcq) or module:Class")
    annotations: str = opt("", "annotation file (Charades/ActivityNet JSON, NExT-GQA JSON, GOT-10k JSON or JSONL)")
    media_root: str = opt("", "folder the annotation's video paths are relative to")
    fmt: str | None = opt(None, "annotation format: charades, nextgqa, got10k or jsonl (auto-detected when unset)")
    limit: int | None = opt(None, "use at most this many examples")


@dataclass
class ModelConfig:
    path: str | None = opt(None, "local Qwen2.5-VL checkpoint dir; unset = the tiny embedded model")
    init: str | None = opt(None, "weights the tiny embedded model starts from: warm_start = the file vcr1 ships "
                                 "(vcr1/assets/warm_start.safetensors), or a file `python -m vcr1.warm_start` "
                                 "writes; none = random")
    dtype: str = opt("bf16", "parameter/compute dtype", DTYPE_NAMES)
    attn: str = opt("sdpa", "attention implementation of the HF model", ATTN_IMPLEMENTATIONS)
    gradient_checkpointing: bool = opt(True, "recompute activations in backward")
    freeze_vision: bool = opt(False, "freeze the vision tower and merger (the paper trains all parameters)")


@dataclass
class VideoConfig:
    fps: float = opt(2.0, "frames sampled per second")
    min_frames: int = opt(4, "fewest frames sampled")
    max_frames: int = opt(768, "most frames sampled")
    min_pixels: int = opt(16 * 28 * 28, "smallest frame area after resize")
    max_pixels: int = opt(768 * 28 * 28, "largest frame area after resize")
    total_pixels: int = opt(3584 * 28 * 28, "pixel budget of a whole video")
    decode_device: str = opt("auto", "where videos are decoded: auto (the GPU when there is one), cpu or cuda",
                             ("auto", "cpu", "cuda"))


@dataclass
class DataConfig:
    datasets: list = opt([], "datasets: list of {task, annotations, media_root, fmt, limit}; empty = synthetic")
    eval_datasets: list = opt([], "held-out datasets for --eval_every (same schema); empty = synthetic test split")
    think: bool = opt(True, "prompts and format reward ask for a <think> block")
    interleave_tasks: bool = opt(False, "order each epoch task by task in turn (the same task mix in every "
                                        "step) instead of one shuffle of all examples")
    reshuffle: bool = opt(True, "a new order every epoch; false repeats the first epoch's order, so the same "
                                "step of each epoch draws the same prompts")
    synthetic_train: int = opt(32, "synthetic examples per task, train split")
    synthetic_test: int = opt(12, "synthetic examples per task, held-out split")
    synthetic_dir: str | None = opt(None, "where the synthetic set is written (default <output_dir>/synthetic)")
    video: VideoConfig = field(default_factory=VideoConfig)


@dataclass
class GRPOConfig:
    num_generations: int = opt(8, "G: rollouts per prompt")
    temperature: float = opt(1.0, "sampling temperature")
    top_k: int | None = opt(50, "top-k sampling (unset = off)")
    top_p: float = opt(1.0, "nucleus sampling")
    max_completion_length: int = opt(1024, "most tokens generated per rollout")
    beta: float = opt(0.04, "KL weight (0 = no reference model is loaded)")
    epsilon_low: float = opt(0.2, "lower clip of the ratio")
    epsilon_high: float = opt(0.2, "upper clip of the ratio")
    delta: float | None = opt(None, "two-sided clipping bound of the ratio (unset = off)")
    # Its values are vcr1_kernels.LOSS_TYPES: train.py hands them to the parser, vcr1/preflight.py checks them.
    loss_type: str = opt("grpo", "loss aggregation")
    scale_rewards: str = opt("group", "advantage std: per group, per batch or none", ("group", "batch", "none"))
    num_iterations: int = opt(1, "mu: policy updates per rollout batch")
    reward_weights: dict = opt({}, "weight per reward component, e.g. {iou: 2.0}; missing = 1")
    importance_sampling_level: str = opt("token", "one importance ratio per token, or per completion: the "
                                                  "exp of its mean log-ratio (GSPO)")
    tis_cap: float | None = opt(None, "truncated importance sampling: weight each token's policy-gradient term "
                                      "by min(pi_old / pi_rollout, C), C this cap (unset = off)")
    dynamic_sampling: bool = opt(False, "drop groups whose rewards are all equal and roll out more prompts "
                                        "until the step is full (DAPO)")
    max_sampling_rounds: int = opt(3, "most rounds of prompts a step rolls out with dynamic_sampling")
    dynamic_sampling_metric: str = opt("accuracy", "the reward whose equal values across a group drop it: a "
                                                   "component (DAPO's accuracy; a task without it: its total) or "
                                                   "total")
    mask_truncated: bool = opt(False, "completions that hit max_completion_length take no part in the loss "
                                      "(DAPO's overlong filtering)")
    overlong_buffer: int = opt(0, "DAPO's soft overlong penalty: a reward component falling from 0 to -1 over "
                                  "the last N tokens before max_completion_length (0 = off)")


@dataclass
class SFTConfig:
    steps: int = opt(0, "supervised warm-up steps on the ground-truth answers before GRPO (0 = none)")
    lr: float = opt(1e-5, "warm-up learning rate")
    scheduler: str = opt("constant", "warm-up LR schedule, from sft.lr over sft.steps", SCHEDULERS)
    batch_size: int = opt(8, "examples per process per warm-up step")


@dataclass
class OptimConfig:
    lr: float = opt(1e-6, "GRPO learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    betas: list = opt([0.9, 0.999], "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)")
    scheduler: str = opt("linear", "GRPO's LR schedule", SCHEDULERS)
    warmup_steps: int = opt(0, "linear warm-up steps")


@dataclass
class EngineConfig:
    zero_stage: int = opt(3, "DeepSpeed ZeRO stage", (0, 1, 2, 3))
    offload: bool = opt(True, "ZeRO CPU offload of parameters (stage 3) and optimizer")
    fast_rollout: bool = opt(True, "vcr1's rollout engine; off = HF generate (the reference)")
    shared_prefix: bool = opt(True, "the video prompt once per group in packed forwards; off = repeated padded")
    # Its values are vcr1_kernels.LM_HEAD_BACKENDS (as loss_type's are LOSS_TYPES).
    loss_backend: str = opt("auto", "LM-head kernels: triton, torch (reference) or auto")
    nvtx: bool = opt(False, "emit NVTX ranges per phase (for nsys)")
    sync_timings: bool = opt(False, "synchronize the GPU after each phase so time/* charges GPU work to the "
                                    "phase that queued it (on with --engine.nvtx; a host sync per phase)")
    check_values: bool = opt(False, "check the values of the loss inputs on every call (token ids in range, "
                                    "sequence boundaries); each check is a host sync")
    attn_backend: str = opt("auto", "packed attention kernel (vcr1/packing.py); auto: flex on CUDA, prefix on CPU")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    stage: str = opt("sft+grpo", "what to run", ("sft", "grpo", "sft+grpo"))
    prompts_per_step: int = opt(1, "prompts per process per micro-batch (the paper: 1 per GPU)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    epochs: int = opt(1, "passes over the training data")
    max_steps: int | None = opt(None, "stop after this many GRPO optimizer steps (unset = epochs)")
    output_dir: str = opt("outputs/vcr1", "where config, metrics, samples, plots and checkpoints go")
    save_every: int = opt(100, "checkpoint every N GRPO steps (and at the end, and on SIGTERM/SIGINT)")
    save_minutes: float = opt(30.0, "also checkpoint when this many minutes have passed since the last one "
                                    "(0 = off): bounds what a preemption loses")
    keep_checkpoints: int = opt(2, "checkpoints kept on disk")
    eval_every: int = opt(0, "evaluate on the held-out split every N GRPO steps (0 = off)")
    eval_limit: int = opt(64, "held-out examples per evaluation")
    eval_batch_size: int | None = opt(None, "held-out prompts answered together per process "
                                            "(unset = prompts_per_step)")
    eval_before_after: bool = opt(False, "evaluate on the held-out split when GRPO starts and when it ends, "
                                         "and print a before/after table")
    log_every: int = opt(1, "print progress every N steps")
    samples_every: int = opt(10, "write sample completions every N steps")
    resume: str = opt("auto", "continue from the checkpoint output_dir/checkpoints/latest names: auto (start "
                              "fresh if there is none), true (stop if there is none), false (stop if there is one)",
                      ("auto", "true", "false"))
    seed: int = opt(0, "seed of data order, sampling and init")
    wandb: bool = opt(False, "also log to Weights & Biases")


def _fields(cls, prefix=""):
    """(dotted key, dataclasses.Field, type) for every leaf option of the tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], key + ".")
        else:
            yield key, f, hints[f.name]


LEAVES = {key: (f, tp) for key, f, tp in _fields(TrainConfig)}
ALIASES = {"model": "model.path"}  # `--model DIR` as the product promises


def _convert(key: str, value, tp):
    """Cast a YAML or CLI value to the option's type; a bad value is a ConfigError."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    base = args[0] if optional else tp
    if isinstance(value, str):
        if optional and value.lower() in ("none", "null", ""):
            return None
        if typing.get_origin(base) in (list, dict) or base in (list, dict):
            value = yaml.safe_load(value)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"--{key}: a value is required")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is str and isinstance(value, bool):  # YAML reads `resume: true` as a bool
            return str(value).lower()
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return base(value)
        origin = typing.get_origin(base) or base
        if not isinstance(value, origin):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"--{key}: {value!r} is not a valid {getattr(base, '__name__', base)}") from None


def _choices(key: str, choices: dict | None):
    """The allowed values of option `key`: its field's, or those the caller passes (see parse_config)."""
    return (choices or {}).get(key) or LEAVES[key][0].metadata.get("choices")


def _set(cfg: TrainConfig, key: str, value, choices: dict | None = None):
    if key not in LEAVES:
        close = difflib.get_close_matches(key, LEAVES, n=3)
        hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
        raise ConfigError(f"unknown option --{key}{hint}; see --help")
    f, tp = LEAVES[key]
    if key in ("data.datasets", "data.eval_datasets"):
        value = [_dataset(e, key) for e in (yaml.safe_load(value) if isinstance(value, str) else value or [])]
    value = _convert(key, value, tp)
    allowed = _choices(key, choices)
    if allowed and value not in allowed:
        raise ConfigError(f"--{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    obj = cfg
    *parents, name = key.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, name, value)


def get(cfg: TrainConfig, key: str):
    """The value of dotted option `key`."""
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _flatten(tree: dict, prefix="") -> dict:
    flat = {}
    for k, v in tree.items():
        key = prefix + str(k)
        if isinstance(v, dict) and key not in LEAVES:
            flat.update(_flatten(v, key + "."))
        else:
            flat[ALIASES.get(key, key)] = v
    return flat


def _dataset(entry, key: str) -> dict:
    """A dataset as a dict: from YAML, or `task:annotations:media_root` on the command line (the task may itself
    be an import path `module:Class`, so the last two colons split). Its task and format are checked where
    they are defined, when the file is loaded (vcr1/preflight.py)."""
    if isinstance(entry, str):
        parts = entry.rsplit(":", 2)
        if len(parts) != 3:
            raise ConfigError(f"--{key}: {entry!r} is not task:annotations:media_root")
        entry = dict(zip(("task", "annotations", "media_root"), parts))
    if not isinstance(entry, dict):
        raise ConfigError(f"--{key}: each dataset must be a mapping, got {entry!r}")
    ds = DatasetConfig()
    for k, v in entry.items():
        if not hasattr(ds, k):
            raise ConfigError(f"--{key}: unknown dataset field {k!r} (task, annotations, media_root, fmt, limit)")
        v = _convert(f"{key}.{k}", v, typing.get_type_hints(DatasetConfig)[k])
        setattr(ds, k, v)
    if not ds.task or not ds.annotations or not ds.media_root:
        raise ConfigError(f"--{key}: a dataset needs a task, annotations and media_root")
    return dataclasses.asdict(ds)


def _validate(cfg: TrainConfig, source: Path, flags: set):
    """The values' own rules (no file, module or machine is looked at: vcr1/preflight.py does that)."""
    g = cfg.grpo
    checks = [
        (g.num_generations >= 2, "grpo.num_generations must be >= 2 (advantages are relative within a group)"),
        (g.temperature > 0, "grpo.temperature must be > 0"),
        (0 < g.top_p <= 1, "grpo.top_p must be in (0, 1]"),
        (g.top_k is None or g.top_k > 0, "grpo.top_k must be > 0 or unset"),
        (g.max_completion_length > 0, "grpo.max_completion_length must be > 0"),
        (g.beta >= 0, "grpo.beta must be >= 0"),
        (0 <= g.epsilon_low < 1 and g.epsilon_high >= 0, "grpo.epsilon_low must be in [0, 1), epsilon_high >= 0"),
        (g.delta is None or g.delta > 1 + g.epsilon_high, "grpo.delta must exceed 1 + epsilon_high"),
        (g.num_iterations >= 1, "grpo.num_iterations must be >= 1"),
        (g.tis_cap is None or g.tis_cap > 0, "grpo.tis_cap must be > 0 or unset"),
        (g.max_sampling_rounds >= 1, "grpo.max_sampling_rounds must be >= 1"),
        (0 <= g.overlong_buffer < g.max_completion_length, "grpo.overlong_buffer must be in [0, max_completion_len)"),
        (cfg.prompts_per_step >= 1 and cfg.grad_accum >= 1, "prompts_per_step and grad_accum must be >= 1"),
        (cfg.sft.steps >= 0 and cfg.sft.batch_size >= 1, "sft.steps must be >= 0 and sft.batch_size >= 1"),
        (cfg.max_steps is None or cfg.max_steps >= 1, "max_steps must be >= 1 or unset"),
        (cfg.eval_batch_size is None or cfg.eval_batch_size >= 1, "eval_batch_size must be >= 1 or unset"),
        (cfg.epochs >= 1, "epochs must be >= 1"),
        (cfg.save_every >= 1 and cfg.save_minutes >= 0, "save_every must be >= 1 and save_minutes >= 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (len(cfg.optim.betas) == 2, "optim.betas must be two numbers"),
        (cfg.stage != "sft" or cfg.sft.steps > 0, "stage sft needs sft.steps > 0"),
        (cfg.data.video.min_frames >= 2 and cfg.data.video.max_frames >= cfg.data.video.min_frames,
         "data.video: need 2 <= min_frames <= max_frames"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    for name, value in g.reward_weights.items():
        if not isinstance(value, (int, float)):
            raise ConfigError(f"grpo.reward_weights.{name}: {value!r} is not a number")
    if cfg.model.init is not None and cfg.model.path is not None:
        if "model.path" in flags and "model.init" not in flags:  # `--model DIR` over a tiny model's recipe
            raise ConfigError(f"--model {cfg.model.path}: {_display(source)} is the tiny embedded model's recipe "
                              f"(model.init {cfg.model.init}); for a Qwen2.5-VL checkpoint pass --config "
                              "configs/videochat_r1_7b.yaml (or your own recipe) with --model")
        raise ConfigError("--model.init sets the tiny embedded model's weights; a --model checkpoint has its own "
                          "(set model.init to none)")


def _help_value(value) -> str:
    return "none" if value is None else str(value)


def build_parser(cfg: TrainConfig | None = None, source: Path | None = None,
                 choices: dict | None = None) -> argparse.ArgumentParser:
    """The CLI. Each option's help shows, as its default, its value in `cfg` (the config file read from
    `source` applied to the paper's defaults); `choices` adds allowed values defined outside this module."""
    cfg = cfg if cfg is not None else TrainConfig()
    where = f"the paper's, with {_display(source)} applied" if source else "the paper's"
    p = argparse.ArgumentParser(
        prog="torchrun vcr1/train.py",
        description="vcr1: GRPO of Qwen2.5-VL on video tasks. A run reads one recipe: --config FILE, or "
                    f"without it {_display(DEFAULT_CONFIG)} (the tiny embedded model on a synthetic dataset); "
                    "--key value flags override it. Options are the config tree's dotted keys; the defaults "
                    f"shown are the values this run would use: {where}.",
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="FILE",
                   help=f"YAML recipe with any of the options below (nested or dotted keys) "
                        f"(default: {_display(DEFAULT_CONFIG)})")
    p.add_argument("--data", nargs="+", metavar="SPEC",
                   help="datasets (replace data.datasets): YAML files holding a list of datasets, or "
                        "task:annotations:media_root")
    p.add_argument("--dry_run", action="store_true",
                   help="check the config, the model and every dataset (annotations, media, videos), print the "
                        "resolved config and the planned steps, then exit: 0 when runnable, else 2")
    for key, (f, _) in LEAVES.items():
        allowed = _choices(key, choices)
        extra = f" {{{', '.join(map(str, allowed))}}}" if allowed else ""
        flags = ["--" + key] + (["--model"] if key == "model.path" else [])
        p.add_argument(*flags, dest=key, default=argparse.SUPPRESS, metavar="V",
                       help=f"{f.metadata['help']}{extra} (default: {_help_value(get(cfg, key))})")
    return p


def _display(path: Path) -> str:
    """A config path as a user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_config_file(path: Path, choices: dict | None = None) -> TrainConfig:
    """The paper's defaults with the YAML file `path` applied; every problem is a ConfigError."""
    cfg = TrainConfig()
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: {e}".replace("\n", " ")) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--config {path}: expected a mapping at the top level")
    try:
        for k, v in _flatten(tree).items():
            _set(cfg, k, v, choices)
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None
    return cfg


def parse_cli(argv: list[str] | None = None, *, choices: dict | None = None) -> tuple[TrainConfig, dict]:
    """(config, CLI-only options {"dry_run", "config"}) from the paper's defaults, the config file (--config,
    else DEFAULT_CONFIG) and flags. `choices`: {dotted key: allowed values} for options whose values are
    defined outside this leaf module (train.py passes vcr1_kernels's loss types and LM-head backends).
    Every error is a ConfigError."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    source = Path(known.config) if known.config else DEFAULT_CONFIG
    if not known.config and not source.is_file():
        raise ConfigError(f"the default recipe {source} is missing: pass --config FILE")
    base = read_config_file(source, choices)

    parser = build_parser(base, source, choices)  # --help exits here, showing the file's values
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _set(TrainConfig(), unknown[0].lstrip("-").split("=")[0], None)  # reports the unknown key
        raise ConfigError(f"unexpected argument {unknown[0]!r}")
    args = vars(args)
    args.pop("config", None)
    dry_run = args.pop("dry_run", False)
    data_specs = args.pop("data", None)

    cfg = copy.deepcopy(base)
    for k, v in args.items():
        _set(cfg, k, v, choices)
    if data_specs:
        cfg.data.datasets = [_dataset(e, "data") for spec in data_specs for e in _read_data_spec(spec)]
    _validate(cfg, source, set(args) | ({"data.datasets"} if data_specs else set()))
    return cfg, {"dry_run": dry_run, "config": source}


def parse_config(argv: list[str] | None = None, *, choices: dict | None = None) -> TrainConfig:
    """The config of `argv` (see parse_cli); every error is a ConfigError."""
    return parse_cli(argv, choices=choices)[0]


def _read_data_spec(spec: str) -> list:
    if spec.endswith((".yaml", ".yml")):
        try:
            tree = yaml.safe_load(Path(spec).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--data {spec}: {e}") from None
        tree = tree.get("datasets", tree) if isinstance(tree, dict) else tree
        if not isinstance(tree, list):
            raise ConfigError(f"--data {spec}: expected a list of datasets (or a `datasets:` key)")
        return tree
    return [spec]


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
