"""The GRPO algorithm, one function per stage of a step, each taking and returning an immutable batch:

    rollout_groups -> score_groups -> with_advantages -> with_logprobs -> policy_loss

A `Groups` is one micro-batch: prompts (each with its decoded video) and G sampled completions per
prompt with the sampler's log-probs, later their rewards, advantages and the π_old / π_ref log-probs of
every completion token. The optimizer, processes and checkpoints are the trainer's (vcr1/train.py); the
two quantities that are global by definition - the batch std of `scale_rewards: batch` and dapo's token
count - come in as arguments. `grpo_cfg` is the config's `grpo` section; `fwd`, how every forward of
the policy or π_ref runs (`ForwardOptions`), bound once from the config's `engine` section.

Every process runs the same passes in the same order whatever its data (ZeRO-3 gathers weights
module by module, and all processes must take part): a micro-batch whose every reward failed still
runs its forward and backward, with a loss of exactly zero.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from vcr1 import rollout
from vcr1.loss import group_advantages
from vcr1.packing import completion_hidden
from vcr1.rewards import total_reward
from vcr1.tasks import get_task
from vcr1_kernels import grpo_loss_from_logprobs, token_logprobs

log = logging.getLogger("vcr1")


@dataclass(frozen=True)
class ForwardOptions:
    """How the packed forward and the LM head run, the same for every pass of a run (config `engine.*`)."""
    shared_prefix: bool = True  # the prompt once per group in a packed row; False: the padded reference
    attn_backend: str = "auto"  # packed attention kernel: "auto" or one of vcr1.packing.ATTENTION_BACKENDS
    head_backend: str = "auto"  # LM-head kernels: "auto" or one of vcr1_kernels.LM_HEAD_BACKENDS
    check_values: bool = True  # the kernels check their inputs' values (a host sync each)

    @classmethod
    def from_config(cls, cfg) -> ForwardOptions:
        """A run's options: --engine.shared_prefix, .attn_backend, .loss_backend and .check_values."""
        return cls(shared_prefix=cfg.engine.shared_prefix, attn_backend=cfg.engine.attn_backend,
                   head_backend=cfg.engine.loss_backend, check_values=cfg.engine.check_values)

    def hidden(self, model, inputs: list[dict], completions):
        """`completion_hidden` of the completions after their prompts: (hidden, targets, cu_seqlens)."""
        return completion_hidden(model, inputs, completions, shared_prefix=self.shared_prefix,
                                 attn_backend=self.attn_backend)

    def head(self, model, hidden: torch.Tensor, fn, **kwargs):
        """The fused LM-head kernel `fn` (token_logprobs, grpo_loss) on `hidden` through `model.lm_head`."""
        return model.lm_head(hidden, fn=fn, backend=self.head_backend, check_values=self.check_values, **kwargs)


@dataclass(frozen=True)
class Groups:
    """One micro-batch of GRPO groups. Row order everywhere: group by group, G completions each."""
    examples: tuple  # vcr1.data.dataset.Example per prompt
    completions: tuple  # per prompt: a tuple of G 1-D token tensors
    # per prompt: a tuple of G 1-D fp32 tensors, the log-prob of each completion token under the distribution
    # it was sampled from (vcr1.rollout.Completion.logprobs), aligned with `completions`
    rollout_logprobs: tuple | None = None
    truncated: tuple | None = None  # per prompt: a tuple of G bools, whether a completion hit the length limit
    # per prompt: the G values whose spread decides whether the group trains anything (dynamic sampling's test,
    # on grpo.dynamic_sampling_metric), set when scored
    spread_values: tuple | None = None
    rewards: torch.Tensor | None = None  # [B·G]
    advantages: torch.Tensor | None = None  # [B·G]
    old_logprobs: torch.Tensor | None = None  # [tokens], when μ > 1
    ref_logprobs: torch.Tensor | None = None  # [tokens], when β > 0
    weight: float = 1.0  # 0: nothing here could be scored; the loss is zero but the passes still run

    @property
    def inputs(self) -> list[dict]:
        return [ex.inputs for ex in self.examples]

    @property
    def lengths(self) -> list[int]:
        return [len(c) for group in self.completions for c in group]

    @property
    def prompt_tokens(self) -> int:
        return sum(ex.inputs["input_ids"].shape[1] for ex in self.examples)


