"""Fused LM-head kernels: token log-probs and the GRPO loss without [N, vocab] logits."""
from .grpo import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, grpo_loss, grpo_loss_from_logprobs
from .logprobs import DEFAULT_MAX_EXTRA_BYTES, LM_HEAD_BACKENDS, LOGITS_MODES, lm_head_slab, token_logprobs
from .reference import token_logprobs_reference

__all__ = [
    "DEFAULT_MAX_EXTRA_BYTES", "IMPORTANCE_SAMPLING_LEVELS", "LM_HEAD_BACKENDS", "LOGITS_MODES", "LOSS_TYPES",
    "grpo_loss",
    "grpo_loss_from_logprobs", "lm_head_slab", "token_logprobs", "token_logprobs_reference",
]
