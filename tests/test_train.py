"""End to end: the trainer on the synthetic set — outputs, exact resume, two processes under DeepSpeed,
and bad input that is skipped and counted instead of ending the run."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from vcr1 import grpo, train
from vcr1.config import parse_config
from vcr1.data.video import load_video
from vcr1.distributed import standalone_env
from vcr1.tasks import get_task
from vcr1_testing import REPO

SMALL = ["--sft.steps", "2", "--sft.batch_size", "2", "--grpo.num_generations", "2", "--prompts_per_step", "2",
         "--grpo.max_completion_length", "12", "--save_every", "1", "--samples_every", "1",
         "--eval_before_after", "false"]



def _args(out, synthetic, *extra):
    return SMALL + ["--output_dir", str(out), "--data.synthetic_dir", str(synthetic),
                    "--data.synthetic_train", "4", "--data.synthetic_test", "2", *extra]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(argv):
    trainer = train.Trainer(parse_config(argv))
    trainer.run()
    return trainer


def test_outputs_and_exact_resume(tmp_path, synthetic):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(_args(straight, synthetic, "--max_steps", "3"))
    _run(_args(split, synthetic, "--max_steps", "1"))
    _run(_args(split, synthetic, "--max_steps", "3", "--resume", "true"))

    rows = _metrics(straight)
    assert [r["stage"] for r in rows] == ["sft", "sft", "grpo", "grpo", "grpo"]
    grpo = rows[-1]
    for key in ("loss", "reward", "kl", "clip_ratio", "completion_length", "tokens_per_s", "step_time",
                "skipped/media", "skipped/annotations", "skipped/reward", "skipped/nan", "grad_norm"):
        assert key in grpo, key
    assert any(k.startswith("reward/tg/") for r in rows for k in r)
    for name in ("config.yaml", "samples.jsonl", "reward_curve.png"):
        assert (straight / name).is_file(), name
    assert list((straight / "tensorboard").iterdir())

    # the resumed run continues exactly: same metrics from the resume point, same final weights
    resumed = _metrics(split)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(rows[3:], resumed[3:]):
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    wa = load_file(straight / "checkpoints/step-000005/model.safetensors")
    wb = load_file(split / "checkpoints/step-000005/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # the warm-up's last checkpoint (π_ref) is kept whatever keep_checkpoints says
    assert (split / "checkpoints/step-000002").is_dir()


def test_checkpoint_loads_and_evaluates(tmp_path, synthetic):
    """The trainer's checkpoint loads with from_pretrained and runs through `python -m vcr1.eval`;
    --eval_every logs held-out metrics beside the training ones."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    out = tmp_path / "o"
    trainer = train.main(_args(out, synthetic, "--max_steps", "1", "--eval_every", "1", "--eval_limit", "3"))
    ckpt = out / "checkpoints/step-000003"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template and tok.convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id
    live = trainer.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    evals = [r for r in _metrics(out) if r["stage"] == "eval"]
    assert len(evals) == 1 and {"eval/tg/mIoU", "eval/tracking/AO", "eval/gqa/acc"} <= set(evals[0])

    cmd = [sys.executable, "-m", "vcr1.eval", "--task", "tg", "--model", str(ckpt),
           "--annotations", str(synthetic / "test/tg.json"), "--media_root", str(synthetic / "test/tg"),
           "--predictions", str(tmp_path / "preds.jsonl"), "--no-think", "--max_new_tokens", "8",
           "--max_frames", "8", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["n"] == 2 and {"mIoU", "R@0.3", "R@0.5", "R@0.7", "unparseable"} <= set(result)


def _bad_dataset(tmp_path, synthetic):
    """Two good tg videos, one missing, one garbage file, one malformed entry."""
    ann = json.loads((synthetic / "train/tg.json").read_text())
    media = tmp_path / "media"
    media.mkdir()
    good = list(ann)[:2]
    for vid in good:
        shutil.copy(synthetic / "train/tg" / f"{vid}.mp4", media / f"{vid}.mp4")
    (media / "garbage.mp4").write_bytes(os.urandom(4096))
    entries = {vid: ann[vid] for vid in good}
    entries["missing"] = entries["garbage"] = ann[good[0]]
    entries["malformed"] = {"duration": 10.0, "timestamps": "not a list", "sentences": ["x."]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(entries))
    return f"tg:{path}:{media}"


def test_bad_input_is_skipped_and_counted(tmp_path, synthetic, monkeypatch):
    calls = {"score": 0, "loss": 0}
    real_score, real_loss = get_task("tg").rewards, grpo.grpo_loss_from_logprobs

    def flaky_score(*a, **kw):
        calls["score"] += 1
        if calls["score"] == 1:
            raise RuntimeError("reward bug")
        return real_score(*a, **kw)

    def nan_once(*a, **kw):
        calls["loss"] += 1
        loss, stats = real_loss(*a, **kw)
        return (loss * float("nan"), stats) if calls["loss"] == 2 else (loss, stats)

    monkeypatch.setattr(get_task("tg"), "rewards", flaky_score)
    monkeypatch.setattr(grpo, "grpo_loss_from_logprobs", nan_once)
    out = tmp_path / "o"
    trainer = _run(_args(out, tmp_path, "--data", _bad_dataset(tmp_path, synthetic), "--max_steps", "3",
                         "--sft.steps", "1"))
    last = _metrics(out)[-1]
    assert last["skipped/annotations"] == 1
    assert last["skipped/media"] >= 2  # the missing and the garbage video, each time they are drawn
    assert last["skipped/reward"] == 1 and last["skipped/nan"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def _torchrun(out, synthetic, *extra, script="vcr1/train.py", timeout=600):
    """Two processes under torchrun; a hang (a collective one process never joins) fails at `timeout`.
    With fewer than two GPUs the processes get none and run on gloo (one GPU each would need two)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(REPO / script), *_args(out, synthetic, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    if torch.cuda.device_count() < 2:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer then picks gloo and the CPU (vcr1/distributed.py)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_two_processes_with_deepspeed_and_resume(tmp_path, synthetic):
    out = tmp_path / "zero2"
    _torchrun(out, synthetic, "--engine.zero_stage", "2", "--sft.steps", "1", "--max_steps", "1")
    _torchrun(out, synthetic, "--engine.zero_stage", "2", "--sft.steps", "1", "--max_steps", "2",
              "--resume", "true")
    rows = _metrics(out)
    assert [(r["step"], r["stage"]) for r in rows] == [(1, "sft"), (2, "grpo"), (3, "grpo")]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "checkpoints/step-000003/rank1.pt").is_file()


@pytest.mark.parametrize("offload", [False, True])
def test_zero3_two_processes_whose_rollouts_end_at_different_lengths(tmp_path, synthetic, offload):
    """ZeRO-3 through warm-up, GRPO and in-training eval while rank 1's completions stop after one token
    and rank 0's run to the limit; then a resume. A hang fails at the timeout."""
    out = tmp_path / "zero3"
    common = ["--engine.zero_stage", "3", "--engine.offload", str(offload).lower(), "--sft.steps", "1",
              "--eval_every", "1", "--eval_limit", "4", "--grpo.max_completion_length", "16"]
    _torchrun(out, synthetic, *common, "--max_steps", "1", script="tests/support/uneven_rollouts.py")
    if not offload:
        _torchrun(out, synthetic, *common, "--max_steps", "2", "--resume", "true",
                  script="tests/support/uneven_rollouts.py")
    rows = [r for r in _metrics(out) if r["stage"] != "eval"]
    assert [(r["step"], r["stage"]) for r in rows] == [(1, "sft"), (2, "grpo"), (3, "grpo")][:len(rows)]
    assert len(rows) == (2 if offload else 3)
    assert all(math.isfinite(r["loss"]) for r in rows)
    # rank 1's completions are 1 token, rank 0's 16 (no stop token yet): the mean lies strictly between
    assert all(1 < r["completion_length"] < 16 for r in rows if r["stage"] == "grpo")
    assert sum(r["stage"] == "eval" for r in _metrics(out)) == len(rows) - 1
    final = out / "checkpoints" / f"step-{rows[-1]['step']:06d}"
    weights = load_file(final / "model.safetensors")
    assert all(w.numel() > 0 and torch.isfinite(w).all() for w in weights.values())  # gathered, not shards


def test_reference_paths_and_options_run(tmp_path, synthetic):
    """μ = 2 with π_old, two accumulated micro-batches, dapo with a global normaliser, batch-scaled rewards,
    β = 0 (no π_ref is built), HF generate rollouts and the repeated-prompt padded forward."""
    out = tmp_path / "o"
    trainer = _run(_args(out, synthetic, "--stage", "grpo", "--max_steps", "2", "--grpo.num_iterations", "2",
                         "--grad_accum", "2", "--grpo.loss_type", "dapo", "--grpo.scale_rewards", "batch",
                         "--grpo.beta", "0", "--engine.fast_rollout", "false", "--engine.shared_prefix", "false"))
    assert trainer.ref is None
    rows = _metrics(out)
    assert [r["stage"] for r in rows] == ["grpo", "grpo"]
    assert all(math.isfinite(r["loss"]) and 0 <= r["clip_ratio"] <= 1 for r in rows)
    # 2 iterations × 2 micro-batches per step: the optimizer stepped twice per GRPO step
    assert trainer.engine.global_steps == 4


def test_interleaved_order_gives_every_step_the_same_task_mix(synthetic):
    from vcr1.data.dataset import PromptStream, load_split, synthetic_datasets

    cfg = parse_config(["--data.synthetic_dir", str(synthetic)])
    samples, _ = load_split(synthetic_datasets(synthetic, cfg.data, 0)["train"])
    for interleave, mixed in ((True, True), (False, False)):
        cfg.data.interleave_tasks = interleave
        orders = [PromptStream(samples, None, None, cfg.data, rank=r, world=1, seed=s)._order
                  for r, s in ((0, 0), (0, 1))]
        assert sorted(orders[0]) == list(range(len(samples))) and orders[0] != orders[1]
        triples = [{samples[i].task for i in orders[0][k:k + 3]} for k in range(0, len(samples), 3)]
        assert all(len(t) == 3 for t in triples) == mixed


def test_reshuffle_false_repeats_the_first_epochs_order(synthetic):
    from vcr1.data.dataset import PromptStream, load_split, synthetic_datasets

    cfg = parse_config(["--data.synthetic_dir", str(synthetic)])
    samples, _ = load_split(synthetic_datasets(synthetic, cfg.data, 0)["train"])
    for reshuffle in (True, False):
        cfg.data.reshuffle = reshuffle
        stream = PromptStream(samples, None, None, cfg.data, rank=0, world=1, seed=0)
        epochs = [[stream._next_sample().uid for _ in range(len(samples))] for _ in range(3)]
        assert all(sorted(e) == sorted(s.uid for s in samples) for e in epochs)
        assert (epochs[0] == epochs[1] == epochs[2]) == (not reshuffle)
        resumed = PromptStream(samples, None, None, cfg.data, rank=0, world=1, seed=0)
        resumed.load_state({"epoch": 2, "cursor": 0, "skipped_media": 0})
        assert [resumed._next_sample().uid for _ in range(len(samples))] == epochs[2]


def test_a_video_shared_by_prompts_is_decoded_once_per_batch(tmp_path, synthetic, monkeypatch):
    from vcr1.data import dataset
    from vcr1.data.dataset import PromptStream, load_split

    ann = json.loads((synthetic / "train/tg.json").read_text())
    vid, entry = next(iter(ann.items()))
    two = dict(entry, timestamps=entry["timestamps"] * 2, sentences=entry["sentences"] + ["another event."])
    (tmp_path / "tg.json").write_text(json.dumps({vid: two}))
    samples, _ = load_split([{"task": "tg", "annotations": str(tmp_path / "tg.json"),
                              "media_root": str(synthetic / "train/tg")}])
    decoded = []
    monkeypatch.setattr(dataset, "load_video", lambda *a, **kw: decoded.append(a) or load_video(*a, **kw))
    cfg = parse_config([])
    stream = PromptStream(samples, train.load_tokenizer(None), _tiny_config(), cfg.data, rank=0, world=1, seed=0)
    a, b = stream.next_batch(2)
    assert len(decoded) == 1 and a.sample.uid != b.sample.uid
    assert a.inputs["pixel_values_videos"] is b.inputs["pixel_values_videos"]
    assert not torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])  # different sentences


