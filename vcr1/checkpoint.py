"""Atomic, durable checkpoints: Hugging Face weights (+ tokenizer and processor files) that `from_pretrained`
loads, plus the DeepSpeed engine state, every process's RNG and data position, and the trainer state,
so `--resume` continues exactly, and the run's resolved config (`vcr1_config.yaml`: the data, prompt and
generation settings `python -m vcr1.eval` evaluates it with). A checkpoint is written under a temporary name,
flushed to disk and renamed when whole; `checkpoints/latest` names the newest. Each run has an id, stored in its
checkpoints' trainer_state.json, so pruning removes only the run's own checkpoints.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import yaml

from vcr1.distributed import barrier

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
                   "processor_config.json")
ENGINE_TAG = "state"  # DeepSpeed's tag: the engine state lives in <checkpoint>/engine/state
RUN_CONFIG = "vcr1_config.yaml"  # the resolved config of the run that wrote the checkpoint


def fsync(path: Path):
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path):
    """fsync every file under `root`, then each directory after its entries (deepest first)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync(Path(folder) / name)
        fsync(Path(folder))


def write_atomic(path: Path, text: str):
    """Replace `path` by `text` durably: after a crash it holds the old text or the new, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out_dir: Path, step: int, *, engine, tokenizer, zero_stage: int, rank: int, trainer_state: dict,
         rank_state: dict, model_src: str | None, run_id: str, keep: int, protect: int = 0,
         run_config: dict | None = None) -> Path:
    """Write checkpoint `step` of run `run_id`; every process calls it. Returns the final directory.
    `run_config` (the run's resolved config as a dict) is saved as RUN_CONFIG beside the weights.

    Then prune this run's checkpoints to the newest `keep` (0 keeps all); the checkpoint of step `protect`
    (the end of the warm-up, which is π_ref) and other runs' checkpoints are never pruned. Only rank 0's
    `run_id` is stored. A checkpoint already named `step` (of any run) is replaced."""
    root = out_dir / "checkpoints"
    final, tmp = root / protected_name(step), root / f"{protected_name(step)}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()

    model = engine.module
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else model.state_dict()
    if rank == 0:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name in PROCESSOR_FILES:
            if model_src and (Path(model_src) / name).is_file():
                shutil.copy2(Path(model_src) / name, tmp / name)
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "run_id": run_id}, indent=1))
        if run_config is not None:
            (tmp / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
    engine.save_checkpoint(str(tmp / "engine"), tag=ENGINE_TAG)
    torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank{rank}.pt")
    barrier()
    # Every process fsyncs the whole tree: fsync flushes only this machine's cached writes, so on a filesystem
    # shared by several nodes each node must flush the files it wrote (and DeepSpeed, not us, names the engine
    # shards). Files written elsewhere have nothing cached here, so fsyncing them too costs little.
    fsync_tree(tmp)
    barrier()

    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync(root)  # the rename is on disk before `latest` names it
        write_atomic(root / "latest", final.name)
        _prune(root, run_id, keep, protect)
    barrier()
    return final


def _prune(root: Path, run_id: str, keep: int, protect: int):
    if keep <= 0:
        return
    own = sorted((p for p in root.glob("step-*") if _step(p) not in (None, protect) and run_id_of(p) == run_id),
                 key=_step)
    for old in own[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def protected_name(step: int) -> str:
    return f"step-{step:06d}"


def _step(path: Path) -> int | None:
    """The step of a checkpoint directory's name; None for anything else (such as an unfinished `.tmp`)."""
    m = re.fullmatch(r"step-(\d+)", path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def run_id_of(path: Path) -> str | None:
    """The id of the run that wrote checkpoint `path`; None when unknown (then it is never pruned)."""
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def is_complete(path: Path) -> bool:
    """A checkpoint renamed into place (never a `.tmp`), with its trainer state and engine state."""
    return (not path.name.endswith(".tmp") and (path / "trainer_state.json").is_file()
            and (path / "engine" / ENGINE_TAG).is_dir())


def find_checkpoint(out_dir: Path, *, required: bool = False) -> Path | None:
    """The checkpoint `checkpoints/latest` names, when complete. Otherwise None, or with `required` a
    FileNotFoundError that says what is wrong."""
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        problem = f"{pointer} does not exist"
    else:
        path = pointer.parent / pointer.read_text().strip()
        if is_complete(path):
            return path
        problem = f"{pointer} names {path}, which is {'incomplete' if path.exists() else 'missing'}"
    if required:
        raise FileNotFoundError(f"no checkpoint to resume from: {problem} "
                                "(--resume auto starts fresh when there is none)")
    return None


def run_config(path: Path) -> Path | None:
    """The saved config of the run that wrote checkpoint `path`, when it has one."""
    found = Path(path) / RUN_CONFIG
    return found if found.is_file() else None


def load(path: Path, *, engine, rank: int) -> tuple[dict, dict]:
    """Restore engine (weights, optimizer, scheduler) and this process's RNG; return (trainer, rank) states.
    The trainer state holds the `run_id` to continue the run under."""
    engine.load_checkpoint(str(path / "engine"), tag=ENGINE_TAG, load_optimizer_states=True,
                           load_lr_scheduler_states=True)
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} is missing: resume with the same number of processes")
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return json.loads((path / "trainer_state.json").read_text()), rank_state
