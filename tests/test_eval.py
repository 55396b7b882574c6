"""python -m vcr1.eval: scoring alone on the real annotation files, resumable generation, end to end with
the tiny model (and a checkpoint of it) on the synthetic set, and evaluate() in process."""
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vcr1.data.annotations import load_annotations
from vcr1.data.sample import Sample
from vcr1_testing import synthetic_tasks

REPO = Path(__file__).resolve().parents[1]
# Small clips keep the tiny model fast on 2 CPU cores (the tiny preset's budget, 8 frames at most).
SMALL_VIDEO = ["--max_frames", "8", "--total_pixels", str(8 * 112 * 112), "--max_pixels", str(112 * 112),
               "--min_pixels", str(56 * 56)]
GENERATE = ["--no-think", "--max_new_tokens", "6", *SMALL_VIDEO]
KEYS = {"tg": {"mIoU", "R@0.3", "R@0.5", "R@0.7"}, "tracking": {"AO", "R@0.5", "R@0.7", "SR@0.5", "SR@0.75"},
        "gqa": {"acc", "mIoU"}, "mcq": {"acc"}}
COUNTS = {"unparseable", "n", "malformed"}
GEN_COUNTS = COUNTS | {"skipped", "skipped_annotations"}


def run_eval(*args, cwd=None) -> tuple[dict, str]:
    """Run the CLI with --json; (the JSON object of its last stdout line, its stderr)."""
    proc = subprocess.run([sys.executable, "-m", "vcr1.eval", *map(str, args), "--json"], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------ scoring alone, real annotations

def truth(sample: Sample) -> str:
    sol = sample.solution
    if sample.task == "tg":
        return f"<answer>{sol['span'][0]} to {sol['span'][1]}</answer>"
    if sample.task == "tracking":
        return f"<answer>{sol['boxes']}</answer>"
    glue = "<glue>[" + ", ".join(f"({s}, {e})" for s, e in sol["glue"]) + "]</glue>" if sample.task == "gqa" else ""
    return f"<answer>{sol['answer'].strip('()')}</answer>{glue}"


def half_right(sample: Sample) -> str:
    """tg: the span shifted by half its length (IoU 1/3); tracking: the last 4 boxes empty (IoU 0);
    gqa: a wrong letter, the right glue; mcq: a wrong letter."""
    sol = sample.solution
    if sample.task == "tg":
        s, e = sol["span"]
        return f"<answer>{s + (e - s) / 2} to {e + (e - s) / 2}</answer>"
    if sample.task == "tracking":
        return f"<answer>{sol['boxes'][:4] + [[0, 0, 0, 0]] * 4}</answer>"
    wrong = "B" if sol["answer"] == "(A)" else "A"
    return truth(sample).replace(f"<answer>{sol['answer'].strip('()')}</answer>", f"<answer>{wrong}</answer>")


def expected(task: str, n0: int, n1: int, n2: int) -> dict:
    """Metrics of n0 true, n1 half-right and n2 unparseable answers."""
    n, pct = n0 + n1 + n2, lambda k: 100 * k / (n0 + n1 + n2)
    if task == "tg":
        out = {"mIoU": pct(n0 + n1 / 3), "R@0.3": pct(n0 + n1), "R@0.5": pct(n0), "R@0.7": pct(n0)}
    elif task == "tracking":  # a half-right sequence: mean IoU exactly 0.5, 4 of 8 frames at IoU 1
        out = {"AO": pct(n0 + n1 / 2), "R@0.5": pct(n0 + n1), "R@0.7": pct(n0),
               "SR@0.5": pct(n0 + n1 / 2), "SR@0.75": pct(n0 + n1 / 2)}
    elif task == "gqa":
        out = {"acc": pct(n0), "mIoU": pct(n0 + n1)}
    else:
        out = {"acc": pct(n0)}
    return {**out, "unparseable": n2, "n": n, "malformed": 0}


@pytest.mark.parametrize("task,name", [("tg", "charades_sta_test.json"), ("tg", "activitynet_grounding_test.json"),
                                       ("gqa", "nextgqa_test.json"), ("mcq", "nextgqa_test.json"),
                                       ("tracking", "got10k_val_8frames.json")])
def test_score_only_real_annotations(shared_data, tmp_path, task, name):
    samples, bad = load_annotations(task, shared_data / "annotations" / name, tmp_path)
    assert bad == 0 and samples
    if task == "gqa":  # 69 NExT-GQA glue spans start at -0.1 or -0.0, which no valid <glue> list can say
        samples = [s for s in samples if not any(str(start).startswith("-") for start, _ in s.solution["glue"])]
    rows = [{"uid": s.uid, "task": task, "solution": s.solution} for s in samples]

    perfect = write_jsonl(tmp_path / "truth.jsonl", [{**r, "completion": truth(s)} for r, s in zip(rows, samples)])
    result, _ = run_eval("--task", task, "--predictions", perfect)
    assert result == pytest.approx(expected(task, len(samples), 0, 0))
    assert all(v == pytest.approx(100.0) for k, v in result.items() if k in KEYS[task])

    # every third answer right, half right, unreadable; a line cut short is counted as malformed
    answers = [(truth, half_right, lambda s: "no idea")[i % 3](s) for i, s in enumerate(samples)]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{**r, "completion": a} for r, a in zip(rows, answers)])
    with open(mixed, "a") as f:
        f.write('{"uid": "cut", "completion": "<answer>')
    n0, n1 = len(samples[0::3]), len(samples[1::3])
    result, _ = run_eval("--task", task, "--predictions", mixed)
    assert result == pytest.approx({**expected(task, n0, n1, len(samples) - n0 - n1), "malformed": 1})


