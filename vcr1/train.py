"""vcr1 training: `torchrun vcr1/train.py [--config RECIPE.yaml] [--key value ...] [--dry_run]`.

A run reads one recipe (configs/): without --config, configs/tiny.yaml, the tiny embedded Qwen2.5-VL on the
synthetic video set, GRPO from vcr1's shipped warm start; `--config configs/videochat_r1_7b.yaml` is the
paper's run of a local Qwen2.5-VL. Flags override the recipe; `--help` lists every option with the value
the run would use. `--dry_run` checks everything the run needs (vcr1/preflight.py, which every run also
checks before it builds a model) and prints the resolved config and the planned steps.

A GRPO step: draw prompts, decode each video once, sample G completions per prompt, score them with
the rule-based rewards, turn rewards into group-relative advantages, and take μ policy updates of the
clipped, KL-regularised loss on the packed completion tokens.
"""
from __future__ import annotations

import sys

if __package__ in (None, ""):
    # Run as a script (`torchrun vcr1/train.py`): Python put vcr1/ first on sys.path, where its modules
    # would hide installed ones. Drop it before any other import; an uninstalled checkout is reached from
    # the END of the path, so no folder of the repository can shadow an installed package.
    import importlib.util
    import os

    _here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]
    if importlib.util.find_spec("vcr1") is None:
        sys.path += [os.path.dirname(_here), os.path.join(os.path.dirname(_here), "kernels")]

import copy
import logging
import math
import os
import random
import signal
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from vcr1 import checkpoint, distributed, grpo, preflight
from vcr1.config import ConfigError, parse_cli, to_dict
from vcr1.data.dataset import PromptStream, balanced_subset, load_split, reference_tokens, synthetic_datasets
from vcr1.data.video import decode_stats
from vcr1.loss import sft_loss
from vcr1.model import install_lm_head, load_model, load_tokenizer, stop_ids
from vcr1.monitor import Monitor, Phases, before_after_table, enable_nvtx
from vcr1.packing import ATTENTION_BACKENDS
from vcr1.tasks import blind_answers, get_task
from vcr1_kernels import IMPORTANCE_SAMPLING_LEVELS, LM_HEAD_BACKENDS, LOSS_TYPES, token_logprobs

