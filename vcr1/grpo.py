"""The GRPO algorithm, one function per stage of a step, each taking and returning an immutable batch:

    rollout_groups -> score_groups -> with_advantages -> with_logprobs -> policy_loss

A `Groups` is one micro-batch: prompts (each with its decoded video) and G sampled completions per
prompt, later their rewards, advantages and the π_old / π_ref log-probs of every completion token.
The optimizer, processes and checkpoints are the trainer's (vcr1/train.py); the two quantities that are
global by definition - the batch std of `scale_rewards: batch` and dapo's token count - come in as
arguments.

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
from vcr1_kernels import grpo_loss, token_logprobs

log = logging.getLogger("vcr1")


@dataclass(frozen=True)
class Groups:
    """One micro-batch of GRPO groups. Row order everywhere: group by group, G completions each."""
    examples: tuple  # vcr1.data.dataset.Example per prompt
    completions: tuple  # per prompt: a tuple of G 1-D token tensors
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


def rollout_groups(model, examples: list, g, *, stop_ids: list[int], seed: int, fast: bool = True) -> Groups:
    """G sampled completions per prompt (`g`: the GRPO config). The caller provides full weights."""
    generate = rollout.generate if fast else rollout.hf_generate
    model.eval()
    with torch.no_grad():
        out = generate(model, [ex.inputs for ex in examples], num_samples=g.num_generations,
                       max_new_tokens=g.max_completion_length, temperature=g.temperature, top_k=g.top_k,
                       top_p=g.top_p, eos_token_id=stop_ids, seed=seed)
    model.train()
    return Groups(tuple(examples), tuple(tuple(c.token_ids.cpu() for c in group) for group in out))


def score_groups(groups: Groups, tokenizer, g, *, think: bool) -> Scored:
    """Rule-based rewards of every completion. A group whose reward throws (a bug, or a solution that got
    past validation) is left out of the loss and counted; when none is left the micro-batch keeps all
    its groups at weight 0, so this process still runs the same passes as the others."""
    keep, rewards, components, samples = [], [], {}, []
    for i, (ex, group) in enumerate(zip(groups.examples, groups.completions)):
        task = ex.sample.task
        try:
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in group]
            parts = [get_task(task).rewards(t, ex.sample.solution, think) for t in texts]
        except Exception as e:  # a reward must not end the run
            log.warning("reward failed on %s: %r; group left out of the loss", ex.sample.uid, e)
            continue
        totals = [total_reward(p, g.reward_weights) for p in parts]
        keep.append(i)
        rewards += totals
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
    kept = Groups(tuple(groups.examples[i] for i in keep), tuple(groups.completions[i] for i in keep),
                  rewards=torch.tensor(rewards, dtype=torch.float32))
    return Scored(kept, components, failed, samples)


def with_advantages(groups: Groups, g, batch_std: torch.Tensor | None = None) -> Groups:
    """Group-relative advantages; `batch_std` is the std over every process's rewards for scale_rewards batch."""
    adv = group_advantages(groups.rewards, g.num_generations, g.scale_rewards, batch_std)
    return dataclasses.replace(groups, advantages=adv * groups.weight)


def completion_logprobs(model, groups: Groups, *, temperature: float, shared_prefix: bool, backend: str,
                        check_values: bool = True) -> torch.Tensor:
    """log softmax(logits / temperature) of every completion token under `model`, detached (π_old, π_ref)."""
    with torch.no_grad():
        hidden, targets, _ = completion_hidden(model, groups.inputs, groups.completions, shared_prefix=shared_prefix)
        return model.lm_head(hidden, fn=token_logprobs, targets=targets, temperature=temperature, backend=backend,
                             check_values=check_values)


def with_logprobs(groups: Groups, g, *, old=None, ref=None, shared_prefix: bool, backend: str,
                  check_values: bool = True) -> Groups:
    """The batch with π_old's log-probs (pass the policy when μ > 1) and π_ref's (when β > 0), at the
    sampling temperature as the policy loss takes its own: the first ratio is then exactly 1 and the KL
    compares like with like."""
    kw = dict(temperature=g.temperature, shared_prefix=shared_prefix, backend=backend, check_values=check_values)
    return dataclasses.replace(
        groups,
        old_logprobs=None if old is None else completion_logprobs(old, groups, **kw),
        ref_logprobs=None if ref is None else completion_logprobs(ref, groups, **kw))


def policy_loss(model, groups: Groups, g, *, shared_prefix: bool, backend: str, normalizer=None,
                scale: float = 1.0, check_values: bool = True):
    """The clipped, KL-regularised GRPO loss of the batch under the current policy, times `scale` (the
    trainer's correction for how DeepSpeed averages); (loss, detached stats kl / clip_ratio / entropy)."""
    hidden, targets, cu = completion_hidden(model, groups.inputs, groups.completions, shared_prefix=shared_prefix)
    loss, stats = model.lm_head(
        hidden, fn=grpo_loss, targets=targets, cu_seqlens=cu, advantages=groups.advantages.to(hidden.device),
        old_logprobs=groups.old_logprobs, ref_logprobs=groups.ref_logprobs, beta=g.beta,
        epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, delta=g.delta, temperature=g.temperature,
        loss_type=g.loss_type, max_completion_length=g.max_completion_length, normalizer=normalizer,
        backend=backend, check_values=check_values)
    return loss * (scale * groups.weight), stats