def _tiny_config():
    from vcr1 import tiny

    return tiny.tiny_config(tiny.build_tokenizer())


def _help_choices(option: str) -> list[str]:
    out = subprocess.run([sys.executable, str(REPO / "vcr1/train.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    text = " ".join(out.stdout.split())
    listed = text.split(f"--{option} V ", 1)[1].split("{", 1)[1].split("}", 1)[0]
    return [v.strip() for v in listed.split(",")]


def test_every_listed_attention_trains_a_step_or_is_refused_at_start(tmp_path, synthetic):
    """Each --model.attn value in --help either trains one step, or is refused before any work with a
    one-line message and exit code 2 (not a traceback from inside the step)."""
    values = _help_choices("model.attn")
    assert "sdpa" in values
    for value in values:
        out = tmp_path / value
        cmd = [sys.executable, str(REPO / "vcr1/train.py"), *_args(out, synthetic, "--model.attn", value,
                                                                   "--sft.steps", "1", "--max_steps", "1")]
        # A fresh shell's environment: earlier in-process runs set this process's torch.distributed variables.
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=standalone_env())
        if run.returncode == 0:
            assert [row["stage"] for row in _metrics(out)] == ["sft", "grpo"], value
        else:
            assert run.returncode == 2, (value, run.stderr[-2000:])
            assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
            assert value in run.stderr and not out.exists()


def _train_process(out, synthetic, *extra) -> subprocess.Popen:
    """`python vcr1/train.py` as a new process with a fresh shell's environment (earlier in-process runs
    set this process's torch.distributed variables)."""
    cmd = [sys.executable, str(REPO / "vcr1/train.py"), *_args(out, synthetic, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=standalone_env())


def _finish(proc, timeout=600) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]
    return output


def test_sigterm_checkpoints_and_resume_continues_exactly(tmp_path, synthetic):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, the process exits 0. A resume from it
    takes the same steps as an uninterrupted run, and metrics.jsonl holds every step once - also the steps a
    crash would have logged after the checkpoint."""
    extra = ("--max_steps", "8", "--save_every", "100", "--keep_checkpoints", "1")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _finish(_train_process(straight, synthetic, *extra))

    proc = _train_process(stopped, synthetic, *extra)
    deadline = time.time() + 300
    while not ((stopped / "metrics.jsonl").is_file() and len(_metrics(stopped)) >= 3):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = _finish(proc)
    last = _metrics(stopped)[-1]["step"]
    assert "stopped by a signal" in output and 3 <= last < 10
    assert (stopped / "checkpoints/latest").read_text() == f"step-{last:06d}"
    # what a crash after the checkpoint leaves behind: a row past it and a torn line
    with open(stopped / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": last + 1, "stage": "grpo", "loss": 123.0}) + '\n{"step": ')

    _finish(_train_process(stopped, synthetic, *extra, "--resume", "true"))
    rows, resumed = _metrics(straight), _metrics(stopped)
    assert [r["step"] for r in resumed] == [r["step"] for r in rows] == list(range(1, 11))
    for a, b in zip(rows, resumed):
        assert (a.get("reward"), a.get("completion_length")) == (b.get("reward"), b.get("completion_length"))
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    wa = load_file(straight / "checkpoints/step-000010/model.safetensors")
    wb = load_file(stopped / "checkpoints/step-000010/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_a_checkpoint_and_a_fresh_run_over_one_are_refused(tmp_path, synthetic):
    out = tmp_path / "o"
    proc = _train_process(out, synthetic, "--resume", "true")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "no checkpoint to resume from" in output and "Traceback" not in output, output
    _run(_args(out, synthetic, "--stage", "sft", "--resume", "auto"))  # nothing to resume: starts fresh
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    with pytest.raises(FileExistsError, match="earlier run's checkpoints"):
        train.Trainer(parse_config(_args(out, synthetic, "--stage", "sft", "--resume", "false")))
    _run(_args(out, synthetic, "--stage", "sft", "--sft.steps", "3"))  # the default, auto, continues it
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not finite (a bf16 overflow)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("zero", [0, 2])
def test_a_step_with_non_finite_gradients_is_skipped_and_counted(tmp_path, synthetic, monkeypatch, zero):
    real_loss = grpo.grpo_loss_from_logprobs

    def finite_loss_nan_gradients(*a, **kw):
        loss, stats = real_loss(*a, **kw)
        return _NanGradient.apply(loss), stats

    monkeypatch.setattr(grpo, "grpo_loss_from_logprobs", finite_loss_nan_gradients)
    out = tmp_path / "o"
    trainer = train.Trainer(parse_config(_args(out, synthetic, "--stage", "grpo", "--max_steps", "2",
                                               "--engine.zero_stage", str(zero))))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    rows = _metrics(out)
    assert all(math.isfinite(r["loss"]) for r in rows)  # the loss was finite: only its gradients were not
    assert [r["skipped/nan"] for r in rows] == [1, 2]
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_one_prompt_per_process_survives_bad_ground_truth(tmp_path, synthetic, monkeypatch):
    """The paper's batch shape (1 prompt per process, no accumulation) on a Charades-format file holding a
    reversed span (skipped at load), with a reward that throws on a whole step's only group and a held-out
    item that cannot be scored: the run finishes and counts each."""
    ann = json.loads((synthetic / "train/tg.json").read_text())
    vid, entry = next(iter(ann.items()))
    ann[vid] = dict(entry, timestamps=entry["timestamps"] + [[6.0, 2.0]], sentences=entry["sentences"] + ["backwards."])
    (tmp_path / "tg.json").write_text(json.dumps(ann))
    held_out = json.dumps([{"task": "tg", "annotations": str(synthetic / "test/tg.json"),
                            "media_root": str(synthetic / "test/tg")}])
    calls = {"score": 0, "score_item": 0}
    tg = get_task("tg")
    real_score, real_item = tg.rewards, tg.score

    def score_fails_on_step_two(*a, **kw):  # GRPO step 1 scores one group of 2 completions; step 2 starts at 3
        calls["score"] += 1
        if calls["score"] == 3:
            raise ValueError("reward bug")
        return real_score(*a, **kw)

    def first_item_fails(*a, **kw):
        calls["score_item"] += 1
        if calls["score_item"] == 1:
            raise ValueError("malformed held-out solution")
        return real_item(*a, **kw)

    monkeypatch.setattr(tg, "rewards", score_fails_on_step_two)
    monkeypatch.setattr(tg, "score", first_item_fails)
    out = tmp_path / "o"
    trainer = _run(_args(out, synthetic, "--data", f"tg:{tmp_path / 'tg.json'}:{synthetic / 'train/tg'}",
                         "--data.eval_datasets", held_out, "--prompts_per_step", "1", "--grad_accum", "1",
                         "--sft.steps", "1", "--max_steps", "3", "--eval_every", "1", "--eval_limit", "2"))
    rows = _metrics(out)
    steps = [r for r in rows if r["stage"] == "grpo"]
    evals = [r for r in rows if r["stage"] == "eval"]
    assert len(steps) == 3 and len(evals) == 3
    assert steps[-1]["skipped/annotations"] == 1 and steps[-1]["skipped/reward"] == 1
    assert steps[1]["reward"] is None and steps[1]["loss"] is None  # its only group was left out
    assert steps[0]["loss"] is not None and steps[2]["loss"] is not None
    assert sum(r["eval/tg/malformed"] for r in evals) == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_before_after_evaluation_is_logged_tabled_and_plotted(tmp_path, synthetic, capsys):
    """--eval_before_after: the held-out split is evaluated on the policy GRPO starts from (after the
    warm-up) and on the final one, logged as eval rows, printed as a table and drawn beside the rewards."""
    from PIL import Image

    out = tmp_path / "o"
    _run(_args(out, synthetic, "--max_steps", "2", "--eval_before_after", "true", "--eval_limit", "3"))
    evals = [r for r in _metrics(out) if r["stage"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]  # warm-up of 2 steps, then 2 GRPO steps
    assert all({"eval/tg/mIoU", "eval/tracking/AO", "eval/gqa/acc", "eval/gqa/mIoU"} <= set(r) for r in evals)
    printed = capsys.readouterr().out
    table = printed[printed.index("before GRPO"):]
    for name, key in (("tg mIoU", "eval/tg/mIoU"), ("tracking AO", "eval/tracking/AO"), ("gqa acc", "eval/gqa/acc")):
        line = next(line for line in table.splitlines() if name in line)
        assert f"{evals[0][key]:.1f}" in line and f"{evals[1][key]:.1f}" in line
    # Beside tg mIoU, the blind answer: the best fixed fraction of the duration on train, scored on the one
    # tg example of the three evaluated; beside tracking AO, the first box in every frame of the one track.
    from vcr1.metrics import blind_span_baseline

    def tg_items(split):
        annotations = json.loads((synthetic / split / "tg.json").read_text())
        return [(v["duration"], v["timestamps"]) for v in annotations.values()]

    def iou(a, b):  # independent of vcr1.rewards
        w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
        inter = max(w, 0) * max(h, 0)
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    def row(name):
        return next(line for line in table.splitlines() if name in line).split()

    blind = blind_span_baseline(tg_items("train"), tg_items("test")[:1])["mIoU"]
    boxes = json.loads((synthetic / "test" / "tracking.json").read_text())[0]["gt"]
    assert "blind answer" in table
    assert row("tg mIoU")[-1] == f"{blind:.1f}"
    assert row("tracking AO")[-1] == f"{100 * sum(iou(boxes[0], b) for b in boxes) / len(boxes):.1f}"
    assert len(row("gqa acc")) == 5  # no blind column
    assert Image.open(out / "reward_curve.png").size[0] == 1200  # the second panel holds the comparison


def test_progress_line_ends_with_elapsed_time_and_eta():
    row = {"stage": "grpo", "step": 3, "loss": 0.5, "reward": 1.25, "kl": None, "completion_length": 40.0,
           "step_time": 2.0, "tokens_per_s": 1234.4}
    assert train._progress_line(row, 120, 75.0, 117 * 2.0) == (
        "grpo step 3/120 | loss 0.5 | reward 1.25 | completion_length 40 | step_time 2 | 1234 tok/s | "
        "elapsed 1:15 | ETA 3:54")
    assert train._progress_line(row, 120, 3725.0, 0.0).endswith(" | 1234 tok/s | elapsed 1:02:05 | ETA 0:00")
    # the ETA: the mean time of the steps this loop took (a resumed run's earlier steps are not timed here)
    clock = train.StepClock()
    clock.stepped(2.0)
    clock.stepped(4.0)
    elapsed, eta = clock.times(step=12, total=20)
    assert eta == 3.0 * 8 and 0 <= elapsed < 60


def test_parameter_count_is_full_size_under_zero3():
    """ZeRO-3 partitions each parameter (numel() is this process's shard or 0) and keeps its size in ds_numel."""
    trainable = torch.nn.Parameter(torch.zeros(3, 4))
    frozen = torch.nn.Parameter(torch.zeros(1000), requires_grad=False)
    partitioned = torch.nn.Parameter(torch.zeros(0))
    partitioned.ds_numel = 2_500_000
    assert train._param_counts([trainable, frozen, partitioned]) == (2_501_012, 2_500_012)
    assert train._param_summary([trainable, frozen, partitioned]) == "2.50M params (2.50M trainable)"
    assert train._param_summary([frozen, torch.nn.Parameter(torch.zeros(430_000))]) == "0.43M params (0.43M trainable)"