def test_score_only_counts_malformed_solutions(tmp_path):
    right = "<answer>A</answer><glue>[(0, 1)]</glue>"
    bad = [{"answer": "(A)", "glue": [[3, 1]]}, {"answer": "(A)", "glue": [[0, float("nan")]]},
           {"answer": "(A)", "glue": []}, {"answer": "none", "glue": [[0, 1]]}, {"answer": "(A)"}, None]
    solutions = [{"answer": "(A)", "glue": [[0, 1]]}, *bad]
    path = write_jsonl(tmp_path / "preds.jsonl", [{"uid": str(i), "task": "gqa", "completion": right, "solution": s}
                                                  for i, s in enumerate(solutions)])
    result, _ = run_eval("--task", "gqa", "--predictions", path)
    assert result == {"acc": 100.0, "mIoU": 100.0, "unparseable": 0, "n": 1, "malformed": len(bad)}


def test_score_only_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vcr1.eval", "--task", "tg", "--predictions", tmp_path / "no.jsonl"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "no such file" in proc.stderr


# ---------------------------------------------------------------- generation on the synthetic set

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    from vcr1.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), tasks=synthetic_tasks(), n_train=1, n_test=3)["test"]


def data_args(synthetic, task):
    paths = synthetic[task]
    return ["--annotations", paths["annotations"], "--media_root", paths["media_root"]]


def test_generation_is_resumable(synthetic, tmp_path):
    preds = tmp_path / "preds.jsonl"
    args = ["--task", "tg", *data_args(synthetic, "tg"), "--predictions", preds, "--batch_size", "1", *GENERATE]
    full, err = run_eval(*args)
    assert "3 of 3 items to answer" in err
    assert set(full) == KEYS["tg"] | GEN_COUNTS and full["n"] == 3 and full["skipped"] == 0
    lines = preds.read_text().splitlines()
    assert [json.loads(line)["uid"] for line in lines] == ["test0000#0", "test0001#0", "test0002#0"]
    assert not list(tmp_path.glob("preds.jsonl.rank*"))

    # as a kill leaves it: one item merged, one in rank 1's shard, the last one cut mid-line
    preds.write_text(lines[0] + "\n")
    (tmp_path / "preds.jsonl.rank1").write_text(lines[1] + "\n" + lines[2][:25])
    resumed, err = run_eval(*args)
    assert "1 of 3 items to answer (2 already in" in err
    assert resumed == full
    assert sorted(preds.read_text().splitlines()) == sorted(lines)
    assert not list(tmp_path.glob("preds.jsonl.rank*"))

    again, err = run_eval(*args)
    assert "0 of 3 items to answer" in err and again == full
    assert len(preds.read_text().splitlines()) == 3


