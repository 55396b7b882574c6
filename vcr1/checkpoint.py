"""Atomic checkpoints: Hugging Face weights (+ tokenizer and processor files) that `from_pretrained`
loads, plus the DeepSpeed engine state, every process's RNG and data position, and the trainer state,
so `--resume` continues exactly. A checkpoint is written under a temporary name and renamed when whole.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from vcr1.engine import barrier

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
                   "processor_config.json")


def _write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
         rank_state: dict, model_src: str | None, keep: int, protect: int = 0) -> Path:
    """Write checkpoint `step`; every process calls it. Returns the final directory.

    The checkpoint of step `protect` (the end of the warm-up, which is π_ref) is never pruned."""
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
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    engine.save_checkpoint(str(tmp / "engine"), tag="state")
    torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank{rank}.pt")
    barrier()

    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _write_atomic(root / "latest", final.name)
        done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                      and p.name != protected_name(protect))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def protected_name(step: int) -> str:
    return f"step-{step:06d}"


def latest(out_dir: Path) -> Path | None:
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load(path: Path, *, engine, rank: int) -> tuple[dict, dict]:
    """Restore engine (weights, optimizer, scheduler) and this process's RNG; return (trainer, rank) states."""
    engine.load_checkpoint(str(path / "engine"), tag="state", load_optimizer_states=True,
                           load_lr_scheduler_states=True)
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} is missing: resume with the same number of processes")
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return json.loads((path / "trainer_state.json").read_text()), rank_state
