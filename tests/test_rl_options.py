"""The RL options beyond the paper's GRPO: dynamic sampling (DAPO), masking truncated completions and the
soft overlong penalty (DAPO), the rollout/trainer log-prob gap and truncated importance sampling (TIS), and
sequence-level ratios (GSPO) in a run. The loss options' values and gradients are tested against float64
references in tests/test_grpo_loss_options.py; here, the batch plumbing and the trainer."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from vcr1 import grpo
from vcr1.config import GRPOConfig
from vcr1_testing import REPO

SMALL = ["--grpo.num_generations", "2", "--prompts_per_step", "2", "--grpo.max_completion_length", "12",
         "--eval_before_after", "false", "--save_every", "100"]


def groups(rewards, truncated=None, group_size=2):
    """A scored batch of len(rewards) / group_size prompts with ragged completions."""
    n = len(rewards) // group_size
    examples = tuple(SimpleNamespace(sample=SimpleNamespace(task="tg", uid=f"u{i}"), inputs={}) for i in range(n))
    completions = tuple(tuple(torch.arange(1 + i + k) for k in range(group_size)) for i in range(n))
    logprobs = tuple(tuple(-torch.ones(len(c)) * (i + 1) for c in group) for i, group in enumerate(completions))
    flags = truncated or tuple((False,) * group_size for _ in range(n))
    return grpo.Groups(examples, completions, rollout_logprobs=logprobs, truncated=flags,
                       rewards=torch.tensor(rewards, dtype=torch.float32))


def test_uniform_groups_and_selection():
    batch = groups([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert grpo.uniform_groups(batch) == [True, False, True]
    kept = grpo.select_groups(batch, [1])
    assert kept.rewards.tolist() == [0.0, 1.0] and kept.examples[0].sample.uid == "u1"
    assert kept.completions == batch.completions[1:2] and kept.rollout_logprobs == batch.rollout_logprobs[1:2]
    assert grpo.uniform_groups(grpo.select_groups(batch, [])) == []
    assert grpo.uniform_groups(grpo.dataclasses.replace(batch, weight=0.0)) == [True] * 3  # unscorable


def test_dynamic_sampling_can_test_one_reward_component(synthetic):
    """DAPO's test is on accuracy: a group whose answers are all right (or all wrong) is dropped even when its
    total rewards differ; a task without the component is tested on its total."""
    from vcr1.tasks import get_task

    qa, grounding = get_task("gqa"), get_task("tg")
    solution = {"answer": "(A)", "glue": [[1.0, 2.0]]}
    right = ["<answer>A</answer><glue>[(1.0, 2.0)]</glue>", "<answer>A</answer><glue>[(1.0, 3.0)]</glue>"]
    ex = [SimpleNamespace(sample=SimpleNamespace(task=t, uid=f"u{i}", solution=sol), inputs={})
          for i, (t, sol) in enumerate([("gqa", solution), ("tg", {"span": [1.0, 2.0]})])]
    texts = {0: right, 1: ["<answer>1.0 to 2.0</answer>", "<answer>1.0 to 3.0</answer>"]}

    class Tok:
        def decode(self, ids, skip_special_tokens):
            return texts[int(ids[0])][int(ids[1])]

    batch = grpo.Groups(tuple(ex), ((torch.tensor([0, 0]), torch.tensor([0, 1])),
                                    (torch.tensor([1, 0]), torch.tensor([1, 1]))))
    on_total = grpo.score_groups(batch, Tok(), GRPOConfig(num_generations=2, dynamic_sampling_metric="total"),
                                 think=False).groups
    on_accuracy = grpo.score_groups(batch, Tok(), GRPOConfig(num_generations=2), think=False).groups  # the default
    assert qa.rewards(right[0], solution, False)["accuracy"] == qa.rewards(right[1], solution, False)["accuracy"]
    assert grpo.uniform_groups(on_total) == [False, False]
    assert grpo.uniform_groups(on_accuracy) == [True, False]  # gqa: both right; tg has no accuracy: its totals differ
    assert grounding.rewards(texts[1][0], {"span": [1.0, 2.0]}, False)["iou"] == 1.0


def test_regroup_fills_micro_batches_and_pads_with_weight_zero():
    pool = [grpo.select_groups(groups([0.0, 1.0, 1.0, 0.0]), [0, 1]), groups([0.0, 2.0])]
    batches = grpo.regroup(pool, 2, want=2, filler=pool[1])
    assert [len(b.examples) for b in batches] == [1, 1] and all(b.weight == 1 for b in batches)
    assert batches[1].rewards.tolist() == [1.0, 0.0]
    short = grpo.regroup([groups([0.0, 1.0])], 3, want=6, filler=pool[1])
    assert [len(b.examples) for b in short] == [1, 1, 1] and [b.weight for b in short] == [1.0, 0.0, 0.0]
    assert [len(b.examples) for b in grpo.regroup(pool, 1, want=6, filler=pool[1])] == [3]


def test_truncated_completions_leave_the_loss_after_their_advantages():
    batch = groups([1.0, 0.0, 0.0, 1.0], truncated=((True, False), (False, False)))
    batch = grpo.with_advantages(batch, GRPOConfig(num_generations=2))
    masked = grpo.without_truncated(batch)
    assert masked.lengths == [batch.lengths[1], *batch.lengths[2:]]
    assert torch.equal(masked.advantages, batch.advantages[1:]) and torch.equal(masked.rewards, batch.rewards[1:])
    assert masked.rollout_logprobs[0] == batch.rollout_logprobs[0][1:]
    everything = grpo.dataclasses.replace(batch, truncated=((True, True), (True, True)))
    gone = grpo.without_truncated(everything)
    assert gone.weight == 0 and gone.lengths == batch.lengths and not gone.advantages.any()


def test_overlong_penalty_is_dapos():
    limit, buffer = 100, 20
    assert [grpo.overlong_penalty(n, limit, buffer) for n in (10, 80, 90, 100)] == [0.0, 0.0, -0.5, -1.0]


def test_logprob_gap():
    trainer, rollout = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -2.5, -0.4])
    gap = grpo.logprob_gap(trainer, rollout)
    diff = [0.0, 0.5, -0.1]
    assert gap["logprob_gap/mean_abs"].item() == pytest.approx(0.2)
    assert gap["logprob_gap/max"].item() == pytest.approx(0.5)
    assert gap["logprob_gap/kl"].item() == pytest.approx(sum(math.exp(d) - d - 1 for d in diff) / 3)


def test_tally_keeps_maxima():
    from vcr1.train import Tally

    tally = Tally()
    tally.max("x", [1.0, 3.0])
    tally.max("x", [2.0])
    tally.max("y", [])
    assert tally.reduce() == {"x": 3.0, "y": None}



def _train(out, synthetic, *extra):
    from vcr1 import train
    from vcr1.config import parse_config

    trainer = train.Trainer(parse_config([*SMALL, "--output_dir", str(out), "--data.synthetic_dir", str(synthetic),
                                          "--data.synthetic_train", "4", "--data.synthetic_test", "2", *extra]))
    trainer.run()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_gap_is_logged_and_below_1e4_on_the_cpu(tmp_path, synthetic):
    rows = _train(tmp_path / "o", synthetic, "--max_steps", "2")
    assert all(r["logprob_gap/max"] < 1e-4 and 0 <= r["logprob_gap/mean_abs"] <= r["logprob_gap/max"] for r in rows)
    assert all(abs(r["logprob_gap/kl"]) < 1e-8 and "tis_weight" not in r for r in rows)


def test_tis_weights_are_capped_when_the_engines_disagree(tmp_path, synthetic, monkeypatch):
    real = grpo.rollout_groups

    def lower_by_three(*a, **kw):  # an engine whose log-probs are 3 nats below the trainer's
        out = real(*a, **kw)
        shifted = tuple(tuple(lp - 3.0 for lp in group) for group in out.rollout_logprobs)
        return grpo.dataclasses.replace(out, rollout_logprobs=shifted)

    monkeypatch.setattr(grpo, "rollout_groups", lower_by_three)
    rows = _train(tmp_path / "o", synthetic, "--max_steps", "2", "--grpo.tis_cap", "2.0",
                  "--grpo.importance_sampling_level", "sequence")
    for r in rows:
        assert r["tis_weight"] == pytest.approx(2.0)  # min(exp(3), 2): every weight at its cap
        assert r["logprob_gap/mean_abs"] == pytest.approx(3.0, abs=1e-4) and math.isfinite(r["loss"])


def test_dynamic_sampling_masking_and_overlong_in_a_run(tmp_path, synthetic, monkeypatch):
    """Rewards that are all equal for the first prompt of every micro-batch: those groups are dropped, a
    second round is drawn, and the step trains on what it has after max_sampling_rounds."""
    from vcr1.tasks import get_task

    calls = {"n": 0}
    tg, tracking, gqa = (get_task(name) for name in ("tg", "tracking", "gqa"))
    for task in (tg, tracking, gqa):
        real = task.rewards

        def constant_every_other_group(completion, solution, think, real=real):
            calls["n"] += 1
            return {"format": 0.0} if (calls["n"] - 1) // 2 % 2 == 0 else real(completion, solution, think)

        monkeypatch.setattr(task, "rewards", constant_every_other_group)
    rows = _train(tmp_path / "o", synthetic, "--max_steps", "3", "--grpo.dynamic_sampling", "true",
                  "--grpo.max_sampling_rounds", "2", "--grpo.mask_truncated", "true", "--grpo.overlong_buffer", "4")
    for r in rows:
        assert r["sampling/dropped_groups"] >= 1 and 1 <= r["sampling/rounds"] <= 2
        # 12 tokens are too few for this model's answers: every completion is cut, so none trains
        assert r["truncated"] == 1.0 and r["loss"] is None and r["skipped/nan"] == 0
        assert any(k.endswith("/all_equal") and r[k] > 0 for k in r)
    assert any(k.endswith("/overlong") and r[k] is not None and r[k] < 0 for r in rows for k in r)


def test_dynamic_sampling_decides_rounds_for_every_process(tmp_path, synthetic):
    """Two processes under ZeRO-3, rank 0's groups all uniform (always short) and rank 1's informative: both
    run every round; a hang (a round one process skips) fails at the timeout."""
    tg = synthetic / "train"
    out = tmp_path / "zero3"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           str(REPO / "vcr1/train.py"), *SMALL, "--output_dir", str(out), "--max_steps", "4",
           "--engine.zero_stage", "3", "--grpo.dynamic_sampling", "true", "--grpo.max_sampling_rounds", "2",
           "--grpo.max_completion_length", "40",
           "--data", f"rank_split_task:RankSplitGrounding:{tg / 'tg.json'}:{tg / 'tg'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests/support"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["sampling/rounds"] == 2 for r in rows)  # rank 0 is always short, so both run 2 rounds
    assert all(r["sampling/tg_rank_split/all_equal"] == 0.5 for r in rows)  # rank 0's groups only
    assert all(r["sampling/dropped_groups"] == 4 for r in rows)  # rank 0's 2 groups in each of its 2 rounds
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows)  # rank 1's groups train
