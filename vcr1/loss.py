"""Group-relative advantages and the supervised warm-up loss. The GRPO loss itself is
`vcr1_kernels.grpo_loss` (its "torch" backend is the plain reference)."""
from __future__ import annotations

import torch

ADV_EPS = 1e-4  # the paper's: A = (r - mean) / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """Advantages of rewards laid out group by group ([B·G]), with TRL's `scale_rewards`.

    group: divide by each group's unbiased std; batch: by the std of the whole (global) batch, which the
    caller passes when rewards are split across processes; none: centre only (Dr. GRPO).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + ADV_EPS)
    elif scale == "batch":
        std = rewards.float().std() if batch_std is None else batch_std
        centred = centred / (std + ADV_EPS)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale!r}")
    return centred.reshape(-1)


def sft_loss(logp: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood: token mean within each answer, then mean over answers."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=logp.device), lengths)
    per_seq = torch.zeros(len(lengths), device=logp.device).index_add_(0, seq, logp.float())
    return -(per_seq / lengths.clamp(min=1)).mean()
