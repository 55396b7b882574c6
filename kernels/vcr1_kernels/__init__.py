"""Fused LM-head kernels: token log-probs and the GRPO loss without [N, vocab] logits."""
from .grpo import LOSS_TYPES, grpo_loss, grpo_loss_from_logprobs
from .logprobs import LM_HEAD_BACKENDS, token_logprobs
from .reference import token_logprobs_reference

__all__ = [
    "LM_HEAD_BACKENDS", "LOSS_TYPES", "grpo_loss", "grpo_loss_from_logprobs", "token_logprobs",
    "token_logprobs_reference",
]
