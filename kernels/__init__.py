"""Fused LM-head kernels: token log-probs and the GRPO loss without [N, vocab] logits."""
from .grpo import LOSS_TYPES, grpo_loss
from .logprobs import BACKENDS, token_logprobs
from .reference import token_logprobs_reference

__all__ = ["BACKENDS", "LOSS_TYPES", "grpo_loss", "token_logprobs", "token_logprobs_reference"]
