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

    def close(self, headline: dict | None = None, blind: dict | None = None):
        """Flush and close the logs and draw reward_curve.png (`headline`, `blind`: as in plot_rewards)."""
        if not self.enabled:
            return
        self.metrics.close()
        self.samples.close()
        self.tb.close()
        if self.wandb:
            self.wandb.finish()
        plot_rewards(self.out_dir / "metrics.jsonl", self.out_dir / "reward_curve.png", headline, blind)


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


def _eval_rows(metrics_path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r.get("stage") == "eval"}


def before_after(metrics_path: Path, start: int, end: int, headline: dict) -> list[tuple[str, float, float]]:
    """(task metric, before, after) of each headline metric ({task: (metric, ...)}, each task's
    `Task.headline`): the eval rows at GRPO's first step (`start`, the policy it starts from) and at its last
    (`end`)."""
    evals = _eval_rows(metrics_path)
    if start not in evals or end not in evals:
        return []
    out = []
    for task, names in headline.items():
        for name in names:
            key = f"eval/{task}/{name}"
            if key in evals[start] and key in evals[end]:
                out.append((f"{task} {name}", evals[start][key], evals[end][key]))
    return out


def before_after_table(metrics_path: Path, start: int, end: int, headline: dict, blind: dict | None = None) -> str:
    """The held-out headline metrics before and after GRPO, as a text table; with `blind` ({"<task> <metric>":
    x, ...}: vcr1.tasks.blind_answers), a column of what an answer that ignores the video scores."""
    rows = before_after(metrics_path, start, end, headline)
    if not rows:
        return "no before/after evaluation to compare"
    blind = blind or {}
    lines = [f"held-out {'metric':<14} {'before GRPO':>12} {'after GRPO':>11} {'change':>8}"
             + (f" {'blind answer':>13}" if blind else "")]
    lines += [f"         {name:<14} {a:12.1f} {b:11.1f} {b - a:+8.1f}"
              + (f" {blind[name]:13.1f}" if name in blind else "") for name, a, b in rows]
    return "\n".join(lines)


FORMAT_COMPONENTS = ("format", "total")  # the reward keys that do not score the answer itself


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_rewards(metrics_path: Path, png: Path, headline: dict | None = None, blind: dict | None = None):
    """Left: each task's accuracy rewards per GRPO step (every component but the format), smoothed, over
    their raw values. Right: the held-out `headline` metrics ({task: (metric, ...)}) before and after GRPO,
    when the run evaluated both, with a marker at the blind answer's figure for the metrics `blind` has
    ({"<task> <metric>": x, ...}: vcr1.tasks.blind_answers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("stage") == "grpo" and r.get("reward") is not None]
    if not rows:
        return
    compared = before_after(metrics_path, rows[0]["step"] - 1, rows[-1]["step"], headline or {})
    fig, axes = plt.subplots(1, 2 if compared else 1, figsize=(12 if compared else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    window = max(1, len(rows) // 8)
    keys = sorted({k for r in rows for k in r
                   if k.startswith("reward/") and k.count("/") == 2 and k.rsplit("/", 1)[1] not in FORMAT_COMPONENTS})
    for i, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        steps, values = zip(*pts)
        name = key.removeprefix("reward/").replace("/", " ")
        ax.plot(steps, values, color=f"C{i}", lw=0.8, alpha=0.25)
        ax.plot(steps, _smooth(list(values), window), color=f"C{i}", lw=2.2, label=name)
    ax.set_title(f"accuracy rewards during GRPO ({window}-step mean)")
    ax.set_xlabel("training step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if compared:
        ax = axes[0, 1]
        names = [name for name, _, _ in compared]
        x = range(len(names))
        for shift, values, label, color in ((-0.2, [a for _, a, _ in compared], "before GRPO", "0.6"),
                                            (0.2, [b for _, _, b in compared], "after GRPO", "C0")):
            bars = ax.bar([i + shift for i in x], values, width=0.4, label=label, color=color)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        marked = [(i, blind[name]) for i, name in enumerate(names) if name in (blind or {})]
        if marked:
            # C4: a colour the reward curves (C0-C3) do not use
            ax.scatter(*zip(*marked), marker="_", s=900, linewidths=2.5, color="C4", zorder=3,
                       label="blind answer")
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_title("held-out metrics (%)")
        heights = [v for _, a, b in compared for v in (a, b)] + [v for _, v in marked]
        ax.set_ylim(0, 1.25 * max(heights))  # room for the legend above the bars
        ax.legend(fontsize=8, loc="upper left", ncols=3, markerscale=0.4)
        ax.grid(alpha=0.3, axis="y")
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