log = logging.getLogger("vcr1")
# Values of options defined by the kernels package (their one home), listed by --help and checked by the parser.
CHOICES = {"grpo.loss_type": LOSS_TYPES, "engine.loss_backend": LM_HEAD_BACKENDS,
           "grpo.importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS,
           "engine.attn_backend": ("auto", *ATTENTION_BACKENDS)}


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, self.device = distributed.init_distributed()
        self.out = Path(cfg.output_dir)
        self.sft_steps = cfg.sft.steps if "sft" in cfg.stage else 0
        self.phase = Phases(sync=cfg.engine.sync_timings or cfg.engine.nvtx)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        # Decided before the model is built: a resumed run takes π_ref from the warm-up's checkpoint.
        self.resume_from = self._checkpoint_to_resume()

        with self.phase("setup/model"):
            self.tokenizer = load_tokenizer(cfg.model.path)
            model = load_model(cfg.model.path, self.tokenizer, dtype=cfg.model.dtype, attn=cfg.model.attn,
                               seed=cfg.seed, init=cfg.model.init).to(self.device)
            install_lm_head(model)
            if cfg.engine.nvtx:
                enable_nvtx(model.model.visual)
            if cfg.model.freeze_vision:
                model.model.visual.requires_grad_(False)
            ref = self._initial_ref(model)
            if cfg.model.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.stop_ids = stop_ids(model, self.tokenizer)
        self.fwd = grpo.ForwardOptions.from_config(cfg)  # how every packed forward and LM-head call runs

        with self.phase("setup/data"):
            self._build_data(model.config)
        self.grpo_steps = self._grpo_steps()
        self.engine = distributed.build_engine(model, cfg, grpo_steps=self.grpo_steps)
        self.model = self.engine.module
        self.ref = distributed.build_frozen(ref, cfg) if ref is not None else None
        self.step, self.stage = 0, "sft" if "sft" in cfg.stage else "grpo"
        self.skipped = {"reward": 0}  # this process's failed reward groups, summed over processes when logged
        self.run_id = checkpoint.new_run_id()
        self._ref_synced = False
        self.clock = StepClock()  # restarted when the training loop starts

        if self.resume_from is not None:
            self._restore(self.resume_from)
        self.monitor = Monitor(self.out, enabled=self.rank == 0, wandb_run=cfg.wandb, config=to_dict(cfg),
                               resume_step=self.step if self.resume_from is not None else None)
        if self.rank == 0:
            (self.out / "config.yaml").write_text(_yaml(to_dict(cfg)))
        self.monitor.progress(
            f"vcr1: {'tiny embedded default' if cfg.model.path is None else cfg.model.path} | "
            f"{_param_summary(self.model.parameters())} | {self.world} process(es) | "
            f"ZeRO-{cfg.engine.zero_stage} | {len(self.train_samples)} train examples "
            f"({self.skipped_annotations} malformed skipped) | output {self.out}")
        if self.resume_from is not None:
            self.monitor.progress(f"resumed from {self.resume_from} at step {self.step}")

    # ---- setup -------------------------------------------------------------------------------------
    def _checkpoint_to_resume(self) -> Path | None:
        """The checkpoint this run continues, per --resume; a run never writes over another run's checkpoints."""
        mode, found = self.cfg.resume, checkpoint.find_checkpoint(self.out, required=self.cfg.resume == "true")
        if mode == "auto":
            return found
        if mode == "false" and any(checkpoint.is_complete(p) for p in (self.out / "checkpoints").glob("step-*")):
            raise FileExistsError(f"{self.out}/checkpoints holds an earlier run's checkpoints: --resume auto or "
                                  "true continues it; or choose another --output_dir")
        return found if mode == "true" else None

    def _initial_ref(self, model):
        """π_ref: the policy as GRPO starts. After a warm-up that is the warm-up's last checkpoint (on resume)
        or a copy taken at the switch (see `_sync_ref`); without one, the loaded model."""
        cfg = self.cfg
        if cfg.grpo.beta == 0 or "grpo" not in cfg.stage:
            return None
        if self.sft_steps and self.resume_from is not None:
            warm = self.resume_from.parent / checkpoint.protected_name(self.sft_steps)
            if checkpoint.is_complete(warm) and checkpoint.run_id_of(warm) == checkpoint.run_id_of(self.resume_from):
                ref = load_model(str(warm), self.tokenizer, dtype=cfg.model.dtype, attn=cfg.model.attn)
                install_lm_head(ref)
                return ref.to(self.device)
        return copy.deepcopy(model)

    def _sync_ref(self):
        """Make π_ref the warmed-up policy (ZeRO-3 shards match rank by rank, so shards copy directly)."""
        if self.ref is None:
            return
        with torch.no_grad():
            for p_ref, p in zip(self.ref.parameters(), self.model.parameters()):
                if hasattr(p, "ds_tensor"):
                    p_ref.ds_tensor.copy_(p.ds_tensor)
                else:
                    p_ref.copy_(p)
        self._ref_synced = True

    def _build_data(self, model_config):
        cfg = self.cfg
        datasets, eval_datasets = cfg.data.datasets, cfg.data.eval_datasets
        if not datasets:
            root = Path(cfg.data.synthetic_dir or self.out / "synthetic")
            if self.rank == 0:
                splits = synthetic_datasets(root, cfg.data, cfg.seed)
            distributed.barrier()
            splits = synthetic_datasets(root, cfg.data, cfg.seed)  # now only reads the manifest
            datasets, eval_datasets = splits["train"], eval_datasets or splits["test"]
        self.train_samples, bad_train = load_split(datasets)
        self.eval_samples, bad_eval = load_split(eval_datasets) if eval_datasets else ([], 0)
        self.eval_samples = balanced_subset(self.eval_samples, cfg.eval_limit)  # what every evaluation scores
        self.skipped_annotations = bad_train + bad_eval
        if not self.train_samples:
            raise ConfigError("no usable training examples in the configured datasets")
        stream = dict(tokenizer=self.tokenizer, model_config=model_config, data_cfg=cfg.data, rank=self.rank,
                      world=self.world, device=self.device)
        self.stream = PromptStream(self.train_samples, seed=cfg.seed, **stream)
        self.sft_stream = PromptStream(self.train_samples, seed=cfg.seed + 1, **stream)

    def _grpo_steps(self) -> int:
        return preflight.planned_grpo_steps(self.cfg, len(self.stream))

    # ---- the two kinds of step ---------------------------------------------------------------------
    def sft_step(self, tally: Tally):
        """One supervised warm-up step: the ground-truth answers' negative log-likelihood."""
        cfg = self.cfg
        self.model.train()
        for _ in range(cfg.grad_accum):
            with self.phase("data"):
                examples = self.sft_stream.next_batch(cfg.sft.batch_size)
            targets = [[torch.tensor(reference_tokens(ex.sample, self.tokenizer, cfg.data.think))] for ex in examples]
            with self.phase("policy/forward"):
                hidden, ids, cu = self.fwd.hidden(self.model, [ex.inputs for ex in examples], targets)
                logp = self.fwd.head(self.model, hidden, token_logprobs, targets=ids)
                loss = sft_loss(logp, cu.to(logp.device))
            self._backward_and_step(loss)
            tally.mean("loss", [loss.detach()])
            tally.total("tokens", sum(ex.inputs["input_ids"].shape[1] for ex in examples) + len(ids))
        return []

    def grpo_step(self, tally: Tally):
        """One GRPO step: sample G completions per prompt, score them, turn rewards into group-relative
        advantages, take π_old / π_ref log-probs, then μ updates of the clipped policy loss."""
        cfg, grpo_cfg = self.cfg, self.cfg.grpo
        scored, pool = self._sample_groups(tally)

        batch_std = self._batch_std(pool) if grpo_cfg.scale_rewards == "batch" else None
        batches = [grpo.with_advantages(groups, grpo_cfg, batch_std) for groups in pool]
        if grpo_cfg.mask_truncated:
            batches = [grpo.without_truncated(b) for b in batches]
        old = self.model if grpo_cfg.num_iterations > 1 else None  # μ = 1 is on-policy: π_old is the policy itself
        with self.phase("ref+old_logprobs"):
            batches = [grpo.with_logprobs(b, grpo_cfg, self.fwd, old=old, ref=self.ref) for b in batches]

        normalizer, scale = None, 1.0
        if grpo_cfg.loss_type == "dapo":
            # dapo divides by the step's token count over every micro-batch and process; DeepSpeed then
            # averages gradients over both, which `scale` undoes.
            normalizer = distributed.sum_floats([sum(sum(b.lengths) for b in batches if b.weight)])[0] or 1.0
            scale = self.world * cfg.grad_accum
        for iteration in range(grpo_cfg.num_iterations):
            for b in batches:
                with self.phase("policy/forward"):
                    loss, stats = grpo.policy_loss(self.model, b, grpo_cfg, self.fwd, normalizer=normalizer,
                                                   scale=scale)
                self._backward_and_step(loss)
                for key, value in (("loss", loss.detach()), *((k, stats[k]) for k in ("kl", "clip_ratio", "entropy"))):
                    tally.mean(key, [value] if b.weight else [])  # a step of unscorable groups logs None
                if iteration == 0 and b.weight:  # π_old is the policy of the first iteration
                    for key in ("logprob_gap/mean_abs", "logprob_gap/kl", "tis_weight", "logprob_gap/max"):
                        if key in stats:
                            (tally.max if key.endswith("/max") else tally.mean)(key, [stats[key]])

        for s in scored:
            for key, values in s.components.items():
                tally.mean(key, values)
            tally.mean("reward", s.groups.rewards.tolist() if s.groups.weight else [])
            tally.mean("completion_length", s.groups.lengths)
            tally.mean("truncated", [float(t) for group in s.groups.truncated or () for t in group])
        tally.total("tokens", sum(b.prompt_tokens + sum(b.lengths) for b in batches))
        return [sample for s in scored for sample in s.samples][:4]

    def _sample_groups(self, tally: Tally) -> tuple[list, list]:
        """Rollouts and rewards of the step's prompts: (every scored micro-batch, the grad_accum micro-batches
        to train on). With dynamic sampling, groups whose rewards are all equal are dropped and further rounds
        of prompts drawn until every process holds its groups, or grpo.max_sampling_rounds is reached."""
        cfg, grpo_cfg = self.cfg, self.cfg.grpo
        want = cfg.prompts_per_step * cfg.grad_accum  # groups per step on this process
        scored, pool, rounds = [], [], 0
        while True:
            rounds += 1
            with self.phase("data"):
                draws = [self.stream.next_batch(cfg.prompts_per_step) for _ in range(cfg.grad_accum)]
            with self.phase("rollout"), distributed.generation_weights(self.engine, cfg.engine.zero_stage):
                first = (rounds - 1) * cfg.grad_accum
                rolled = [grpo.rollout_groups(self.model, examples, grpo_cfg, stop_ids=self.stop_ids,
                                              fast=cfg.engine.fast_rollout,
                                              seed=hash((cfg.seed, self.rank, self.step, micro)) % 2**31)  # resumable
                          for micro, examples in enumerate(draws, start=first)]
            with self.phase("rewards"):
                new = [grpo.score_groups(groups, self.tokenizer, grpo_cfg, think=cfg.data.think) for groups in rolled]
            scored += new
            self.skipped["reward"] += sum(s.failed for s in new)
            for s in new:
                for ex, uniform in zip(s.groups.examples, grpo.uniform_groups(s.groups)):
                    tally.mean(f"sampling/{ex.sample.task}/all_equal", [float(uniform)])
            if not grpo_cfg.dynamic_sampling:
                return scored, [s.groups for s in new]
            for s in new:  # only groups whose rewards differ train anything
                keep = [i for i, uniform in enumerate(grpo.uniform_groups(s.groups)) if not uniform]
                tally.total("sampling/dropped_groups", len(s.groups.examples) - len(keep))
                pool.append(grpo.select_groups(s.groups, keep))
            # The decision is global: every process must run as many rounds (ZeRO-3 gathers in each).
            (short,) = distributed.any_process(sum(len(g.examples) for g in pool) < want)
            if not short or rounds == grpo_cfg.max_sampling_rounds:
                tally.mean("sampling/rounds", [rounds])
                return scored, grpo.regroup(pool, cfg.grad_accum, want, filler=new[-1].groups)

    def _batch_std(self, batches: list) -> torch.Tensor:
        """Std of the step's rewards over every process (scale_rewards batch)."""
        local = torch.cat([b.rewards for b in batches if b.weight and b.rewards is not None] or [torch.zeros(0)])
        rewards = torch.cat(distributed.all_gather_objects(local))
        return rewards.std() if rewards.numel() > 1 else torch.tensor(0.0)

    def _backward_and_step(self, loss):
        """Backward one micro-batch; DeepSpeed applies the optimizer after every grad_accum of them, and
        skips (and counts in engine.skipped_steps) a step whose gradients are not finite on any process."""
        with self.phase("policy/backward"):
            self.engine.backward(loss)
        with self.phase("optimizer"):
            self.engine.step()

    # ---- loop --------------------------------------------------------------------------------------
    def run(self):
        """Train to the end, or until SIGTERM/SIGINT: then every process finishes its step, saves and returns."""
        cfg, total = self.cfg, self.sft_steps + self.grpo_steps
        last_save = time.monotonic()
        if self.step == 0 and self._eval_due(-self.sft_steps, total):  # GRPO from the loaded model
            self.evaluate()
        self.clock = StepClock()
        with StopSignals() as signals:
            while self.step < total:
                self.stage = "sft" if self.step < self.sft_steps else "grpo"
                if self.step == self.sft_steps and self.sft_steps and not self._ref_synced:
                    self._sync_ref()
                t0, tally = time.perf_counter(), Tally()
                samples = self.sft_step(tally) if self.stage == "sft" else self.grpo_step(tally)
                self.step += 1
                seconds = time.perf_counter() - t0
                self.clock.stepped(seconds)
                row = self._log_step(tally, samples, seconds, total)
                grpo_step = self.step - self.sft_steps
                if self._eval_due(grpo_step, total):
                    self.evaluate()
                # Rank 0's clock decides, and every process learns both verdicts in one collective.
                overdue = self.rank == 0 and 0 < cfg.save_minutes * 60 < time.monotonic() - last_save
                stop, overdue = distributed.any_process(signals.received is not None, overdue)
                if (stop or overdue or self.step in (total, self.sft_steps)
                        or (self.stage == "grpo" and grpo_step % cfg.save_every == 0)):
                    self.save()
                    last_save = time.monotonic()
                if stop:
                    self.monitor.progress(f"stopped by a signal after step {row['step']}: resume with --resume true")
                    break
        compared = self.step == total and cfg.eval_before_after and "grpo" in cfg.stage
        # What an answer that ignores the video scores on the same held-out examples, beside the metrics.
        blind = blind_answers(self.train_samples, self.eval_samples) if compared else None
        headline = {name: get_task(name).headline for name in dict.fromkeys(x.task for x in self.eval_samples)}
        self.monitor.close(headline, blind)
        if compared:
            self.monitor.progress(before_after_table(self.out / "metrics.jsonl", self.sft_steps, total, headline,
                                                     blind))
        if self.step == total:
            self.monitor.progress(f"done: metrics in {self.out / 'metrics.jsonl'}, "
                                  f"plot in {self.out / 'reward_curve.png'}")

    def _eval_due(self, grpo_step: int, total: int) -> bool:
        """After GRPO step `grpo_step` (0: before the first, where a warm-up ends): --eval_every's steps, and
        with --eval_before_after the policy GRPO starts from and the final one (a warm-up-only run: its end).
        Before the checkpoint of the same step, so a resume from it keeps its eval row rather than redoing it."""
        cfg, trains_grpo = self.cfg, "grpo" in self.cfg.stage
        if cfg.eval_before_after and (self.step == total or (trains_grpo and grpo_step == 0)):
            return True
        return trains_grpo and grpo_step > 0 and bool(cfg.eval_every) and grpo_step % cfg.eval_every == 0

    def _log_step(self, tally: Tally, samples: list, seconds: float, total: int) -> dict:
        """The step's row of metrics.jsonl: every value reduced over all processes, in one collective."""
        local_skips = {"skipped/media": self.stream.skipped_media + self.sft_stream.skipped_media,
                       "skipped/reward": self.skipped["reward"],
                       "decode/cuda_fallback": decode_stats["cuda_fallback"]}
        for key, value in local_skips.items():
            tally.total(key, value)
        row = {"step": self.step, "stage": self.stage, **tally.reduce()}
        tokens = row.pop("tokens")
        row.update({"lr": self.engine.get_lr()[0], "grad_norm": _float(self.engine.get_global_grad_norm()),
                    "step_time": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                    "skipped/annotations": self.skipped_annotations, "skipped/nan": self.engine.skipped_steps,
                    **{k: int(row[k]) for k in local_skips}, **self.phase.pop()})
        self.monitor.log(row)
        if samples and (self.step - self.sft_steps) % self.cfg.samples_every in (0, 1):
            self.monitor.log_samples(self.step, samples)
        if self.step % self.cfg.log_every == 0 or self.step == total:
            self.monitor.progress(_progress_line(row, total, *self.clock.times(self.step, total)))
        return row

    def evaluate(self):
        from vcr1.eval import evaluate

        if not self.eval_samples:
            return
        zero = self.cfg.engine.zero_stage
        with self.phase("eval"), distributed.generation_weights(self.engine, zero):
            result = evaluate(self.model, self.tokenizer, self.eval_samples, cfg=self.cfg, rank=self.rank,
                              world=self.world, device=self.device)
        row = {"step": self.step, "stage": "eval"}
        for task, metrics in result.items():
            row.update({f"eval/{task}/{k}": v for k, v in metrics.items()})
        self.monitor.log(row)
        self.monitor.progress("eval " + " ".join(f"{k}={v:.3g}" for k, v in row.items()
                                                 if k.startswith("eval/") and isinstance(v, float)))

    # ---- checkpoints -------------------------------------------------------------------------------
    def save(self):
        with self.phase("checkpoint"):
            self.monitor.sync()  # the rows up to this checkpoint are on disk with it
            rank_state = {"stream": self.stream.state(), "sft_stream": self.sft_stream.state(),
                          "skipped": dict(self.skipped)}
            path = checkpoint.save(self.out, self.step, engine=self.engine, tokenizer=self.tokenizer,
                                   zero_stage=self.cfg.engine.zero_stage, rank=self.rank,
                                   trainer_state={"step": self.step}, rank_state=rank_state,
                                   model_src=self.cfg.model.path, run_id=self.run_id,
                                   keep=self.cfg.keep_checkpoints, protect=self.sft_steps,
                                   run_config=to_dict(self.cfg))
        self.monitor.progress(f"checkpoint {path}")

    def _restore(self, path: Path):
        state, rank_state = checkpoint.load(path, engine=self.engine, rank=self.rank)
        self.step, self.run_id = state["step"], state.get("run_id") or self.run_id
        self._ref_synced = self.step > self.sft_steps  # π_ref was rebuilt from the warm-up checkpoint
        self.skipped.update(rank_state["skipped"])
        self.stream.load_state(rank_state["stream"])
        self.sft_stream.load_state(rank_state["sft_stream"])


