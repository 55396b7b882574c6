"""vcr1 training: `torchrun vcr1/train.py [--model DIR --data ...]`.

With no arguments: the tiny embedded Qwen2.5-VL on the synthetic video set — a short supervised
warm-up (so the random model learns the answer format), then GRPO. With `--model` and `--data`: GRPO
of a local Qwen2.5-VL with the paper's hyperparameters. `--help` lists every option.

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vcr1 import checkpoint, rollout
from vcr1 import engine as eng
from vcr1.config import ConfigError, parse_config, to_dict
from vcr1.data.dataset import PromptStream, balanced_subset, load_split, reference_answer, synthetic_datasets
from vcr1.data.video import decode_stats
from vcr1.loss import group_advantages, sft_loss
from vcr1.model import install_lm_head, load_model, load_tokenizer, stop_ids
from vcr1.monitor import Monitor, Phases, enable_nvtx
from vcr1.packing import completion_hidden
from vcr1.rewards import score, total_reward
from vcr1_kernels import grpo_loss, token_logprobs

log = logging.getLogger("vcr1")


@dataclass
class Micro:
    """One micro-batch of rollouts: prompts, their completions, rewards and what the loss needs."""
    examples: list
    completions: list  # per prompt: list of G 1-D token tensors
    rewards: torch.Tensor  # [B·G]
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    @property
    def inputs(self):
        return [ex.inputs for ex in self.examples]


@dataclass
class Counters:
    skipped_annotations: int = 0
    skipped_reward: int = 0
    skipped_nan: int = 0


def _zero_loss(hidden, weight):
    """A loss of exactly 0 that still touches the head: every process runs the same modules under ZeRO-3."""
    return (hidden.float().sum() + weight.float().sum()) * 0.0


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, self.device = eng.init_distributed()
        self.out = Path(cfg.output_dir)
        self.sft_steps = cfg.sft.steps if "sft" in cfg.stage else 0
        self.phase = Phases()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)

        with self.phase("setup/model"):
            self.tokenizer = load_tokenizer(cfg.model.path)
            model = load_model(cfg.model.path, self.tokenizer, dtype=cfg.model.dtype, attn=cfg.model.attn,
                               seed=cfg.seed).to(self.device)
            install_lm_head(model)
            if cfg.engine.nvtx:
                enable_nvtx(model.model.visual)
            if cfg.model.freeze_vision:
                model.model.visual.requires_grad_(False)
            ref = self._initial_ref(model)
            if cfg.model.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.eos_ids = stop_ids(model, self.tokenizer)
        self.counters = Counters()

        with self.phase("setup/data"):
            self._build_data(model.config)
        self.grpo_steps = self._grpo_steps()
        self.engine = eng.build_engine(model, cfg, grpo_steps=self.grpo_steps)
        self.model = self.engine.module
        self.ref = eng.build_frozen(ref, cfg) if ref is not None else None
        self.step, self.stage = 0, "sft" if "sft" in cfg.stage else "grpo"
        self._ref_synced = False
        self._grad_norm = None

        resumed = checkpoint.latest(self.out) if cfg.resume else None
        if cfg.resume and resumed is None and self.rank == 0:
            print(f"--resume: no checkpoint under {self.out}/checkpoints, starting fresh", flush=True)
        self.monitor = Monitor(self.out, enabled=self.rank == 0, wandb_run=cfg.wandb, config=to_dict(cfg),
                               resume=resumed is not None)
        if resumed is not None:
            self._restore(resumed)
        if self.rank == 0:
            (self.out / "config.yaml").write_text(_yaml(to_dict(cfg)))
        self.monitor.progress(
            f"vcr1: {'tiny embedded default' if cfg.model.path is None else cfg.model.path} | "
            f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params | {self.world} process(es) | "
            f"ZeRO-{cfg.engine.zero_stage} | {len(self.train_samples)} train examples "
            f"({self.counters.skipped_annotations} malformed skipped) | output {self.out}")

    # ---- setup -------------------------------------------------------------------------------------
    def _initial_ref(self, model):
        """π_ref: the policy as GRPO starts. After a warm-up that is the warm-up's last checkpoint (on resume)
        or a copy taken at the switch (see `_sync_ref`); without one, the loaded model."""
        cfg = self.cfg
        if cfg.grpo.beta == 0 or "grpo" not in cfg.stage:
            return None
        if self.sft_steps and cfg.resume:
            warm = self.out / "checkpoints" / checkpoint.protected_name(self.sft_steps)
            if warm.is_dir():
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
            eng.barrier()
            splits = synthetic_datasets(root, cfg.data, cfg.seed)  # now only reads the manifest
            datasets, eval_datasets = splits["train"], eval_datasets or splits["test"]
        self.train_samples, bad = load_split(datasets)
        self.eval_samples, _ = load_split(eval_datasets) if eval_datasets else ([], 0)
        self.counters.skipped_annotations = bad
        if not self.train_samples:
            raise ConfigError("no usable training examples in the configured datasets")
        stream = dict(tokenizer=self.tokenizer, model_config=model_config, data_cfg=cfg.data, rank=self.rank,
                      world=self.world, device=self.device)
        self.stream = PromptStream(self.train_samples, seed=cfg.seed, **stream)
        self.sft_stream = PromptStream(self.train_samples, seed=cfg.seed + 1, **stream)

    def _grpo_steps(self) -> int:
        cfg = self.cfg
        if "grpo" not in cfg.stage:
            return 0
        per_step = cfg.prompts_per_step * cfg.grad_accum
        steps = cfg.epochs * len(self.stream) // per_step
        return max(1, min(steps, cfg.max_steps) if cfg.max_steps else steps)

    # ---- model passes ------------------------------------------------------------------------------
    def _hidden(self, model, inputs, completions):
        return completion_hidden(model, inputs, completions, shared_prefix=self.cfg.engine.shared_prefix)

    def _logprobs(self, model, micro: Micro) -> torch.Tensor:
        hidden, targets, _ = self._hidden(model, micro.inputs, micro.completions)
        return model.lm_head(hidden, fn=token_logprobs, targets=targets,
                             backend=self.cfg.engine.loss_backend).detach()

    def _backward(self, loss, hidden, last_good):
        """Backward the micro-batch loss, or a zero through a finite forward when any process got NaN."""
        bad = eng.all_reduce(torch.tensor([float(not torch.isfinite(loss).all())]))
        if bad.item() > 0:
            self.counters.skipped_nan += 1
            log.warning("non-finite loss on %d process(es): micro-batch skipped", int(bad.item()))
            if eng.all_reduce(torch.tensor([float(not torch.isfinite(hidden).all())])).item() > 0:
                if last_good is None:
                    raise RuntimeError("non-finite hidden states before any finite step: the model or data is broken")
                hidden = self._hidden(self.model, last_good.inputs, last_good.completions)[0]
            loss = self.model.lm_head(hidden, fn=_zero_loss)
        with self.phase("policy/backward"):
            self.engine.backward(loss)
        with self.phase("optimizer"):
            if self.engine.is_gradient_accumulation_boundary():
                self._grad_norm = self._global_grad_norm()
            self.engine.step()
        return bad.item() == 0

    def _global_grad_norm(self) -> float | None:
        """DeepSpeed reports it for ZeRO >= 1; at stage 0 the full gradients are local, so compute it."""
        if self.cfg.engine.zero_stage > 0:
            return None
        grads = [p.grad.float().norm() for p in self.model.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else None

    # ---- supervised warm-up ------------------------------------------------------------------------
    def sft_step(self):
        cfg, losses = self.cfg, []
        self.model.train()
        for _ in range(cfg.grad_accum):
            with self.phase("data"):
                examples = self.sft_stream.next_batch(cfg.sft.batch_size)
            answers = [reference_answer(ex.sample, cfg.data.think) for ex in examples]
            targets = [[torch.tensor(self.tokenizer(a, add_special_tokens=False)["input_ids"] + [self.eos_ids[0]])]
                       for a in answers]
            with self.phase("policy/forward"):
                hidden, ids, cu = self._hidden(self.model, [ex.inputs for ex in examples], targets)
                logp = self.model.lm_head(hidden, fn=token_logprobs, targets=ids, backend=cfg.engine.loss_backend)
                loss = sft_loss(logp, cu.to(logp.device))
            self._backward(loss, hidden, Micro(examples, targets, torch.zeros(0)))
            losses.append(loss.item())
        return {"loss": float(np.mean(losses)), "tokens": int(cu[-1])}

    # ---- GRPO --------------------------------------------------------------------------------------
    def _rollout(self, examples: list, micro: int):
        g = self.cfg.grpo
        fn = rollout.generate if self.cfg.engine.fast_rollout else rollout.hf_generate
        self.model.eval()
        with torch.no_grad(), eng.gathered(self.model, self.cfg.engine.zero_stage):
            out = fn(self.model, [ex.inputs for ex in examples], num_samples=g.num_generations,
                     max_new_tokens=g.max_completion_length, temperature=g.temperature, top_k=g.top_k,
                     top_p=g.top_p, eos_token_id=self.eos_ids,
                     seed=hash((self.cfg.seed, self.rank, self.step, micro)) % 2**31)  # resumable
        self.model.train()
        return [[c.token_ids.cpu() for c in group] for group in out]

    def _score(self, examples, completions, stats: dict) -> Micro:
        """Rewards of every completion; a group whose reward throws is dropped and counted."""
        keep_ex, keep_comp, rewards = [], [], []
        for ex, group in zip(examples, completions):
            task = ex.sample.task
            try:
                texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in group]
                parts = [score(task, t, ex.sample.solution, think=self.cfg.data.think) for t in texts]
            except Exception as e:  # a malformed solution or a reward bug must not end the run
                self.counters.skipped_reward += 1
                log.warning("reward failed on %s: %r; group skipped", ex.sample.uid, e)
                continue
            totals = [total_reward(p, self.cfg.grpo.reward_weights) for p in parts]
            keep_ex.append(ex)
            keep_comp.append(group)
            rewards += totals
            for p, total in zip(parts, totals):
                for k, v in {**p, "total": total}.items():
                    stats.setdefault(f"reward/{task}/{k}", []).append(v)
            if len(stats.setdefault("_samples", [])) < 4:
                stats["_samples"].append({"uid": ex.sample.uid, "task": task, "completion": texts[0],
                                          "reward": totals[0], "solution": ex.sample.solution})
        return Micro(keep_ex, keep_comp, torch.tensor(rewards, dtype=torch.float32))

    def grpo_step(self):
        cfg, g, stats = self.cfg, self.cfg.grpo, {}
        micros = []
        for micro in range(cfg.grad_accum):
            with self.phase("data"):
                examples = self.stream.next_batch(cfg.prompts_per_step)
            with self.phase("rollout"):
                completions = self._rollout(examples, micro)
            with self.phase("rewards"):
                micros.append(self._score(examples, completions, stats))

        # Advantages: per group, or against the std of the whole batch across processes.
        all_rewards = torch.cat([m.rewards for m in micros])
        batch_std = None
        if g.scale_rewards == "batch":
            gathered = torch.cat([r for r in eng.all_gather_objects(all_rewards) if r.numel()])
            batch_std = gathered.std() if gathered.numel() > 1 else torch.tensor(0.0)
        for m in micros:
            m.advantages = group_advantages(m.rewards, g.num_generations, g.scale_rewards, batch_std)
        lengths = [len(c) for m in micros for group in m.completions for c in group]
        # dapo normalises by the token count of the whole step, across micro-batches and processes.
        normalizer = eng.all_reduce(torch.tensor([float(sum(lengths))])).item() if g.loss_type == "dapo" else None

        with self.phase("ref+old_logprobs"):
            for m in micros:
                if not m.examples:
                    continue
                if self.ref is not None:
                    with torch.no_grad():
                        m.ref_logprobs = self._logprobs(self.ref, m)
                if g.num_iterations > 1:
                    with torch.no_grad():
                        m.old_logprobs = self._logprobs(self.model, m)

        losses, kls, clips, entropies, last_good = [], [], [], [], None
        for _ in range(g.num_iterations):
            for m in micros:
                with self.phase("policy/forward"):
                    loss, hidden, st = self._policy_loss(m, last_good, normalizer)
                if self._backward(loss, hidden, last_good) and m.examples:
                    last_good = m
                    losses.append(loss.item())
                    kls.append(float(st["kl"]))
                    clips.append(float(st["clip_ratio"]))
                    entropies.append(float(st["entropy"]))

        row = {"loss": _mean(losses), "kl": _mean(kls), "clip_ratio": _mean(clips), "entropy": _mean(entropies),
               "completion_length": _global_mean(lengths),
               "reward": _global_mean(all_rewards.tolist())}
        keys = sorted({k for s in eng.all_gather_objects(sorted(k for k in stats if k.startswith("reward/")))
                       for k in s})
        for k in keys:
            row[k] = _global_mean(stats.get(k, []))
        prompt_tokens = sum(ex.inputs["input_ids"].shape[1] for m in micros for ex in m.examples)
        row["tokens"] = int(eng.all_reduce(torch.tensor([float(prompt_tokens + sum(lengths))])).item())
        return row, stats.get("_samples", [])

    def _policy_loss(self, m: Micro, last_good, normalizer):
        g = self.cfg.grpo
        if not m.examples:  # every group's reward failed: step with a zero loss through a good batch
            src = last_good or m
            if not src.examples:
                raise RuntimeError("first micro-batch has no scorable group")
            hidden = self._hidden(self.model, src.inputs, src.completions)[0]
            return self.model.lm_head(hidden, fn=_zero_loss), hidden, {}
        hidden, targets, cu = self._hidden(self.model, m.inputs, m.completions)
        loss, st = self.model.lm_head(
            hidden, fn=grpo_loss, targets=targets, cu_seqlens=cu, advantages=m.advantages.to(hidden.device),
            old_logprobs=m.old_logprobs, ref_logprobs=m.ref_logprobs, beta=g.beta, epsilon_low=g.epsilon_low,
            epsilon_high=g.epsilon_high, delta=g.delta, temperature=g.temperature, loss_type=g.loss_type,
            max_completion_length=g.max_completion_length, normalizer=normalizer, backend=self.cfg.engine.loss_backend)
        if g.loss_type == "dapo":
            # DeepSpeed averages over processes and accumulation steps; dapo's normaliser is already global.
            loss = loss * self.world * self.cfg.grad_accum
        return loss, hidden, st

    # ---- loop --------------------------------------------------------------------------------------
    def run(self):
        cfg = self.cfg
        sft_steps = self.sft_steps
        total = sft_steps + self.grpo_steps
        while self.step < total:
            self.stage = "sft" if self.step < sft_steps else "grpo"
            if self.step == sft_steps and sft_steps and not self._ref_synced:
                self._sync_ref()
            t0 = time.perf_counter()
            if self.stage == "sft":
                row, samples = self.sft_step(), []
            else:
                row, samples = self.grpo_step()
            self.step += 1
            dt = time.perf_counter() - t0
            grad_norm = self._grad_norm if cfg.engine.zero_stage == 0 else self.engine.get_global_grad_norm()
            row = {"step": self.step, "stage": self.stage, **row, "lr": self.engine.get_lr()[0],
                   "grad_norm": _float(grad_norm), "step_time": round(dt, 3),
                   "tokens_per_s": round(row.pop("tokens") / dt, 1), **self._skips(), **self.phase.pop()}
            self.monitor.log(row)
            if samples and (self.step - sft_steps) % cfg.samples_every in (0, 1):
                self.monitor.log_samples(self.step, samples)
            if self.step % cfg.log_every == 0 or self.step == total:
                self.monitor.progress(_progress_line(row, total))
            grpo_step = self.step - sft_steps
            if self.stage == "grpo" and cfg.eval_every and grpo_step % cfg.eval_every == 0:
                self.evaluate()
            if self.step == total or (self.stage == "grpo" and grpo_step % cfg.save_every == 0) \
                    or self.step == sft_steps:
                self.save()
        self.monitor.close()
        self.monitor.progress(f"done: metrics in {self.out / 'metrics.jsonl'}, plot in {self.out / 'reward_curve.png'}")

    def _skips(self) -> dict:
        c = self.counters
        local = [self.stream.skipped_media + self.sft_stream.skipped_media, c.skipped_reward,
                 decode_stats["cuda_fallback"]]
        media, reward, fallback = map(int, eng.all_reduce(torch.tensor(local, device=self.device)).tolist())
        return {"skipped/media": media, "skipped/annotations": c.skipped_annotations, "skipped/reward": reward,
                "skipped/nan": c.skipped_nan, "decode/cuda_fallback": fallback}

    def evaluate(self):
        from vcr1.eval import evaluate

        if not self.eval_samples:
            return
        with self.phase("eval"), eng.gathered(self.model, self.cfg.engine.zero_stage):
            samples = balanced_subset(self.eval_samples, self.cfg.eval_limit)
            result = evaluate(self.model, self.tokenizer, samples, cfg=self.cfg, rank=self.rank, world=self.world,
                              device=self.device)
        row = {"step": self.step, "stage": "eval"}
        for task, metrics in result.items():
            row.update({f"eval/{task}/{k}": v for k, v in metrics.items()})
        self.monitor.log(row)
        self.monitor.progress("eval " + " ".join(f"{k}={v:.3g}" for k, v in row.items()
                                                 if k.startswith("eval/") and isinstance(v, float)))

    def save(self):
        with self.phase("checkpoint"):
            state = {"step": self.step, "skipped_nan": self.counters.skipped_nan,
                     "skipped_reward": self.counters.skipped_reward}
            rank_state = {"stream": self.stream.state(), "sft_stream": self.sft_stream.state()}
            path = checkpoint.save(self.out, self.step, engine=self.engine, tokenizer=self.tokenizer,
                                   zero_stage=self.cfg.engine.zero_stage, rank=self.rank, trainer_state=state,
                                   rank_state=rank_state, model_src=self.cfg.model.path,
                                   keep=self.cfg.keep_checkpoints, protect=self.sft_steps)
        self.monitor.progress(f"checkpoint {path}")

    def _restore(self, path: Path):
        state, rank_state = checkpoint.load(path, engine=self.engine, rank=self.rank)
        self.step = state["step"]
        self._ref_synced = self.step > self.sft_steps  # π_ref was rebuilt from the warm-up checkpoint
        self.counters.skipped_nan = state["skipped_nan"]
        self.counters.skipped_reward = state["skipped_reward"] if self.rank == 0 else 0
        self.stream.load_state(rank_state["stream"])
        self.sft_stream.load_state(rank_state["sft_stream"])
        self.monitor.progress(f"resumed from {path} at step {self.step}")


def _mean(xs) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _global_mean(xs) -> float | None:
    """Mean over every process's values (each process may hold a different number)."""
    s = eng.all_reduce(torch.tensor([float(sum(xs)), float(len(xs))], dtype=torch.float64))
    return float(s[0] / s[1]) if s[1] > 0 else None


def _float(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _progress_line(row: dict, total: int) -> str:
    parts = [f"{row['stage']} step {row['step']}/{total}"]
    for key in ("loss", "reward", "kl", "completion_length", "step_time"):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.4g}")
    parts.append(f"{row['tokens_per_s']:.0f} tok/s")
    return " | ".join(parts)


def _yaml(tree: dict) -> str:
    import yaml

    return yaml.safe_dump(tree, sort_keys=False)


def main(argv=None):
    logging.basicConfig(level=os.environ.get("VCR1_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"vcr1: config error: {e}", file=sys.stderr)
        sys.exit(2)
    trainer = Trainer(cfg)
    trainer.run()
    return trainer


if __name__ == "__main__":
    main()
