"""End to end: the trainer on the synthetic set — outputs, exact resume, two processes under DeepSpeed,
and bad input that is skipped and counted instead of ending the run."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vcr1 import train
from vcr1.config import parse_config
from vcr1.data.synthetic import generate
from vcr1.data.video import load_video
from vcr1_testing import REPO

SMALL = ["--sft.steps", "2", "--sft.batch_size", "2", "--grpo.num_generations", "2", "--prompts_per_step", "2",
         "--grpo.max_completion_length", "12", "--save_every", "1", "--samples_every", "1"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0, n_train=4, n_test=2)
    return root


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
    real_score, real_loss = train.score, train.grpo_loss

    def flaky_score(*a, **kw):
        calls["score"] += 1
        if calls["score"] == 1:
            raise RuntimeError("reward bug")
        return real_score(*a, **kw)

    def nan_once(*a, **kw):
        calls["loss"] += 1
        loss, stats = real_loss(*a, **kw)
        return (loss * float("nan"), stats) if calls["loss"] == 2 else (loss, stats)

    monkeypatch.setattr(train, "score", flaky_score)
    monkeypatch.setattr(train, "grpo_loss", nan_once)
    out = tmp_path / "o"
    trainer = _run(_args(out, tmp_path, "--data", _bad_dataset(tmp_path, synthetic), "--max_steps", "3",
                         "--sft.steps", "1"))
    last = _metrics(out)[-1]
    assert last["skipped/annotations"] == 1
    assert last["skipped/media"] >= 2  # the missing and the garbage video, each time they are drawn
    assert last["skipped/reward"] == 1 and last["skipped/nan"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def _torchrun(out, synthetic, *extra, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(REPO / "vcr1/train.py"), *_args(out, synthetic, *extra)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.parametrize("zero", [2, 3])
def test_two_processes_with_deepspeed_and_resume(tmp_path, synthetic, zero):
    out = tmp_path / f"zero{zero}"
    _torchrun(out, synthetic, "--engine.zero_stage", str(zero), "--sft.steps", "1", "--max_steps", "1")
    _torchrun(out, synthetic, "--engine.zero_stage", str(zero), "--sft.steps", "1", "--max_steps", "2",
              "--resume", "true")
    rows = _metrics(out)
    assert [(r["step"], r["stage"]) for r in rows] == [(1, "sft"), (2, "grpo"), (3, "grpo")]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "checkpoints/step-000003/rank1.pt").is_file()
    weights = load_file(out / "checkpoints/step-000003/model.safetensors")
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
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
        if run.returncode == 0:
            assert [row["stage"] for row in _metrics(out)] == ["sft", "grpo"], value
        else:
            assert run.returncode == 2, (value, run.stderr[-2000:])
            assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
            assert value in run.stderr and not out.exists()