class Tally:
    """A step's metrics on this process - means of values, maxima, sums of totals - reduced over every process
    in one collective (`reduce`), so each logged number covers the whole step, not one process's share."""

    def __init__(self):
        self.sums, self.counts, self.totals = defaultdict(float), defaultdict(int), defaultdict(float)
        self.maxima: dict[str, float | None] = {}

    def max(self, key: str, values):
        found = [float(v) for v in values] + ([] if self.maxima.get(key) is None else [self.maxima[key]])
        self.maxima[key] = max(found) if found else None

    def mean(self, key: str, values):
        self.counts[key] += len(values)
        self.sums[key] += sum(float(v) for v in values)  # tensors are read here, after the step's work

    def total(self, key: str, value: float):
        self.totals[key] += float(value)

    def reduce(self) -> dict:
        sums, counts, totals, maxima = defaultdict(float), defaultdict(int), defaultdict(float), {}
        for part_sums, part_counts, part_totals, part_maxima in distributed.all_gather_objects(
                (dict(self.sums), dict(self.counts), dict(self.totals), self.maxima)):
            for k, v in part_sums.items():
                sums[k] += v
            for k, v in part_counts.items():
                counts[k] += v
            for k, v in part_totals.items():
                totals[k] += v
            for k, v in part_maxima.items():
                maxima[k] = v if maxima.get(k) is None else maxima[k] if v is None else max(v, maxima[k])
        means = {k: sums[k] / counts[k] if counts[k] else None for k in sorted(counts)}
        return {**means, **dict(sorted(maxima.items())), **dict(sorted(totals.items()))}


