"""The README's "Your own task" section works as written: its task file and its commands, run from the root
of a copy of the repository, train on the user's task and evaluate it."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from vcr1_testing import REPO


def own_task_blocks() -> tuple[str, str]:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Your own task"):]
    section = section[:section.index("\n## ", 1)]
    (python,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    (bash,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return python, bash


def copy_of_the_repository(dest):
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_the_own_task_example_runs_as_written(tmp_path):
    python, bash = own_task_blocks()
    first = python.splitlines()[0]
    assert first.startswith("# ") and first.endswith(".py"), "the task file's first line names it"
    root = copy_of_the_repository(tmp_path / "repo")
    (root / first[2:]).write_text(python)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", bash], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = [json.loads(line) for line in (root / "outputs/colour/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["stage"] == "grpo"]
    evals = [r for r in rows if r["stage"] == "eval"]
    assert len(steps) == 4 and all("reward/colour/accuracy" in r and "reward/colour/format" in r for r in steps)
    assert len(evals) == 2 and all(r["eval/colour/n"] == 12 for r in evals)
    assert "colour acc" in done.stdout  # the before/after table, with the task's blind answer
    table_row = next(line for line in done.stdout.splitlines() if "colour acc" in line).split()
    assert len(table_row) == 6  # name, metric, before, after, change, blind answer
    # The evaluator, given only the last checkpoint, scores the run's held-out examples as its last evaluation did.
    evaluated = done.stdout[done.stdout.index("done: metrics in"):]
    printed = dict(re.findall(r"^\s*(eval/colour/\w+)\s+([\d.]+)$", evaluated, re.MULTILINE))
    assert float(printed["eval/colour/acc"]) == pytest.approx(evals[-1]["eval/colour/acc"], abs=0.005)
    assert int(printed["eval/colour/n"]) == 12
