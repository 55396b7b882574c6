"""Token log-probs of an LM head without [N, V] logits: Triton forward and recomputing backward.

Forward: each program takes BLOCK_N rows and one contiguous split of the vocabulary, computes logit
tiles on chip and keeps an online log-sum-exp (plus the target logit and, for the entropy, sum p*z).
The per-split partials ([splits, N], splits bounded by the GPU size) are merged in PyTorch.
Backward: each program recomputes one [BLOCK_N, BLOCK_V] logit tile, forms
dlogits = g * (onehot - softmax) / T and atomically adds its share of d_hidden and d_weight (fp32).
"""
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .reference import token_logprobs_reference

LM_HEAD_BACKENDS = ("auto", "triton", "torch")


def interpreter_active():
    """True when Triton runs kernels in its CPU interpreter: TRITON_INTERPRET=1 was set before triton
    (whose own helpers such as tl.max are kernels too) was first imported."""
    return isinstance(tl.max, InterpretedFunction)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED:  # the interpreter multiplies 16-bit floats as raw integers; their fp32 products are exact
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask, dim,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """hidden[rows] @ weight[cols].T as an fp32 [BLOCK_N, BLOCK_V] tile."""
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * dim + ks[None, :]
    w_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * dim + ks[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, dim, BLOCK_K):
        k_mask = (k + ks) < dim
        h = tl.load(h_ptrs + k, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _dot(h, tl.trans(w), acc, DOT_PRECISION, INTERPRETED)
    return acc


@triton.jit
def _forward_kernel(hidden_ptr, weight_ptr, targets_ptr, part_max_ptr, part_sum_ptr, part_dot_ptr,
                    target_logit_ptr, n_rows, vocab, dim, tiles_per_split,
                    INV_T: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    INTERPRETED: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(vocab, BLOCK_V))
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(first_tile, last_tile):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < vocab
        z = _logit_tile(hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask, dim,
                        BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, INTERPRETED) * INV_T
        # Padded vocab columns must not reach the log-sum-exp (exp(0) = 1 each otherwise).
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        if ENTROPY:
            run_dot = run_dot * rescale + tl.sum(p * tl.where(col_mask[None, :], z, 0.0), axis=1)
        run_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)

    part = split * n_rows + rows
    tl.store(part_max_ptr + part, run_max, mask=row_mask)
    tl.store(part_sum_ptr + part, run_sum, mask=row_mask)
    if ENTROPY:
        tl.store(part_dot_ptr + part, run_dot, mask=row_mask)
    # Exactly one split holds each row's target, so exactly one program writes it.
    owns_target = (targets >= first_tile * BLOCK_V) & (targets < last_tile * BLOCK_V)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_mask & owns_target)


@triton.jit
def _backward_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, grad_ptr, d_hidden_ptr, d_weight_ptr,
                     n_rows, vocab, dim,
                     INV_T: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    # Grouped launch order: programs running together share a few row tiles and many vocab tiles,
    # which keeps their operands in L2 and spreads the atomics over many addresses.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(n_rows, BLOCK_N)
    tiles_per_group = GROUP_N * tl.cdiv(vocab, BLOCK_V)
    first_n = (pid // tiles_per_group) * GROUP_N
    group_rows = tl.minimum(tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % tiles_per_group) % group_rows
    pid_v = (pid % tiles_per_group) // group_rows

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    col_mask = cols < vocab
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)

    z = _logit_tile(hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask, dim,
                    BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, INTERPRETED) * INV_T
    probs = tl.where(col_mask[None, :], tl.exp(z - lse[:, None]), 0.0)
    onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
    d_logits = ((onehot - probs) * (grad * INV_T)[:, None]).to(hidden_ptr.dtype.element_ty)

    ks = tl.arange(0, BLOCK_K)
    row_offs = rows.to(tl.int64)[:, None] * dim + ks[None, :]
    col_offs = cols.to(tl.int64)[:, None] * dim + ks[None, :]
    for k in range(0, dim, BLOCK_K):
        k_mask = (k + ks) < dim
        row_k_mask = row_mask[:, None] & k_mask[None, :]
        col_k_mask = col_mask[:, None] & k_mask[None, :]
        if COMPUTE_DH:
            w = tl.load(weight_ptr + col_offs + k, mask=col_k_mask, other=0.0)
            d_h = _dot(d_logits, w, None, DOT_PRECISION, INTERPRETED)
            tl.atomic_add(d_hidden_ptr + row_offs + k, d_h, mask=row_k_mask, sem="relaxed")
        if COMPUTE_DW:
            h = tl.load(hidden_ptr + row_offs + k, mask=row_k_mask, other=0.0)
            d_w = _dot(tl.trans(d_logits), h, None, DOT_PRECISION, INTERPRETED)
            tl.atomic_add(d_weight_ptr + col_offs + k, d_w, mask=col_k_mask, sem="relaxed")


