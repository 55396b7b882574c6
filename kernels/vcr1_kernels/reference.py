"""Plain PyTorch token log-probs: the `backend="torch"` path and the yardstick for the Triton kernels.

Deliberately naive: it materialises the [N, V] logits in fp32 and lets autograd do the rest.
"""
import torch


def token_logprobs_reference(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """log softmax(hidden @ weight.T / temperature)[i, targets[i]] in fp32, optionally with the entropy."""
    logits = hidden.float() @ weight.float().T / temperature
    logprobs = logits.log_softmax(dim=-1)
    logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    with torch.no_grad():  # entropy is a diagnostic: no graph, so no second [N, V] buffer kept alive
        entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return logp, entropy
