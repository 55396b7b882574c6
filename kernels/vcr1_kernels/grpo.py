"""Clipped GRPO loss (TRL's definitions) on top of the fused token log-probs.

The [N, V] work is `token_logprobs`; everything here is elementwise on [N] fp32 vectors (plus per-sequence
means taken from cumulative sums), so autograd hands each token's dLoss/dlogp to the recomputing Triton
backward and nothing [N, V] is ever kept.
"""
import torch

from .logprobs import DEFAULT_MAX_EXTRA_BYTES, token_logprobs

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
MAX_LOG_RATIO = 20.0  # clamp log-ratios before exp, as verl does: exp(20) is large but finite in fp32
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")  # the ratio r: per token (GRPO) or per sequence (GSPO)


def grpo_loss(hidden, weight, targets, cu_seqlens, advantages, old_logprobs=None, ref_logprobs=None, *,
              beta=0.04, epsilon_low=0.2, epsilon_high=0.2, delta=None, temperature=1.0, loss_type="grpo",
              max_completion_length=None, normalizer=None, importance_sampling_level="token",
              rollout_logprobs=None, tis_cap=None, backend="auto", check_values=True, logits="matmul",
              max_extra_bytes=DEFAULT_MAX_EXTRA_BYTES):
    """GRPO loss of B packed completions and detached stats ("kl", "clip_ratio", "entropy", and
    "tis_weight" when TIS is on).

    hidden [N, H] holds the completion tokens of B sequences back to back, split by cu_seqlens [B+1];
    advantages [B] are per sequence; old/ref log-probs [N]. old_logprobs=None means on-policy
    (ratio = exp(logp - logp.detach())); ref_logprobs=None drops the KL term. Per token:
    -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * k3, with r first capped at delta
    when set. Aggregation: grpo = mean over sequences of token means; bnpo = token mean;
    dr_grpo = sum / (B * max_completion_length); dapo = sum / normalizer (default: N tokens; pass
    the global token count when the batch is split over micro-batches or processes).

    importance_sampling_level="sequence" (GSPO, Zheng et al. 2025, arXiv 2507.18071) replaces r on every
    token of sequence i by s_i = exp(mean over its tokens of (logp - old)), the mean clamped to
    ±MAX_LOG_RATIO, with the gradient flowing through the mean (TRL's definition); delta caps s_i as it
    caps r; the KL term and the aggregation stay per token. "clip_ratio" then counts the TOKENS whose
    sequence's s_i is clipped on the side that matters (s_i < 1 - eps_low with A < 0, or
    s_i > 1 + eps_high with A > 0), as a fraction of all tokens.

    rollout_logprobs [N] (the rollout engine's log-probs of the sampled tokens) with tis_cap C > 0 turn on
    truncated importance sampling (TIS, Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): each token's clipped term (not the KL) is multiplied by the detached weight
    w = min(exp(old - rollout), C), old being logp detached when old_logprobs is None; this corrects for
    the engine sampling from a slightly different distribution than the trainer computes.
    Old and rollout log-probs are constants: no gradient flows into them.

    check_values=False skips the checks that read tensor values (host syncs); logits and
    max_extra_bytes pick how the Triton head runs; see token_logprobs.
    """
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=temperature, return_entropy=True,
                                   backend=backend, check_values=check_values, logits=logits,
                                   max_extra_bytes=max_extra_bytes)
    return grpo_loss_from_logprobs(logp, cu_seqlens, advantages, old_logprobs, ref_logprobs, entropy=entropy,
                                   beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                                   loss_type=loss_type, max_completion_length=max_completion_length,
                                   normalizer=normalizer, importance_sampling_level=importance_sampling_level,
                                   rollout_logprobs=rollout_logprobs, tis_cap=tis_cap, check_values=check_values)


