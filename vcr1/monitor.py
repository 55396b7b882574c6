"""Run outputs on the main process: metrics.jsonl (one line per optimizer step, also across a resume),
TensorBoard, optional W&B, sample completions, progress lines and the reward-curve plot."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch

from vcr1.checkpoint import write_atomic


class Monitor:
    """`resume_step`: the step of the checkpoint a resumed run continues from; None for a fresh run."""

    def __init__(self, out_dir: Path, *, enabled: bool, wandb_run: bool = False, config: dict | None = None,
                 resume_step: int | None = None):
        self.out_dir, self.enabled = out_dir, enabled
        self.tb = self.wandb = None
        self.start = time.time()
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for name in ("metrics.jsonl", "samples.jsonl"):
                _keep_until(out_dir / name, resume_step)
        mode = "w" if resume_step is None else "a"
        self.metrics = open(out_dir / "metrics.jsonl", mode)
        self.samples = open(out_dir / "samples.jsonl", mode)
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides the killed run's events after `resume_step`, which this run logs again.
        self.tb = SummaryWriter(str(out_dir / "tensorboard"),
                                purge_step=None if resume_step is None else resume_step + 1)
        if wandb_run:
            import wandb

            self.wandb = wandb.init(project="vcr1", config=config, dir=str(out_dir), resume="allow")

    def log(self, row: dict):
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.metrics.write(json.dumps(clean) + "\n")
        self.metrics.flush()
        step = row["step"]
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                self.tb.add_scalar(f"{row['stage']}/{k}", v, step)
        if self.wandb:
            self.wandb.log({k: v for k, v in clean.items() if k != "step"}, step=step)

    def sync(self):
        """Flush metrics and samples to disk (before a checkpoint, which a resume truncates them to)."""
        if not self.enabled:
            return
        for f in (self.metrics, self.samples):
            f.flush()
            os.fsync(f.fileno())

    def log_samples(self, step: int, records: list[dict]):
        if not self.enabled:
            return
        for r in records:
            self.samples.write(json.dumps({"step": step, **r}) + "\n")
        self.samples.flush()

    def progress(self, text: str):
        if self.enabled:
            print(f"[{time.time() - self.start:7.1f}s] {text}", flush=True)

    def close(self):
        if not self.enabled:
            return
        self.metrics.close()
        self.samples.close()
        self.tb.close()
        if self.wandb:
            self.wandb.finish()
        plot_rewards(self.out_dir / "metrics.jsonl", self.out_dir / "reward_curve.png")


def _keep_until(path: Path, step: int):
    """Drop the rows of `path` after `step`, which the resumed run logs again, and any line a kill tore.
    Replaced atomically, so a kill meanwhile loses nothing."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, TypeError, KeyError):
            continue  # torn by the kill
    write_atomic(path, "".join(kept))


def plot_rewards(metrics_path: Path, png: Path):
    """Mean reward per GRPO step, each task's total beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("stage") == "grpo" and r.get("reward") is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, rewards = [r["step"] for r in rows], [r["reward"] for r in rows]
    ax.plot(steps, rewards, label="mean reward", lw=1, color="C0", alpha=0.5)
    window = max(1, len(rows) // 10)
    smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
              for i in range(len(rewards))]
    ax.plot(steps, smooth, label=f"mean reward, {window}-step average", lw=2.5, color="C0")
    totals = sorted({k for r in rows for k in r if k.startswith("reward/") and k.endswith("/total")})
    for i, key in enumerate(totals, start=1):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*pts), label=key.removeprefix("reward/").removesuffix("/total"), alpha=0.4, color=f"C{i}")
    ax.set_xlabel("optimizer step (GRPO stage)")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


_nvtx = None  # the nvtx module once profiling is switched on; None keeps every range free


def enable_nvtx(vision_tower=None):
    """Emit NVTX ranges from here on (for `nsys profile`), also around each vision-tower forward."""
    global _nvtx
    import nvtx

    _nvtx = nvtx
    if vision_tower is not None:
        vision_tower.register_forward_pre_hook(lambda *_: nvtx.push_range("vision_tower"))
        vision_tower.register_forward_hook(lambda *_: nvtx.pop_range())


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range when profiling is on; nothing at all otherwise."""
    if _nvtx is None:
        yield
        return
    _nvtx.push_range(name)
    try:
        yield
    finally:
        _nvtx.pop_range()


class Phases:
    """Wall time per phase of a step, each inside an NVTX range when profiling is on. With `sync` the GPU
    is synchronized at the end of each phase, so its asynchronous work is charged to the phase that
    queued it; without, no phase waits for the GPU (GPU time lands wherever the host next waits)."""

    def __init__(self, sync: bool = False):
        self.times: dict[str, float] = {}
        self.sync = sync

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        with nvtx_range(name):
            yield
            if self.sync and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        times, self.times = self.times, {}
        return {f"time/{k}": round(v, 4) for k, v in times.items()}