def tiny_checkpoint(out: Path) -> Path:
    """The tiny default model saved as the trainer saves checkpoints (weights + tokenizer)."""
    from vcr1.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(None)
    load_model(None, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """$VCR1_EVAL_CHECKPOINT (e.g. the trainer CI's checkpoint), else the untrained tiny model saved."""
    given = os.environ.get("VCR1_EVAL_CHECKPOINT")
    return Path(given) if given else tiny_checkpoint(tmp_path / "ckpt")


def test_checkpoint_end_to_end(synthetic, checkpoint, tmp_path, task="tracking"):
    preds = tmp_path / "preds.jsonl"
    result, _ = run_eval("--task", task, "--model", checkpoint, *data_args(synthetic, task), "--predictions", preds,
                         "--batch_size", "2", *GENERATE)
    assert set(result) == KEYS[task] | GEN_COUNTS
    assert result["n"] == 3 and result["skipped"] == result["malformed"] == 0
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(records) == 3 and all(r["task"] == task and isinstance(r["completion"], str) for r in records)


def test_evaluate_in_process(synthetic):
    from vcr1.config import parse_config
    from vcr1.eval import evaluate
    from vcr1.model import load_model, load_tokenizer

    cfg = parse_config(["--data.video.max_frames", "8", "--grpo.max_completion_length", "6",
                        "--prompts_per_step", "3"])
    samples = []
    for task in ("tg", "tracking", "gqa"):
        samples += load_annotations(task, synthetic[task]["annotations"], synthetic[task]["media_root"])[0]
    gqa = synthetic["gqa"]
    samples += load_annotations("mcq", gqa["annotations"], gqa["media_root"], limit=2)[0]
    broken = Sample("tg", "missing", str(Path(gqa["media_root"]) / "missing.mp4"), {"event": "a red disc appears"},
                    {"span": [1.0, 2.0]})
    tokenizer = load_tokenizer(None)
    model = load_model(None, tokenizer, dtype="fp32").train()

    result = evaluate(model, tokenizer, samples + [broken], cfg=cfg, rank=0, world=1, device="cpu")
    assert set(result) == {"tg", "tracking", "gqa", "mcq"}
    for task, metrics in result.items():
        assert set(metrics) == KEYS[task] | {"unparseable", "n", "skipped", "malformed"}
    assert [result[t]["n"] for t in ("tg", "tracking", "gqa", "mcq")] == [3, 3, 3, 2]
    assert result["tg"]["skipped"] == 1 and result["gqa"]["skipped"] == 0
    assert all(metrics["malformed"] == 0 for metrics in result.values())
    assert model.training  # handed back in the mode it came in


def test_batching_by_task_scores_each_answer_against_its_own_sample(synthetic):
    """Samples in round-robin task order, answered in task-grouped batches of several prompts, score what
    the same model scores answering them one at a time."""
    from vcr1.config import parse_config
    from vcr1.data.dataset import balanced_subset
    from vcr1.eval import evaluate
    from vcr1.model import load_model, load_tokenizer

    samples = []
    for task in ("tg", "tracking", "gqa"):
        samples += load_annotations(task, synthetic[task]["annotations"], synthetic[task]["media_root"])[0]
    samples = balanced_subset(samples, len(samples))
    cfg = parse_config(["--data.video.max_frames", "8", "--grpo.max_completion_length", "24", "--eval_batch_size", "4"])
    tokenizer = load_tokenizer(None)
    model = load_model(None, tokenizer, dtype="fp32")
    batched = evaluate(model, tokenizer, samples, cfg=cfg)
    one_by_one = evaluate(model, tokenizer, samples, cfg=cfg, batch_size=1)
    assert batched == one_by_one and sum(m["n"] for m in batched.values()) == len(samples)


def test_evaluate_skips_and_counts_bad_items(synthetic, monkeypatch, caplog):
    """A held-out item that cannot be encoded or scored is logged with its uid and counted, never fatal,
    and the process still makes its one gather (so ranks never mismatch)."""
    from vcr1 import distributed
    from vcr1.config import parse_config
    from vcr1.eval import evaluate
    from vcr1.model import load_model, load_tokenizer

    cfg = parse_config(["--data.video.max_frames", "8", "--grpo.max_completion_length", "4",
                        "--prompts_per_step", "4"])
    tg = synthetic["tg"]
    good = load_annotations("tg", tg["annotations"], tg["media_root"], limit=2)[0]
    # as if load-time validation had been bypassed: a reversed span, and prompt fields without the event
    reversed_span = dataclasses.replace(good[0], uid="reversed", solution={"span": [2.0, 1.0]})
    no_event = dataclasses.replace(good[1], uid="no-event", fields={})
    gathered = []
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj: gathered.append(obj) or [obj])
    tokenizer = load_tokenizer(None)
    model = load_model(None, tokenizer, dtype="fp32")

    with caplog.at_level(logging.WARNING, logger="vcr1.eval"):
        result = evaluate(model, tokenizer, [good[0], reversed_span, no_event, good[1]], cfg=cfg, device="cpu")
    assert len(gathered) == 1
    assert set(result) == {"tg"} and set(result["tg"]) == KEYS["tg"] | {"unparseable", "n", "skipped", "malformed"}
    assert (result["tg"]["n"], result["tg"]["skipped"], result["tg"]["malformed"]) == (2, 1, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert any("reversed" in m and "start is after end" in m for m in messages), messages
    assert any("no-event" in m and "lack 'event'" in m for m in messages), messages


# --------------------------------------------------------------- a checkpoint with its run's settings

def test_a_checkpoint_is_evaluated_as_its_run_evaluated_it(tmp_path):
    """`python -m vcr1.eval --model CKPT` with no setting flag answers the run's own held-out set with the run's
    prompt, video, length and batch settings (the checkpoint's vcr1_config.yaml): its metrics are the run's
    final eval row, exactly. A setting flag overrides that one setting, and says so."""
    from vcr1.distributed import standalone_env

    out = tmp_path / "run"
    train = [sys.executable, str(REPO / "vcr1/train.py"), "--max_steps", "2", "--data.synthetic_train", "4",
             "--data.synthetic_test", "3", "--eval_limit", "9", "--eval_before_after", "true",
             "--output_dir", str(out)]
    run = subprocess.run(train, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env=standalone_env(OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["stage"] == "eval"][-1]
    expected = {k: v for k, v in final.items() if k.startswith("eval/")}
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    saved = yaml.safe_load((ckpt / "vcr1_config.yaml").read_text())
    assert saved["eval_limit"] == 9 and saved["data"]["synthetic_test"] == 3 and saved["data"]["think"] is False

    result, err = run_eval("--model", ckpt)
    assert result == expected and final["eval/tg/n"] == 3
    assert "think=False max_new_tokens=200 batch_size=48 dtype=fp32 attn=sdpa fps=2.0 min_frames=4 max_frames=16 " \
        "min_pixels=3136 max_pixels=12544 total_pixels=200704 decode_device=auto" in err
    assert f"settings from the run config {ckpt / 'vcr1_config.yaml'}; overridden by flags: none" in err
    assert len((ckpt / "eval_predictions.jsonl").read_text().splitlines()) == 9

    shorter, err = run_eval("--model", ckpt, "--max_new_tokens", "5", "--predictions", tmp_path / "p.jsonl")
    assert "think=False max_new_tokens=5 batch_size=48 " in err and "overridden by flags: max_new_tokens" in err
    assert set(shorter) == set(expected) and len((tmp_path / "p.jsonl").read_text().splitlines()) == 9
