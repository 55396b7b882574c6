"""Start-up checks and the plan of a run: what `vcr1/train.py --dry_run` prints, and what every real run checks
before any model is built.

`check(cfg)` looks at everything a run will need, and returns one line per problem (the run cannot start),
one line per warning (it can, but something will be skipped), and the plan (steps and examples):

- this machine: option values it cannot run (flash-attn, fp16, CUDA decoding, Triton without a GPU);
- the loss type and LM-head backend, against vcr1_kernels (where they are defined);
- the model: the checkpoint directory and its config.json; the model.init weights file;
- resuming: --resume true needs a checkpoint, --resume false refuses an earlier run's;
- every dataset (data.datasets and data.eval_datasets): its annotation file exists, parses, has a known format
  and task, and yields at least one usable example; its media root exists; and its videos exist: none found
  is a problem (naming the media root and a few missing paths), some missing a warning (those examples are
  skipped and counted at run time). The synthetic default is generated, so there is nothing to look at.

config.py stays a leaf (it imports no vcr1 module): the checks that need other modules, files or the GPU are here.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from vcr1.config import TrainConfig
from vcr1_kernels import IMPORTANCE_SAMPLING_LEVELS, LM_HEAD_BACKENDS, LOSS_TYPES

EXAMPLES_SHOWN = 3  # missing video paths named in a problem or warning line


@dataclass
class Report:
    problems: list = field(default_factory=list)  # one line each; any one stops the run (exit 2)
    warnings: list = field(default_factory=list)  # one line each; the run goes on
    plan: dict = field(default_factory=dict)


def check(cfg: TrainConfig, world: int | None = None) -> Report:
    """Every start-up check of a run of `cfg` with `world` processes (default: $WORLD_SIZE, else 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    report = Report()
    for problem in (unrunnable_here(cfg.model.attn, cfg.model.dtype, cfg.data.video.decode_device,
                                    cfg.engine.loss_backend), _fp16_problem(cfg.model.dtype)):
        if problem:
            report.problems.append(problem)
    from vcr1.packing import ATTENTION_BACKENDS

    for key, value, allowed in (("grpo.loss_type", cfg.grpo.loss_type, LOSS_TYPES),
                                ("engine.loss_backend", cfg.engine.loss_backend, LM_HEAD_BACKENDS),
                                ("grpo.importance_sampling_level", cfg.grpo.importance_sampling_level,
                                 IMPORTANCE_SAMPLING_LEVELS),
                                ("engine.attn_backend", cfg.engine.attn_backend, ("auto", *ATTENTION_BACKENDS))):
        if value not in allowed:
            report.problems.append(f"--{key}: {value!r} is not one of {', '.join(allowed)}")
    if problem := _attn_backend_problem(cfg):
        report.problems.append(problem)
    report.problems += _model_problems(cfg)
    if problem := _resume_problem(cfg):
        report.problems.append(problem)
    _plan(cfg, world, report)
    return report


# ------------------------------------------------------------------------------------------ machine

def _attn_backend_problem(cfg: TrainConfig) -> str | None:
    """Why --engine.attn_backend cannot run on this machine and dtype (checked here, not at the first step)."""
    from vcr1.packing import ATTENTION_BACKENDS, unavailable_reason

    backend = cfg.engine.attn_backend
    if backend == "auto" or backend not in ATTENTION_BACKENDS:
        return None
    import torch

    from vcr1.model import DTYPES

    device = torch.device("cuda" if _cuda_available() else "cpu")
    reason = unavailable_reason(backend, device, DTYPES[cfg.model.dtype])
    return f"--engine.attn_backend {backend}: {reason}" if reason else None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unrunnable_here(attn: str, dtype: str, decode_device: str = "auto", loss_backend: str = "auto") -> str | None:
    """Why these option values cannot run on this machine (one line), or None: checked at start-up so a run
    is refused before any work rather than failing at its first step."""
    import importlib.util

    cuda = _cuda_available()
    if attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return "--model.attn flash_attention_2 needs the flash-attn package (pip install 'vcr1[flash]'); use sdpa"
        if not cuda:
            return "--model.attn flash_attention_2 needs a CUDA GPU; use sdpa"
        if dtype == "fp32":
            return "--model.attn flash_attention_2 needs --model.dtype bf16 or fp16"
    if decode_device == "cuda" and not cuda:
        return "--data.video.decode_device cuda needs a CUDA GPU; use auto or cpu"
    if loss_backend == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return ("--engine.loss_backend triton needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU "
                "interpreter); use auto or torch")
    return None


def _fp16_problem(dtype: str) -> str | None:
    if dtype == "fp16" and not _cuda_available():
        return "--model.dtype fp16 needs a CUDA GPU (DeepSpeed has no fp16 mode on CPU); use bf16 or fp32"
    return None


# ------------------------------------------------------------------------------------ model, resume

def _model_problems(cfg: TrainConfig) -> list[str]:
    from vcr1.tiny import SHIPPED, init_file

    problems = []
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not path.is_dir():
            problems.append(f"--model {path}: no such directory")
        elif not (path / "config.json").is_file():
            problems.append(f"--model {path}: no config.json there (a local Qwen2.5-VL checkpoint is expected)")
    if cfg.model.init is not None:
        weights = init_file(cfg.model.init)
        if not weights.is_file():
            shipped = f" (the shipped file {weights})" if cfg.model.init == SHIPPED else ""
            problems.append(f"--model.init {cfg.model.init}: no such file{shipped} "
                            "(`python -m vcr1.warm_start` builds it)")
    return problems


def _resume_problem(cfg: TrainConfig) -> str | None:
    """What the trainer would refuse about --resume (Trainer._checkpoint_to_resume), before it starts."""
    from vcr1 import checkpoint

    out = Path(cfg.output_dir)
    if cfg.resume == "true":
        try:
            checkpoint.find_checkpoint(out, required=True)
        except FileNotFoundError as e:
            return str(e)
    if cfg.resume == "false" and any(checkpoint.is_complete(p) for p in (out / "checkpoints").glob("step-*")):
        return (f"{out}/checkpoints holds an earlier run's checkpoints: --resume auto or true continues it; or "
                "choose another --output_dir")
    return None


# -------------------------------------------------------------------------------------------- data

def planned_grpo_steps(cfg: TrainConfig, per_process: int) -> int:
    """GRPO optimizer steps of a run whose processes each hold `per_process` training examples."""
    if "grpo" not in cfg.stage:
        return 0
    steps = cfg.epochs * per_process // (cfg.prompts_per_step * cfg.grad_accum)
    return max(1, min(steps, cfg.max_steps) if cfg.max_steps else steps)


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Malformed entries are logged one by one when the run loads the data; the checks only count them."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _exists(video) -> bool:
    """A video file, a frame directory, or a list of frames that all exist."""
    if isinstance(video, (list, tuple)):
        return bool(video) and all(Path(v).is_file() for v in video)
    return Path(video).exists()


def _first_missing(video) -> str:
    if isinstance(video, (list, tuple)):
        return next((str(v) for v in video if not Path(v).is_file()), str(video))
    return str(video)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _load_dataset(ds: dict, label: str, report: Report) -> list | None:
    """The usable samples of one dataset, after its checks (None when they cannot be loaded)."""
    from vcr1.data.annotations import load_annotations

    path, root = Path(ds["annotations"]), Path(ds["media_root"])
    if not path.is_file():
        report.problems.append(f"{label}: annotation file {path} does not exist")
        return None
    try:
        with _quiet("vcr1.data.annotations"):
            samples, malformed = load_annotations(ds["task"], path, root, fmt=ds.get("fmt"), limit=ds.get("limit"))
    except (ValueError, OSError) as e:
        report.problems.append(_one_line(f"{label}: {e}"))
        return None
    except Exception as e:  # a file of an unforeseen shape: still one line, not a traceback
        report.problems.append(_one_line(f"{label}: cannot load {path}: {type(e).__name__}: {e}"))
        return None
    if not samples:
        report.problems.append(f"{label}: no usable example in {path} ({malformed} malformed entries skipped)")
        return None

    videos = {}
    for s in samples:
        videos.setdefault(tuple(s.video) if isinstance(s.video, list) else str(s.video), s.video)
    missing = [v for v in videos.values() if not _exists(v)]
    shown = ", ".join(_first_missing(v) for v in missing[:EXAMPLES_SHOWN])
    if not root.is_dir():
        what = f"none of its {len(videos)} videos found" if len(missing) == len(videos) else \
            f"{len(missing)} of its {len(videos)} videos missing"
        report.problems.append(f"{label}: media root {root} does not exist ({what}" +
                               (f", e.g. {shown})" if missing else ")"))
    elif len(missing) == len(videos):
        report.problems.append(f"{label}: none of its {len(videos)} videos exist under media root {root}, "
                               f"e.g. {shown}")
    elif missing:
        lost = sum(1 for s in samples if not _exists(s.video))
        report.warnings.append(f"{label}: {len(missing)} of its {len(videos)} videos are missing under media root "
                               f"{root}, e.g. {shown}: their {lost} examples will be skipped and counted in "
                               "skipped/media")
    report.plan.setdefault("_malformed", 0)
    report.plan["_malformed"] += malformed
    return samples


def _describe(ds: dict, samples: list, key: str, i: int) -> dict:
    return {"dataset": f"{key}[{i}]", "task": ds["task"], "annotations": ds["annotations"],
            "media_root": ds["media_root"], "examples": len(samples)}


def _per_task(samples) -> dict:
    counts = {}
    for s in samples:
        counts[s.task] = counts.get(s.task, 0) + 1
    return counts


def _plan(cfg: TrainConfig, world: int, report: Report):
    from vcr1.data.dataset import balanced_subset

    split = {}
    for key in ("datasets", "eval_datasets"):
        entries, everything = [], []
        for i, ds in enumerate(getattr(cfg.data, key)):
            samples = _load_dataset(ds, f"data.{key}[{i}] ({ds['task']}, {ds['annotations']})", report)
            if samples is not None:
                entries.append(_describe(ds, samples, f"data.{key}", i))
                everything += samples
        split[key] = (entries, everything)
    malformed = report.plan.pop("_malformed", 0)

    if cfg.data.datasets:
        train_entries, train = split["datasets"]
    else:  # the synthetic default: generated at start-up, so only counted here
        from vcr1.tasks import SYNTHETIC

        train_entries = [{"dataset": f"synthetic train ({task})", "task": task, "examples": cfg.data.synthetic_train}
                         for task in SYNTHETIC]
        train = [SimpleNamespace(task=t) for t in SYNTHETIC for _ in range(cfg.data.synthetic_train)]
    if cfg.data.eval_datasets:
        eval_entries, held_out = split["eval_datasets"]
    elif not cfg.data.datasets:
        from vcr1.tasks import SYNTHETIC

        eval_entries = [{"dataset": f"synthetic test ({task})", "task": task, "examples": cfg.data.synthetic_test}
                        for task in SYNTHETIC]
        held_out = [SimpleNamespace(task=t) for t in SYNTHETIC for _ in range(cfg.data.synthetic_test)]
    else:
        eval_entries, held_out = [], []
    scored = balanced_subset(held_out, cfg.eval_limit)

    per_process = (len(train) - len(train) % world) // world
    if len(train) < world and not report.problems:
        report.problems.append(f"{len(train)} training examples cannot feed {world} processes")
    warmup = cfg.sft.steps if "sft" in cfg.stage else 0
    per_step = cfg.prompts_per_step * cfg.grad_accum
    report.plan.update({
        "world_size": world,
        "warmup_steps": warmup,
        "grpo_steps": planned_grpo_steps(cfg, per_process) if per_process else 0,
        "grpo_steps_per_epoch": per_process // per_step,
        "prompts_per_grpo_step": per_step * world,
        "rollouts_per_grpo_step": per_step * world * cfg.grpo.num_generations,
        "train_examples": len(train),
        "train_examples_per_task": _per_task(train),
        "train_datasets": train_entries,
        "malformed_entries_skipped": malformed,
        "eval_examples": len(scored),
        "eval_examples_per_task": _per_task(scored),
        "eval_datasets": eval_entries,
    })