def _launch_options(hidden):
    """Tile sizes and compile options shared by both kernels. The GPU tiles are sensible, not tuned."""
    if not hidden.is_cuda:  # interpreter: few, large programs
        tiles = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=32, num_warps=1, num_stages=1)
    elif hidden.dtype == torch.float32:  # exact fp32 dots: smaller tiles to fit in shared memory
        tiles = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=2)
    else:
        tiles = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)
    # fp32 inputs must not silently become tf32 dots; the precision is ignored for 16-bit inputs.
    precision = "ieee" if hidden.dtype == torch.float32 else None
    return dict(tiles, DOT_PRECISION=precision, INTERPRETED=interpreter_active())


def _forward_programs(hidden):
    """Forward programs to aim for when splitting the vocabulary: enough to fill the GPU (on the
    interpreter, just enough to exercise the merge of several splits)."""
    if not hidden.is_cuda:
        return 4
    return 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count


def _forward(hidden, weight, targets, temperature, with_entropy):
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    options = _launch_options(hidden)
    tiles_n = triton.cdiv(n_rows, options["BLOCK_N"])
    tiles_v = triton.cdiv(vocab, options["BLOCK_V"])
    tiles_per_split = triton.cdiv(tiles_v, min(tiles_v, triton.cdiv(_forward_programs(hidden), tiles_n)))
    splits = triton.cdiv(tiles_v, tiles_per_split)  # every split non-empty, so every partial is written

    partials = torch.empty(3 if with_entropy else 2, splits, n_rows, device=hidden.device, dtype=torch.float32)
    target_logit = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    _forward_kernel[(tiles_n, splits)](
        hidden, weight, targets, partials[0], partials[1], partials[-1], target_logit,
        n_rows, vocab, dim, tiles_per_split,
        INV_T=1.0 / temperature, ENTROPY=with_entropy, **options,
    )
    run_max = partials[0].amax(dim=0)
    scale = torch.exp(partials[0] - run_max)
    sum_exp = (partials[1] * scale).sum(dim=0)
    lse = run_max + sum_exp.log()
    entropy = lse - (partials[2] * scale).sum(dim=0) / sum_exp if with_entropy else None
    return target_logit - lse, lse, entropy


def _backward(hidden, weight, targets, lse, grad, temperature, need_d_hidden, need_d_weight):
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    options = _launch_options(hidden)
    # fp32 accumulators: atomics need zeros, and bf16 accumulation across tiles drifts.
    d_hidden = torch.zeros(n_rows, dim, device=hidden.device, dtype=torch.float32) if need_d_hidden else None
    d_weight = torch.zeros(vocab, dim, device=weight.device, dtype=torch.float32) if need_d_weight else None
    grid = (triton.cdiv(n_rows, options["BLOCK_N"]) * triton.cdiv(vocab, options["BLOCK_V"]),)
    _backward_kernel[grid](
        hidden, weight, targets, lse, grad,
        d_hidden if need_d_hidden else lse, d_weight if need_d_weight else lse,  # unused when not needed
        n_rows, vocab, dim,
        INV_T=1.0 / temperature, COMPUTE_DH=need_d_hidden, COMPUTE_DW=need_d_weight, GROUP_N=8, **options,
    )
    return (d_hidden.to(hidden.dtype) if need_d_hidden else None,
            d_weight.to(weight.dtype) if need_d_weight else None)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy):
        logp, lse, entropy = _forward(hidden, weight, targets, temperature, with_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature = temperature
        if entropy is None:
            return logp
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, *_grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        d_hidden, d_weight = _backward(hidden, weight, targets, lse, grad_logp.float().contiguous(),
                                       ctx.temperature, *ctx.needs_input_grad[:2])
        return d_hidden, d_weight, None, None, None


def _validate(hidden, weight, targets, temperature, backend, check_values):
    if backend not in LM_HEAD_BACKENDS:
        raise ValueError(f"backend must be one of {LM_HEAD_BACKENDS}, got {backend!r}")
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError("hidden has no rows")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64, got {targets.dtype}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16) or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share one of fp32, bf16, fp16; got {hidden.dtype} and "
                        f"{weight.dtype}")
    if not hidden.device == weight.device == targets.device:
        raise ValueError("hidden, weight and targets must be on one device")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if backend == "triton" and not hidden.is_cuda and not interpreter_active():
        raise ValueError("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                         "imported to run on CPU")
    # A host sync, but an out-of-range target would otherwise give a silently wrong log-prob.
    if check_values and ((targets < 0) | (targets >= weight.shape[0])).any():
        raise ValueError(f"targets must lie in [0, {weight.shape[0]})")


def token_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False, backend="auto",
                   check_values=True):
    """log softmax(hidden @ weight.T / temperature) at `targets`, as fp32 [N] (and the entropy [N]).

    hidden [N, H] and weight [V, H] share a float dtype; targets [N] int64. Differentiable in hidden
    and weight (no weight gradient is computed when weight.requires_grad is False); the entropy is a
    detached diagnostic. backend "triton" never forms [N, V]; "torch" is the plain reference; "auto"
    picks Triton on CUDA. check_values=False skips the one check that reads tensor values (targets in
    range), a host sync; shapes, dtypes and devices are always checked.
    """
    _validate(hidden, weight, targets, temperature, backend, check_values)
    if backend == "torch" or (backend == "auto" and not hidden.is_cuda):
        return token_logprobs_reference(hidden, weight, targets, temperature, return_entropy)
    return _TokenLogprobs.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                float(temperature), return_entropy)
