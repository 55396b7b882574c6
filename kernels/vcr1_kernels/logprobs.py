"""Token log-probs of an LM head without [N, V] logits, with a deterministic backward.

Both passes walk the vocabulary in slabs of `S` columns (S from a memory budget, see `lm_head_slab`).
Who computes a slab's logits is the `logits` option:
- "matmul" (default): torch.mm with fp32 output (cuBLAS on a GPU) writes the slab's [N, S] fp32
  logits, and Triton kernels read them as an epilogue.
- "triton": the Triton kernels compute each [BLOCK_N, BLOCK_V] logit tile on chip; the forward needs
  no slab at all.

Forward: each program takes BLOCK_N rows and one split of the columns and keeps an online log-sum-exp
(plus the target logit and, for the entropy, sum p*z); the per-split partials ([parts, N]) are merged
in PyTorch. Splits vary fastest in the launch order, so the programs running together share their
hidden rows in L2 and each weight tile is read by many of them at once.
Backward, per slab: a Triton kernel writes the slab's logit gradients g * (onehot - softmax) / T in the
compute dtype, then torch.mm adds d_logits @ W_slab into an fp32 d_hidden and writes d_logits.T @ hidden
straight into that slab of d_weight, once. No program ever adds into memory another program writes, so
the gradients are bitwise reproducible (given deterministic GEMMs, which cuBLAS is on one GPU model).

Why "matmul" is the default on a GPU is a model, not a measurement (no GPU timing has been made): its
GEMMs run at the library's speed, and the slab round trips cost ~22 bytes per logit over both passes plus
12*N*H per slab for the fp32 d_hidden sums (~73 GB at the 7B head, N=16384: ~22 ms at 3.3 TB/s against
~90 ms of GEMMs); "triton" moves none of that but runs a third of the GEMM work as Triton tiles.
"""
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .reference import token_logprobs_reference

LM_HEAD_BACKENDS = ("auto", "triton", "torch")
LOGITS_MODES = ("matmul", "triton")
DEFAULT_MAX_EXTRA_BYTES = 2**30
SLAB_ALIGN = 128  # slab widths are multiples of this, so slabs hold whole GEMM tiles
SLAB_MAX_COLUMNS = 8192  # wider slabs make no GEMM faster; this keeps small-N calls far below the budget


def interpreter_active():
    """True when Triton runs kernels in its CPU interpreter: TRITON_INTERPRET=1 was set before triton
    (whose own helpers such as tl.max are kernels too) was first imported."""
    return isinstance(tl.max, InterpretedFunction)