@dataclass(frozen=True)
class Scored:
    """`score_groups`' result: the groups the loss trains on, and what the step logs about them."""
    groups: Groups
    components: dict  # "reward/<task>/<component>" and "reward/<task>/total" -> [value per completion]
    failed: int  # groups whose reward threw
    samples: list  # a few completions with their rewards, for samples.jsonl


def rollout_groups(model, examples: list, grpo_cfg, *, stop_ids: list[int], seed: int, fast: bool = True) -> Groups:
    """G sampled completions per prompt, with their log-probs. The caller provides full weights."""
    generate = rollout.generate if fast else rollout.hf_generate
    model.eval()
    with torch.no_grad():
        out = generate(model, [ex.inputs for ex in examples], num_samples=grpo_cfg.num_generations,
                       max_new_tokens=grpo_cfg.max_completion_length, temperature=grpo_cfg.temperature,
                       top_k=grpo_cfg.top_k, top_p=grpo_cfg.top_p, eos_token_id=stop_ids, seed=seed)
    model.train()
    return Groups(tuple(examples), tuple(tuple(c.token_ids.cpu() for c in group) for group in out),
                  rollout_logprobs=tuple(tuple(c.logprobs.cpu() for c in group) for group in out),
                  truncated=tuple(tuple(c.finish_reason == "length" for c in group) for group in out))


def score_groups(groups: Groups, tokenizer, grpo_cfg, *, think: bool) -> Scored:
    """Rule-based rewards of every completion. A group whose reward throws (a bug, or a solution that got
    past validation) is left out of the loss and counted; when none is left the micro-batch keeps all
    its groups at weight 0, so this process still runs the same passes as the others.

    With `grpo_cfg.overlong_buffer` L, each completion also gets DAPO's soft length penalty (component
    `overlong`): 0 up to max_completion_length - L tokens, then falling linearly to -1 at the limit."""
    keep, rewards, components, samples, spread = [], [], {}, [], []
    metric = grpo_cfg.dynamic_sampling_metric
    for i, (ex, group) in enumerate(zip(groups.examples, groups.completions)):
        task = ex.sample.task
        try:
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in group]
            parts = [get_task(task).rewards(t, ex.sample.solution, think) for t in texts]
        except Exception as e:  # a reward must not end the run
            log.warning("reward failed on %s: %r; group left out of the loss", ex.sample.uid, e)
            continue
        if grpo_cfg.overlong_buffer:
            parts = [{**p, "overlong": overlong_penalty(len(c), grpo_cfg.max_completion_length,
                                                        grpo_cfg.overlong_buffer)} for p, c in zip(parts, group)]
        totals = [total_reward(p, grpo_cfg.reward_weights) for p in parts]
        keep.append(i)
        rewards += totals
        spread.append(tuple(p.get(metric, total) for p, total in zip(parts, totals)))
        for p, total in zip(parts, totals):
            for k, v in {**p, "total": total}.items():
                components.setdefault(f"reward/{task}/{k}", []).append(v)
        if len(samples) < 4:
            samples.append({"uid": ex.sample.uid, "task": task, "completion": texts[0], "reward": totals[0],
                            "solution": ex.sample.solution})
    failed = len(groups.examples) - len(keep)
    if not keep:
        n = sum(len(group) for group in groups.completions)
        return Scored(dataclasses.replace(groups, rewards=torch.zeros(n), weight=0.0), components, failed, samples)
    kept = dataclasses.replace(select_groups(groups, keep), rewards=torch.tensor(rewards, dtype=torch.float32),
                               spread_values=tuple(spread))
    return Scored(kept, components, failed, samples)


