"""Run outputs on the main process: metrics.jsonl (one line per optimizer step), TensorBoard, optional
W&B, sample completions, progress lines and the reward-curve plot."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


class Monitor:
    def __init__(self, out_dir: Path, *, enabled: bool, wandb_run: bool = False, config: dict | None = None,
                 resume: bool = False):
        self.out_dir, self.enabled = out_dir, enabled
        self.tb = self.wandb = None
        self.start = time.time()
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if resume else "w"
        self.metrics = open(out_dir / "metrics.jsonl", mode)
        self.samples = open(out_dir / "samples.jsonl", mode)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / "tensorboard"))
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
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], label="mean reward", lw=2)
    for key in sorted({k for r in rows for k in r if k.startswith("reward/") and k.endswith("/total")}):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*pts), label=key.removeprefix("reward/").removesuffix("/total"), alpha=0.6)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


class Phases:
    """Wall time per phase of a step, and NVTX ranges around each phase when profiling (free when off)."""

    def __init__(self, nvtx_enabled: bool = False):
        self.times: dict[str, float] = {}
        self.nvtx = None
        if nvtx_enabled:
            import nvtx

            self.nvtx = nvtx

    def __call__(self, name: str):
        return _Phase(self, name)

    def pop(self) -> dict[str, float]:
        times, self.times = self.times, {}
        return {f"time/{k}": round(v, 4) for k, v in times.items()}


class _Phase:
    def __init__(self, owner: Phases, name: str):
        self.owner, self.name = owner, name

    def __enter__(self):
        if self.owner.nvtx:
            self.owner.nvtx.push_range(self.name)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        import torch

        if self.owner.nvtx:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.owner.nvtx.pop_range()
        self.owner.times[self.name] = self.owner.times.get(self.name, 0.0) + time.perf_counter() - self.t0