class StopSignals:
    """Within the block, SIGTERM and SIGINT are remembered (`received`) instead of ending the process, so
    the run can finish its step and save. A second SIGINT interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received, self.previous = None, {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s received: stopping after this step's checkpoint", self.received)

    def __enter__(self):
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _float(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class StepClock:
    """Wall time since the training loop started and the mean time of its steps, for the progress line's
    elapsed time and ETA (evaluations and checkpoints count in the elapsed time, not in the ETA)."""

    def __init__(self):
        self.start, self.seconds, self.steps = time.monotonic(), 0.0, 0

    def stepped(self, seconds: float):
        self.seconds += seconds
        self.steps += 1

    def times(self, step: int, total: int) -> tuple[float, float | None]:
        """(seconds since the loop started, estimated seconds to the end of the run)."""
        mean = self.seconds / self.steps if self.steps else None
        return time.monotonic() - self.start, None if mean is None else mean * max(total - step, 0)


def _duration(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _progress_line(row: dict, total: int, elapsed: float | None = None, eta: float | None = None) -> str:
    parts = [f"{row['stage']} step {row['step']}/{total}"]
    for key in ("loss", "reward", "kl", "completion_length", "step_time"):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.4g}")
    parts.append(f"{row['tokens_per_s']:.0f} tok/s")
    if elapsed is not None:
        parts.append(f"elapsed {_duration(elapsed)}")
    if eta is not None:
        parts.append(f"ETA {_duration(eta)}")
    return " | ".join(parts)


def _param_counts(params) -> tuple[int, int]:
    """(all parameters, trainable ones): full sizes also under ZeRO-3, whose partitioned parameters hold a
    shard (numel() 0 or a slice) and carry their full size in `ds_numel`."""
    total = trainable = 0
    for p in params:
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def _param_summary(params) -> str:
    total, trainable = _param_counts(params)
    return f"{total / 1e6:.2f}M params ({trainable / 1e6:.2f}M trainable)"


def _yaml(tree: dict) -> str:
    import yaml

    return yaml.safe_dump(tree, sort_keys=False)


def main(argv=None):
    logging.basicConfig(level=os.environ.get("VCR1_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, cli = parse_cli(argv, choices=CHOICES)
    except ConfigError as e:
        print(f"vcr1: config error: {e}", file=sys.stderr)
        sys.exit(2)
    # Every check before any model is built; under torchrun every process checks and exits alike, rank 0 prints.
    report = preflight.check(cfg)
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0 and cli["dry_run"]:
        print(f"# vcr1 --dry_run: the resolved config ({cli['config']}, then flags)\n" + _yaml(to_dict(cfg)) +
              "# the plan (world_size: $WORLD_SIZE)\n" + _yaml({"plan": report.plan}), end="", flush=True)
    if rank0:
        for line in [f"warning: {w}" for w in report.warnings] + report.problems:
            print(f"vcr1: {line}", file=sys.stderr)
    if report.problems:
        sys.exit(2)
    if cli["dry_run"]:
        sys.exit(0)
    try:
        trainer = Trainer(cfg)
    except (FileNotFoundError, FileExistsError, ConfigError) as e:  # e.g. --resume true with no checkpoint
        print(f"vcr1: {e}", file=sys.stderr)
        sys.exit(2)
    trainer.run()
    return trainer


def cli() -> int:
    """The installed `vcr1-train` command: `main` on the process's arguments."""
    main()
    return 0


if __name__ == "__main__":
    main()