def grpo_loss_from_logprobs(logp, cu_seqlens, advantages, old_logprobs=None, ref_logprobs=None, *, entropy=None,
                            beta=0.04, epsilon_low=0.2, epsilon_high=0.2, delta=None, loss_type="grpo",
                            max_completion_length=None, normalizer=None, importance_sampling_level="token",
                            rollout_logprobs=None, tis_cap=None, check_values=True):
    """`grpo_loss` from per-token log-probs logp [N] already computed (stats get "entropy" only when
    the per-token entropy is given)."""
    _validate(logp.shape[0], cu_seqlens, advantages, old_logprobs, ref_logprobs, epsilon_low, epsilon_high,
              delta, loss_type, max_completion_length, normalizer, check_values)
    _validate_options(logp.shape[0], importance_sampling_level, rollout_logprobs, tis_cap)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n_seqs, n_tokens = lengths.numel(), logp.shape[0]
    adv = torch.repeat_interleave(advantages.float(), lengths, output_size=n_tokens)

    old = logp.detach() if old_logprobs is None else old_logprobs.detach().float()
    log_ratio = logp - old
    if importance_sampling_level == "sequence":  # each token takes its sequence's mean log-ratio
        log_ratio = _SequenceMean.apply(log_ratio, cu_seqlens, lengths)
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    capped = ratio if delta is None else ratio.clamp(max=delta)
    per_token = -torch.minimum(capped * adv, clipped * adv)
    if rollout_logprobs is not None:  # TIS: weigh the clipped term (not the KL) by min(π_old / π_rollout, C)
        tis_weight = torch.exp(old - rollout_logprobs.detach().float()).clamp(max=tis_cap)
        per_token = per_token * tis_weight

    kl = torch.zeros_like(logp)
    if ref_logprobs is not None:
        log_ref_ratio = (ref_logprobs.float() - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        if beta != 0:
            per_token = per_token + beta * kl

    if loss_type == "grpo":
        token_weight = 1.0 / (n_seqs * lengths.clamp(min=1))
        loss = (per_token * torch.repeat_interleave(token_weight, lengths, output_size=n_tokens)).sum()
    elif loss_type == "bnpo":
        loss = per_token.sum() / n_tokens
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (n_seqs * max_completion_length)
    else:
        loss = per_token.sum() / (n_tokens if normalizer is None else normalizer)

    is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    stats = {"kl": kl.mean().detach(), "clip_ratio": is_clipped.float().mean()}
    if entropy is not None:
        stats["entropy"] = entropy.detach().mean()
    if rollout_logprobs is not None:
        stats["tis_weight"] = tis_weight.mean()
    return loss, stats


def _sequence_mean(x, cu_seqlens, lengths):
    """Each token's value replaced by the mean of its sequence's values (0 for an empty sequence), from
    fp64 cumulative sums read at the sequence bounds: a fixed summation order (no scattered adds)."""
    sums = torch.nn.functional.pad(x.double().cumsum(0), (1, 0))
    cu = cu_seqlens.long()
    means = ((sums[cu[1:]] - sums[cu[:-1]]) / lengths.clamp(min=1)).to(x.dtype)
    return torch.repeat_interleave(means, lengths, output_size=x.shape[0])


class _SequenceMean(torch.autograd.Function):
    """`_sequence_mean` with autograd. The map is symmetric (token t and u of sequence i are coupled by
    1 / L_i both ways), so its backward is the same map on the incoming gradient; autograd's own
    backward of repeat_interleave would be an index_add, whose order differs from run to run on CUDA."""

    @staticmethod
    def forward(ctx, x, cu_seqlens, lengths):
        ctx.save_for_backward(cu_seqlens, lengths)
        return _sequence_mean(x, cu_seqlens, lengths)

    @staticmethod
    def backward(ctx, grad):
        cu_seqlens, lengths = ctx.saved_tensors
        return _sequence_mean(grad, cu_seqlens, lengths), None, None


def _validate_options(n_tokens, importance_sampling_level, rollout_logprobs, tis_cap):
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got "
                         f"{importance_sampling_level!r}")
    if (rollout_logprobs is None) != (tis_cap is None):
        raise ValueError("truncated importance sampling needs both rollout_logprobs and tis_cap (or neither)")
    if tis_cap is not None and (isinstance(tis_cap, bool) or not isinstance(tis_cap, (int, float))
                                or not tis_cap > 0):
        raise ValueError(f"tis_cap must be a positive number, got {tis_cap!r}")
    if rollout_logprobs is not None and (rollout_logprobs.shape != (n_tokens,)
                                         or not rollout_logprobs.is_floating_point()):
        raise ValueError(f"rollout_logprobs must be float [{n_tokens}], got {rollout_logprobs.dtype} "
                         f"{tuple(rollout_logprobs.shape)}")


def _validate(n_tokens, cu_seqlens, advantages, old_logprobs, ref_logprobs, epsilon_low, epsilon_high, delta,
              loss_type, max_completion_length, normalizer, check_values):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "dr_grpo" and not (isinstance(max_completion_length, int) and max_completion_length > 0):
        raise ValueError("loss_type 'dr_grpo' needs a positive integer max_completion_length")
    if normalizer is not None and loss_type != "dapo":
        raise ValueError(f"normalizer only applies to loss_type 'dapo', not {loss_type!r}")
    if check_values and normalizer is not None and not torch.all(torch.as_tensor(normalizer) > 0):
        raise ValueError(f"normalizer must be positive, got {normalizer!r}")
    if not 0 <= epsilon_low < 1 or epsilon_high < 0:
        raise ValueError(f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {epsilon_low}, {epsilon_high}")
    if delta is not None and delta <= 0:
        raise ValueError(f"delta must be positive, got {delta}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [B+1], got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if check_values and bool((cu_seqlens[0] != 0) | (cu_seqlens[-1] != n_tokens) | (cu_seqlens.diff() < 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the {n_tokens} tokens, got {cu_seqlens.tolist()}")
    if advantages.shape != (cu_seqlens.numel() - 1,) or not advantages.is_floating_point():
        raise ValueError(f"advantages must be float [{cu_seqlens.numel() - 1}] (one per sequence), got "
                         f"{advantages.dtype} {tuple(advantages.shape)}")
    for name, logprobs in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if logprobs is not None and (logprobs.shape != (n_tokens,) or not logprobs.is_floating_point()):
            raise ValueError(f"{name} must be float [{n_tokens}], got {logprobs.dtype} {tuple(logprobs.shape)}")