def overlong_penalty(length: int, limit: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to limit - buffer tokens, then linear down to -1 at the limit."""
    return min(0.0, (limit - buffer - length) / buffer) if length <= limit else -1.0


def select_groups(groups: Groups, keep: list[int]) -> Groups:
    """The batch of the groups numbered `keep` (before advantages and log-probs exist)."""
    def pick(field):
        return None if field is None else tuple(field[i] for i in keep)

    rewards = None
    if groups.rewards is not None:
        rows = groups.rewards.view(len(groups.examples), -1) if groups.examples else groups.rewards.view(0, 1)
        rewards = rows[list(keep)].reshape(-1)
    return dataclasses.replace(groups, examples=pick(groups.examples), completions=pick(groups.completions),
                               rollout_logprobs=pick(groups.rollout_logprobs), truncated=pick(groups.truncated),
                               spread_values=pick(groups.spread_values), rewards=rewards)


def uniform_groups(groups: Groups) -> list[bool]:
    """Per group: whether its G values of `spread_values` (its total rewards when unset) are all equal. On the
    total reward, such a group's advantages are all zero and it trains nothing; on a component such as
    `accuracy`, it is DAPO's test (every answer right, or every one wrong). Every group of a batch none of
    whose rewards could be computed counts as uniform."""
    if not groups.weight or not groups.examples:
        return [True] * len(groups.examples)
    if groups.spread_values is not None:
        return [all(v == values[0] for v in values) for values in groups.spread_values]
    rows = groups.rewards.view(len(groups.examples), -1)
    return (rows == rows[:, :1]).all(dim=1).tolist()


def regroup(pool: list[Groups], micro_batches: int, want: int, filler: Groups) -> list[Groups]:
    """Dynamic sampling's step: the first `want` groups of `pool` in `micro_batches` batches of nearly equal
    size. A batch left with no group is `filler` at weight 0, so every process still runs every pass."""
    parts = [(g, i) for g in pool for i in range(len(g.examples))][:want]
    out, start = [], 0
    for m in range(micro_batches):
        size = len(parts) // micro_batches + (m < len(parts) % micro_batches)
        chunk, start = parts[start:start + size], start + size
        if not chunk:
            out.append(dataclasses.replace(filler, weight=0.0))
            continue
        pieces = [select_groups(g, [i]) for g, i in chunk]
        out.append(dataclasses.replace(
            pieces[0], **{f: _concat([getattr(p, f) for p in pieces])
                          for f in ("examples", "completions", "rollout_logprobs", "truncated", "spread_values",
                                    "rewards")}))
    return out


def _concat(values):
    if values[0] is None:
        return None
    return torch.cat(values) if isinstance(values[0], torch.Tensor) else sum(values, ())


def without_truncated(groups: Groups) -> Groups:
    """The batch without the completions that hit the length limit (`--grpo.mask_truncated`, DAPO's
    overlong filtering): they take no part in the loss, after they took part in their group's advantages.
    When none is left, the batch stays whole at weight 0 (a zero loss, the same passes)."""
    if not groups.weight or not any(t for group in groups.truncated for t in group):
        return groups
    rows, examples, completions, logprobs, flags = [], [], [], [], []
    start = 0
    for p, group in enumerate(groups.completions):
        kept = [k for k, t in enumerate(groups.truncated[p]) if not t]
        rows += [start + k for k in kept]
        start += len(group)
        if kept:
            examples.append(groups.examples[p])
            completions.append(tuple(group[k] for k in kept))
            logprobs.append(tuple(groups.rollout_logprobs[p][k] for k in kept) if groups.rollout_logprobs else None)
            flags.append(tuple(False for _ in kept))
    if not rows:
        return dataclasses.replace(groups, advantages=groups.advantages * 0, weight=0.0)
    index = torch.tensor(rows)
    return dataclasses.replace(
        groups, examples=tuple(examples), completions=tuple(completions), truncated=tuple(flags), spread_values=None,
        rollout_logprobs=tuple(logprobs) if groups.rollout_logprobs else None,
        rewards=groups.rewards[index], advantages=groups.advantages[index])


def with_advantages(groups: Groups, grpo_cfg, batch_std: torch.Tensor | None = None) -> Groups:
    """Group-relative advantages; `batch_std` is the std over every process's rewards for scale_rewards batch."""
    adv = group_advantages(groups.rewards, grpo_cfg.num_generations, grpo_cfg.scale_rewards, batch_std)
    return dataclasses.replace(groups, advantages=adv * groups.weight)


def completion_logprobs(model, groups: Groups, fwd: ForwardOptions, *, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) of every completion token under `model`, detached (π_old, π_ref)."""
    with torch.no_grad():
        hidden, targets, _ = fwd.hidden(model, groups.inputs, groups.completions)
        return fwd.head(model, hidden, token_logprobs, targets=targets, temperature=temperature)


def with_logprobs(groups: Groups, grpo_cfg, fwd: ForwardOptions, *, old=None, ref=None) -> Groups:
    """The batch with π_old's log-probs (pass the policy when μ > 1) and π_ref's (when β > 0), at the
    sampling temperature as the policy loss takes its own: the first ratio is then exactly 1 and the KL
    compares like with like."""
    temperature = grpo_cfg.temperature
    return dataclasses.replace(
        groups,
        old_logprobs=None if old is None else completion_logprobs(old, groups, fwd, temperature=temperature),
        ref_logprobs=None if ref is None else completion_logprobs(ref, groups, fwd, temperature=temperature))


def policy_loss(model, groups: Groups, grpo_cfg, fwd: ForwardOptions, *, normalizer=None, scale: float = 1.0):
    """The clipped, KL-regularised GRPO loss of the batch under the current policy, times `scale` (the
    trainer's correction for how DeepSpeed averages); (loss, detached stats kl / clip_ratio / entropy, and
    with the rollout engine's log-probs `logprob_gap/*` (see `logprob_gap`) and, with TIS, tis_weight)."""
    hidden, targets, cu = fwd.hidden(model, groups.inputs, groups.completions)
    rollout_logprobs = None
    if groups.rollout_logprobs is not None:
        rollout_logprobs = torch.cat([lp for group in groups.rollout_logprobs for lp in group]).to(hidden.device)
    loss, stats = fwd.head(
        model, hidden, _loss_and_gap, targets=targets, cu_seqlens=cu, advantages=groups.advantages.to(hidden.device),
        old_logprobs=groups.old_logprobs, ref_logprobs=groups.ref_logprobs, rollout_logprobs=rollout_logprobs,
        tis_cap=grpo_cfg.tis_cap, beta=grpo_cfg.beta, epsilon_low=grpo_cfg.epsilon_low,
        epsilon_high=grpo_cfg.epsilon_high, delta=grpo_cfg.delta, temperature=grpo_cfg.temperature,
        loss_type=grpo_cfg.loss_type, max_completion_length=grpo_cfg.max_completion_length, normalizer=normalizer,
        importance_sampling_level=grpo_cfg.importance_sampling_level)
    return loss * (scale * groups.weight), stats


def _loss_and_gap(hidden, weight, *, targets, temperature, backend, check_values, rollout_logprobs, tis_cap,
                  old_logprobs, **loss_kw):
    """`vcr1_kernels.grpo_loss` (token log-probs, then the loss on them), which also measures the rollout
    engine's log-probs against the trainer's π_old (the old log-probs when given, else these) and, with
    `tis_cap`, weighs each token by their ratio (truncated importance sampling)."""
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=temperature, return_entropy=True,
                                   backend=backend, check_values=check_values)
    tis = dict(rollout_logprobs=rollout_logprobs, tis_cap=tis_cap) if tis_cap is not None else {}
    loss, stats = grpo_loss_from_logprobs(logp, old_logprobs=old_logprobs, entropy=entropy,
                                          check_values=check_values, **tis, **loss_kw)
    if rollout_logprobs is not None and rollout_logprobs.numel():
        stats.update(logprob_gap(logp.detach() if old_logprobs is None else old_logprobs, rollout_logprobs))
    return loss, stats


def logprob_gap(trainer: torch.Tensor, rollout: torch.Tensor) -> dict:
    """How far the rollout engine's log-probs of the sampled tokens are from the trainer's: the mean and the
    largest absolute difference, and the k3 estimate of KL(rollout || trainer) on the rollout's samples."""
    diff = trainer.float() - rollout.float()
    return {"logprob_gap/mean_abs": diff.abs().mean(), "logprob_gap/max": diff.abs().max(),
            "logprob_gap/kl": (diff.exp() - diff - 1).mean()}