def lm_head_slab(n_rows, dim, vocab, dtype, *, logits="matmul", need_d_hidden=True,
                 max_extra_bytes=DEFAULT_MAX_EXTRA_BYTES):
    """(S, extra): the slab width the backward uses and the bytes it holds beyond its inputs and the
    gradients it returns, on a GPU (on CPU, 16-bit operands are also upcast for the matmuls):

        extra = S * N * (e + 4 * [logits == "matmul"]) + 8 * N * H * [d_hidden needed and e < 4]

    with e the compute dtype's bytes: the slab's logit gradients (e) and fp32 logits (4) per column,
    and for 16-bit inputs an fp32 d_hidden accumulator plus the fp32 product added into it (for fp32
    inputs the accumulator is the returned gradient). S is the widest multiple of SLAB_ALIGN (or all of
    V) within max_extra_bytes, at most SLAB_MAX_COLUMNS: at N=16384, H=3584, V=152064 in bf16 the
    default 1 GiB gives S=6144 and exactly 1 GiB; at N=1024, S=8192 and 76 MiB. The forward ("matmul"
    only) holds S' * N * 4 bytes of fp32 logits, S' by the same rule without the d_hidden term, so also
    within the budget, plus O(N) partials.
    """
    elem = dtype.itemsize
    per_column = n_rows * (elem + (4 if logits == "matmul" else 0))
    fixed = 8 * n_rows * dim if need_d_hidden and elem < 4 else 0
    fit = max(max_extra_bytes - fixed, 0) // per_column
    slab = min(vocab, SLAB_MAX_COLUMNS, fit if fit >= vocab else fit // SLAB_ALIGN * SLAB_ALIGN)
    if slab == 0:
        raise ValueError(f"max_extra_bytes={max_extra_bytes} cannot hold a {min(vocab, SLAB_ALIGN)}-column slab "
                         f"for N={n_rows}, H={dim}: it needs {fixed + min(vocab, SLAB_ALIGN) * per_column}")
    return slab, fixed + slab * per_column


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED:  # the interpreter multiplies 16-bit floats as raw integers; their fp32 products are exact
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits(hidden_ptr, weight_ptr, logits_ptr, rows, cols, row_mask, col_mask, dim, col_start, width,
            LOGITS_IN_MEMORY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """hidden[rows] @ weight[cols].T as an fp32 [BLOCK_N, BLOCK_V] tile: read from the slab's [N, width]
    logits (whose first column is col_start), or computed here."""
    if LOGITS_IN_MEMORY:
        offs = rows.to(tl.int64)[:, None] * width + (cols - col_start)[None, :]
        acc = tl.load(logits_ptr + offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    else:
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
def _forward_kernel(hidden_ptr, weight_ptr, logits_ptr, targets_ptr, part_max_ptr, part_sum_ptr, part_dot_ptr,
                    target_logit_ptr, n_rows, dim, col_start, col_end, tiles_per_split, splits, first_part,
                    INV_T: tl.constexpr, ENTROPY: tl.constexpr, LOGITS_IN_MEMORY: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    # Splits vary fastest: a wave holds few row tiles, so their hidden rows stay in L2.
    pid = tl.program_id(0)
    split = pid % splits
    rows = (pid // splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

    first_col = col_start + split * tiles_per_split * BLOCK_V
    last_col = tl.minimum(first_col + tiles_per_split * BLOCK_V, col_end)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(first_col, last_col, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_mask = cols < last_col
        z = _logits(hidden_ptr, weight_ptr, logits_ptr, rows, cols, row_mask, col_mask, dim, col_start,
                    col_end - col_start, LOGITS_IN_MEMORY, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION,
                    INTERPRETED) * INV_T
        # Padded columns must not reach the log-sum-exp (exp(0) = 1 each otherwise).
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        if ENTROPY:
            run_dot = run_dot * rescale + tl.sum(p * tl.where(col_mask[None, :], z, 0.0), axis=1)
        run_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)

    part = (first_part + split) * n_rows + rows
    tl.store(part_max_ptr + part, run_max, mask=row_mask)
    tl.store(part_sum_ptr + part, run_sum, mask=row_mask)
    if ENTROPY:
        tl.store(part_dot_ptr + part, run_dot, mask=row_mask)
    # Splits and slabs tile the vocabulary, so exactly one program writes each row's target logit.
    owns_target = (targets >= first_col) & (targets < last_col)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_mask & owns_target)


@triton.jit
def _grad_kernel(hidden_ptr, weight_ptr, logits_ptr, targets_ptr, lse_ptr, grad_ptr, d_logits_ptr,
                 n_rows, dim, col_start, col_end,
                 INV_T: tl.constexpr, LOGITS_IN_MEMORY: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 INTERPRETED: tl.constexpr):
    """d_logits[:, cols - col_start] = grad * (onehot - softmax) / T for the slab [col_start, col_end)."""
    width = col_end - col_start
    pid = tl.program_id(0)
    tiles_v = tl.cdiv(width, BLOCK_V)
    rows = (pid // tiles_v) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_start + (pid % tiles_v) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    col_mask = cols < col_end
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)

    z = _logits(hidden_ptr, weight_ptr, logits_ptr, rows, cols, row_mask, col_mask, dim, col_start, width,
                LOGITS_IN_MEMORY, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, INTERPRETED) * INV_T
    probs = tl.exp(z - lse[:, None])
    onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
    d_logits = (onehot - probs) * (grad * INV_T)[:, None]
    offs = rows.to(tl.int64)[:, None] * width + (cols - col_start)[None, :]
    tl.store(d_logits_ptr + offs, d_logits.to(d_logits_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _launch_options(hidden, logits_in_memory):
    """Tile sizes and compile options. The GPU tiles are sensible, not tuned."""
    if not hidden.is_cuda:  # interpreter: few, large programs
        tiles = dict(BLOCK_N=32, BLOCK_V=128 if logits_in_memory else 64, BLOCK_K=32, num_warps=1, num_stages=1)
    elif logits_in_memory:  # elementwise over fp32 logits: small row tiles, so many programs
        tiles = dict(BLOCK_N=16, BLOCK_V=256, BLOCK_K=16, num_warps=4, num_stages=1)
    elif hidden.dtype == torch.float32:  # exact fp32 dots: smaller tiles to fit in shared memory
        tiles = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=2)
    else:
        tiles = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)
    # fp32 inputs must not silently become tf32 dots; the precision is ignored for 16-bit inputs.
    precision = "ieee" if hidden.dtype == torch.float32 else None
    return dict(tiles, LOGITS_IN_MEMORY=logits_in_memory, DOT_PRECISION=precision,
                INTERPRETED=interpreter_active())


def _forward_programs(hidden):
    """Forward programs to aim for when splitting the columns: enough to fill the GPU (on the
    interpreter, just enough to exercise the merge of several splits)."""
    if not hidden.is_cuda:
        return 4
    return 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count


def _mm_f32(a, b, out):
    """out = a @ b in fp32, from fp32 or 16-bit operands (fp32 accumulation either way)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)  # CPU torch has no 16-bit mm with fp32 output


def _slabs(vocab, slab):
    return [(start, min(start + slab, vocab)) for start in range(0, vocab, slab)]


def _forward(hidden, weight, targets, temperature, with_entropy, logits, max_extra_bytes):
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    in_memory = logits == "matmul"
    options = _launch_options(hidden, in_memory)
    tiles_n = triton.cdiv(n_rows, options["BLOCK_N"])
    if in_memory:
        slab, _ = lm_head_slab(n_rows, dim, vocab, hidden.dtype, need_d_hidden=False,
                               max_extra_bytes=max_extra_bytes)
        slabs = _slabs(vocab, slab)
        logits_buffer = torch.empty(n_rows * slab, device=hidden.device, dtype=torch.float32)
    else:
        slabs = [(0, vocab)]
    plan = []  # (first column, end column, tiles per split, splits)
    for col_start, col_end in slabs:
        tiles_v = triton.cdiv(col_end - col_start, options["BLOCK_V"])
        per_split = triton.cdiv(tiles_v, min(tiles_v, triton.cdiv(_forward_programs(hidden), tiles_n)))
        plan.append((col_start, col_end, per_split, triton.cdiv(tiles_v, per_split)))  # no split is empty

    parts = sum(splits for *_, splits in plan)
    partials = torch.empty(3 if with_entropy else 2, parts, n_rows, device=hidden.device, dtype=torch.float32)
    target_logit = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    first_part = 0
    for col_start, col_end, per_split, splits in plan:
        slab_logits = hidden  # an unread placeholder when the kernel computes its own tiles
        if in_memory:
            slab_logits = _mm_f32(hidden, weight[col_start:col_end].T,
                                  logits_buffer[:n_rows * (col_end - col_start)].view(n_rows, -1))
        _forward_kernel[(tiles_n * splits,)](
            hidden, weight, slab_logits, targets, partials[0], partials[1], partials[-1], target_logit,
            n_rows, dim, col_start, col_end, per_split, splits, first_part,
            INV_T=1.0 / temperature, ENTROPY=with_entropy, **options,
        )
        first_part += splits
    run_max = partials[0].amax(dim=0)
    scale = torch.exp(partials[0] - run_max)
    sum_exp = (partials[1] * scale).sum(dim=0)
    lse = run_max + sum_exp.log()
    entropy = lse - (partials[2] * scale).sum(dim=0) / sum_exp if with_entropy else None
    return target_logit - lse, lse, entropy


def _backward(hidden, weight, targets, lse, grad, temperature, need_d_hidden, need_d_weight, logits,
              max_extra_bytes):
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    in_memory = logits == "matmul"
    options = _launch_options(hidden, in_memory)
    slab, _ = lm_head_slab(n_rows, dim, vocab, hidden.dtype, logits=logits, need_d_hidden=need_d_hidden,
                           max_extra_bytes=max_extra_bytes)
    device = hidden.device
    d_logits_buffer = torch.empty(n_rows * slab, device=device, dtype=hidden.dtype)
    logits_buffer = torch.empty(n_rows * slab, device=device, dtype=torch.float32) if in_memory else None
    d_weight = torch.empty_like(weight) if need_d_weight else None  # every slab written exactly once
    d_hidden = scratch = None
    if need_d_hidden:  # accumulated over slabs in fp32: 16-bit sums would drift
        d_hidden = torch.empty(n_rows, dim, device=device, dtype=torch.float32)
        if hidden.dtype != torch.float32:
            scratch = torch.empty_like(d_hidden)

    for col_start, col_end in _slabs(vocab, slab):
        width = col_end - col_start
        w = weight[col_start:col_end]
        slab_logits = hidden  # an unread placeholder when the kernel computes its own tiles
        if in_memory:
            slab_logits = _mm_f32(hidden, w.T, logits_buffer[:n_rows * width].view(n_rows, width))
        d_logits = d_logits_buffer[:n_rows * width].view(n_rows, width)
        grid = (triton.cdiv(n_rows, options["BLOCK_N"]) * triton.cdiv(width, options["BLOCK_V"]),)
        _grad_kernel[grid](hidden, weight, slab_logits, targets, lse, grad, d_logits, n_rows, dim, col_start,
                           col_end, INV_T=1.0 / temperature, **options)
        if need_d_weight:
            torch.mm(d_logits.T, hidden, out=d_weight[col_start:col_end])
        if need_d_hidden:
            if col_start == 0:
                _mm_f32(d_logits, w, d_hidden)
            elif scratch is None:
                d_hidden.addmm_(d_logits, w)
            else:
                d_hidden += _mm_f32(d_logits, w, scratch)
    return d_hidden.to(hidden.dtype) if need_d_hidden else None, d_weight


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, logits, max_extra_bytes):
        logp, lse, entropy = _forward(hidden, weight, targets, temperature, with_entropy, logits, max_extra_bytes)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.options = temperature, logits, max_extra_bytes
        if entropy is None:
            return logp
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, *_grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        temperature, logits, max_extra_bytes = ctx.options
        d_hidden, d_weight = _backward(hidden, weight, targets, lse, grad_logp.float().contiguous(), temperature,
                                       *ctx.needs_input_grad[:2], logits, max_extra_bytes)
        return d_hidden, d_weight, None, None, None, None, None


def _validate(hidden, weight, targets, temperature, backend, logits, check_values):
    if backend not in LM_HEAD_BACKENDS:
        raise ValueError(f"backend must be one of {LM_HEAD_BACKENDS}, got {backend!r}")
    if logits not in LOGITS_MODES:
        raise ValueError(f"logits must be one of {LOGITS_MODES}, got {logits!r}")
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
                   check_values=True, logits="matmul", max_extra_bytes=DEFAULT_MAX_EXTRA_BYTES):
    """log softmax(hidden @ weight.T / temperature) at `targets`, as fp32 [N] (and the entropy [N]).

    hidden [N, H] and weight [V, H] share a float dtype; targets [N] int64. Differentiable in hidden
    and weight (no weight gradient is computed, nor a buffer for one allocated, when weight.requires_grad
    is False); the entropy is a detached diagnostic. backend "triton" never forms [N, V]; "torch" is the
    plain reference; "auto" picks Triton on CUDA. For Triton, `logits` picks who computes the logits
    ("matmul": torch.mm per slab, Triton epilogues; "triton": Triton tiles) and max_extra_bytes bounds the
    memory the slabs take (formula in `lm_head_slab`). check_values=False skips the one check that reads
    tensor values (targets in range), a host sync; shapes, dtypes and devices are always checked.
    """
    _validate(hidden, weight, targets, temperature, backend, logits, check_values)
    if backend == "torch" or (backend == "auto" and not hidden.is_cuda):
        return token_logprobs_reference(hidden, weight, targets, temperature, return_entropy)
    return _TokenLogprobs.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                float(temperature), return_entropy, logits, max_extra_bytes)
