"""The paper's central comparison at toy scale: does GRPO beat more supervised training?

    python bench/grpo_vs_sft.py [--seeds 0 1 2] [--threads 2] [--out outputs/grpo_vs_sft]

For each seed it runs the embedded default (GRPO from the shipped warm start, vcr1/warm_start.py) and a
baseline that instead continues the warm start's supervised training for as many steps as GRPO takes, on
the same training examples (the seed's synthetic train split) at GRPO's learning rate and schedule, so
that only the objective differs (the warm-up's own rate decays to 0 by its end). Both start
from the same weights and evaluate the seed's synthetic held-out split, so they share the "before"
figures. Prints per headline metric: before, after GRPO, after continued SFT (mean ± half the min-max
spread over seeds) and the blind answer's, which looks at no video (vcr1.tasks.blind_answers: for the
temporal mIoUs one span per video duration fitted on the train split, for tracking the prompt's initial box
in every frame); writes the figures to
bench/results/grpo_vs_sft.json. Runs one training at a time (they share the CPU): about 8 minutes per
seed on 2 cores; a run already finished under --out is read back, not redone. Not a timed test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("VCR1_BENCH_RESULTS", REPO / "bench" / "results"))


def _train(out: Path, seed: int, threads: int, last_step: int, *extra: str) -> list[dict]:
    """The run's metrics rows; a run that already evaluated at its last step (an earlier call) is not redone."""
    from vcr1.distributed import standalone_env

    metrics = out / "metrics.jsonl"

    def rows():
        return [json.loads(line) for line in metrics.read_text().splitlines()]

    if metrics.exists() and any(r["stage"] == "eval" and r["step"] == last_step for r in rows()):
        return rows()
    env = standalone_env(OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(REPO / "vcr1/train.py"), "--seed", str(seed), "--output_dir", str(out),
           "--data.synthetic_dir", str(out.parent / f"synthetic-{seed}"), "--resume", "auto", *extra]
    run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return rows()


def _evals(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in rows if r["stage"] == "eval"}


def _blind(synthetic: Path) -> dict[str, float]:
    """The blind answers' held-out figures ("tg mIoU", "gqa mIoU", "tracking AO"): vcr1.tasks.blind_answers."""
    from vcr1.data.annotations import load_annotations
    from vcr1.tasks import SYNTHETIC, blind_answers

    def samples(split):  # the trainer's own loader
        return [x for task in SYNTHETIC
                for x in load_annotations(task, synthetic / split / f"{task}.json", synthetic / split / task)[0]]

    return blind_answers(samples("train"), samples("test"))


def _summary(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "spread": (max(values) - min(values)) / 2, "values": values}


def main(argv=None):
    sys.path.append(str(REPO))  # an uninstalled checkout still finds vcr1, after installed packages
    from vcr1.config import parse_config
    from vcr1.monitor import FORMAT_COMPONENTS
    from vcr1.tasks import SYNTHETIC, get_task

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "grpo_vs_sft")
    args = p.parse_args(argv)

    default = parse_config([])
    warm, extra = default.sft.steps, default.max_steps
    figures = {}  # "task metric" -> {"before": [...], "grpo": [...], "sft": [...]}
    rewards = {}  # "reward/<task>/<component>" -> {"first fifth": [...], "last fifth": [...]}, GRPO's train rewards
    for seed in args.seeds:
        rows = _train(args.out / f"grpo-{seed}", seed, args.threads, warm + extra)
        grpo = _evals(rows)
        steps = [r for r in rows if r["stage"] == "grpo"]
        fifth = max(1, len(steps) // 5)
        for key in sorted({k for r in steps for k in r if k.startswith("reward/") and k.count("/") == 2
                           and k.rsplit("/", 1)[-1] not in FORMAT_COMPONENTS}):
            for name, part in (("first fifth", steps[:fifth]), ("last fifth", steps[-fifth:])):
                values = [r[key] for r in part if r.get(key) is not None]
                rewards.setdefault(key, {}).setdefault(name, []).append(sum(values) / len(values))
        sft = _evals(_train(args.out / f"sft-{seed}", seed, args.threads, warm + extra, "--stage", "sft",
                            "--sft.steps", str(warm + extra), "--sft.lr", str(default.optim.lr),
                            "--sft.scheduler", default.optim.scheduler, "--eval_before_after", "true"))
        blind = _blind(args.out / f"synthetic-{seed}")
        for task in SYNTHETIC:
            for name in get_task(task).headline:
                key = f"eval/{task}/{name}"
                if key in grpo.get(warm, {}):
                    row = figures.setdefault(f"{task} {name}", {"before": [], "grpo": [], "sft": []})
                    row["before"].append(grpo[warm][key])
                    row["grpo"].append(grpo[warm + extra][key])
                    row["sft"].append(sft[warm + extra][key])
                    if f"{task} {name}" in blind:
                        row.setdefault("blind", []).append(blind[f"{task} {name}"])
        print(f"seed {seed} done", flush=True)

    report = {"device": platform.processor() or platform.machine(), "threads": args.threads, "seeds": args.seeds,
              "warm_up_steps": warm, "extra_steps": extra,
              "metrics": {k: {arm: _summary(v) for arm, v in row.items()} for k, row in figures.items()},
              "grpo_train_rewards": {k: {part: _summary(v) for part, v in row.items()} for k, row in rewards.items()}}
    print(f"held-out metric (%)   {'before':>13} {'after GRPO':>13} {'after more SFT':>15} {'blind answer':>13}"
          f"   (mean ± half-range over seeds {args.seeds})")
    for name, arms in report["metrics"].items():
        cells = [f"{arms[a]['mean']:6.1f} ± {arms[a]['spread']:4.1f}" if a in arms else "-"
                 for a in ("before", "grpo", "sft", "blind")]
        print(f"{name:<20} {cells[0]:>13} {cells[1]:>13} {cells[2]:>15} {cells[3]:>13}")
    print(f"GRPO train reward           {'first fifth':>13} {'last fifth':>13}")
    for key, parts in report["grpo_train_rewards"].items():
        cells = [f"{parts[p]['mean']:.3f} ± {parts[p]['spread']:.3f}" for p in ("first fifth", "last fifth")]
        print(f"{key:<27} {cells[0]:>13} {cells[1]:>13}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpo_vs_sft.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
