"""LM-head GRPO loss: the fused Triton head against a GEMM peak, cuBLAS, eager torch and Liger-Kernel.

`pytest bench/test_bench_lm_head.py --benchmark-only` times, at the Qwen2.5-VL heads in bf16 on CUDA (at a
tiny fp32 shape on CPU, the Triton kernels in Triton's interpreter), the forward ("fwd", under no_grad,
as for the pi_old / pi_ref passes) and forward+backward ("fwd_bwd", trainable head) of:
- triton / triton_tiles: our GRPO loss, logits by torch.mm per slab / by Triton tiles;
- torch: the fp32 reference; eager / compiled: TRL's materialised logits in the input dtype, then an fp32
  log-softmax (compiled: the same under torch.compile, CUDA only);
- liger_grpo: Liger's fused GRPO loss; liger_flce: Liger's fused linear cross-entropy (the same [N, V]
  work for a cross-entropy loss), both skipped when liger-kernel is not importable;
- cublas: a bare head, the logits GEMM (fwd) and the two gradient GEMMs (fwd_bwd) on [N, V] logits;
- matmul: one head GEMM, hidden @ weight.T, whose TFLOP/s is the peak every row is a fraction of.
Each run writes bench/results/lm_head_<device>.json: per row the median time, TFLOP/s and its fraction
of the peak, the measured peak extra memory (CUDA) and, for ours, the planned one (`lm_head_slab`), and
per shape our speedups and memory ratios against the others.
"""
import importlib.util
import json
import re

import pytest
import torch
import triton

from vcr1_kernels import grpo_loss, grpo_loss_from_logprobs, lm_head_slab
from vcr1_kernels.logprobs import interpreter_active
from vcr1_testing import BENCH_RESULTS

CUDA = torch.cuda.is_available()
DTYPE = torch.bfloat16 if CUDA else torch.float32
SEQ_LEN = 512 if CUDA else 64  # completion tokens per packed sequence
ROUNDS = 5 if CUDA else 3
LIGER = importlib.util.find_spec("liger_kernel") is not None

cuda_only = pytest.mark.skipif(not CUDA, reason="head-sized shapes need a CUDA GPU")
cpu_only = pytest.mark.skipif(CUDA, reason="tiny shape for machines without a GPU")
SHAPES = [  # (N tokens, hidden H, vocab V)
    pytest.param((4096, 3584, 152064), id="7B-4k", marks=cuda_only),
    pytest.param((16384, 3584, 152064), id="7B-16k", marks=cuda_only),
    pytest.param((4096, 2048, 151936), id="3B-4k", marks=cuda_only),
    pytest.param((16384, 2048, 151936), id="3B-16k", marks=cuda_only),
    pytest.param((128, 32, 515), id="tiny", marks=cpu_only),  # the interpreter runs ~10 tiles a second
]
needs_triton = pytest.mark.skipif(not (CUDA or interpreter_active()),
                                  reason="triton was imported before TRITON_INTERPRET=1 was set")
needs_liger = pytest.mark.skipif(not LIGER, reason="liger-kernel is not installed")
IMPLS = [
    pytest.param("triton", marks=needs_triton),
    pytest.param("triton_tiles", marks=needs_triton),
    "torch",
    "eager",
    pytest.param("compiled", marks=pytest.mark.skipif(not CUDA, reason="Inductor compile time dominates on CPU")),
    pytest.param("liger_grpo", marks=needs_liger),
    pytest.param("liger_flce", marks=[needs_liger, needs_triton]),
    "cublas",
]
OURS = {"triton": "matmul", "triton_tiles": "triton"}  # impl: the `logits` option
_records = []


def _eager_logprobs(hidden, weight, targets):
    """What TRL does: the whole [N, V] logits in the input dtype, then an fp32 log-softmax."""
    return (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


_compiled_logprobs = torch.compile(_eager_logprobs, dynamic=False)


def _inputs(n, dim, vocab, device):
    gen = torch.Generator(device).manual_seed(0)
    return dict(
        hidden=torch.randn(n, dim, generator=gen, device=device, dtype=DTYPE),
        weight=(dim**-0.5 * torch.randn(vocab, dim, generator=gen, device=device)).to(DTYPE),
        targets=torch.randint(vocab, (n,), generator=gen, device=device),
        cu_seqlens=torch.arange(0, n + 1, SEQ_LEN, device=device, dtype=torch.int32),
        advantages=torch.randn(n // SEQ_LEN, generator=gen, device=device),
        old_logprobs=-3 * torch.rand(n, generator=gen, device=device),
        ref_logprobs=-3 * torch.rand(n, generator=gen, device=device),
    )


def _cublas_head(hidden, weight):
    """The GEMMs any head does, nothing else: logits, then d_hidden and d_weight from [N, V] "gradients"
    (the logits themselves stand in for them)."""
    return _BareHead.apply(hidden, weight)


class _BareHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight):
        logits = hidden @ weight.T
        ctx.save_for_backward(hidden, weight, logits)
        return logits.sum(dim=-1, dtype=torch.float32)  # a [N] result, as the log-probs are

    @staticmethod
    def backward(ctx, _grad):
        hidden, weight, logits = ctx.saved_tensors
        return logits @ weight, logits.T @ hidden


def _loss_fn(impl, x):
    """A closure computing the loss from x's hidden and weight (whose grads the caller sets up)."""
    packed = (x["targets"], x["cu_seqlens"], x["advantages"], x["old_logprobs"], x["ref_logprobs"])
    if impl in OURS or impl == "torch":
        options = dict(backend="triton", logits=OURS[impl]) if impl in OURS else dict(backend="torch")
        return lambda: grpo_loss(x["hidden"], x["weight"], *packed, **options)[0]
    if impl in ("eager", "compiled"):
        logprobs = _eager_logprobs if impl == "eager" else _compiled_logprobs
        return lambda: grpo_loss_from_logprobs(logprobs(x["hidden"], x["weight"], x["targets"]), *packed[1:])[0]
    if impl == "cublas":
        return lambda: _cublas_head(x["hidden"], x["weight"]).sum()
    if impl == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        module = LigerFusedLinearCrossEntropyLoss()
        return lambda: module(x["weight"], x["hidden"], x["targets"])
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    batch = x["advantages"].numel()  # equal-length sequences: [B, T] is a plain reshape
    module = LigerFusedLinearGRPOLoss(loss_type="grpo", compiled=CUDA, use_ref_model=True)
    mask = torch.ones(batch, SEQ_LEN, device=x["hidden"].device, dtype=torch.long)
    return lambda: module(x["hidden"].view(batch, SEQ_LEN, -1), x["weight"], x["targets"].view(batch, -1), mask,
                          x["advantages"], ref_per_token_logps=x["ref_logprobs"].view(batch, -1),
                          old_per_token_logps=x["old_logprobs"].view(batch, -1))[0]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _peak_extra_bytes(fn, x):
    """Peak memory of one call beyond what was allocated before it and the gradients it leaves."""
    if not CUDA:
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    _sync()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (x["hidden"], x["weight"]) if t.grad is not None)
    return torch.cuda.max_memory_allocated() - before - grads


def _shape_id(shape):
    return next(p.id for p in SHAPES if p.values[0] == shape)


def _record(benchmark, shape, impl, mode, flops, extra, planned=None):
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    seconds = benchmark.stats.stats.median
    row = dict(shape=_shape_id(shape), n=shape[0], h=shape[1], v=shape[2], impl=impl, mode=mode, median_s=seconds,
               tflops=flops / seconds / 1e12, peak_extra_mib=None if extra is None else extra / 2**20,
               planned_extra_mib=None if planned is None else planned / 2**20)
    benchmark.extra_info.update(row)
    _records.append(row)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_grpo_loss_speed(benchmark, shape, impl, mode):
    n, dim, vocab = shape
    x = _inputs(n, dim, vocab, "cuda" if CUDA else "cpu")
    loss_fn = _loss_fn(impl, x)
    training = mode == "fwd_bwd"
    x["weight"].requires_grad_(training)
    x["hidden"].requires_grad_(training)

    def step():
        with torch.set_grad_enabled(training):
            loss = loss_fn()
            if training:
                loss.backward()
        _sync()

    def clear_grads():
        x["hidden"].grad = x["weight"].grad = None

    benchmark.group = f"{_shape_id(shape)} {mode}"
    benchmark.pedantic(step, setup=clear_grads, rounds=ROUNDS, warmup_rounds=1)
    clear_grads()
    extra = _peak_extra_bytes(step, x)
    # The backward's planned bytes also bound the forward's (its slab of fp32 logits is no wider).
    planned = lm_head_slab(n, dim, vocab, DTYPE, logits=OURS[impl])[1] if impl in OURS else None
    _record(benchmark, shape, impl, mode, (8 if training else 2) * n * dim * vocab, extra, planned)


@pytest.mark.parametrize("shape", SHAPES)
def test_head_matmul_speed(benchmark, shape):
    """The peak: one head GEMM in the benchmark dtype, hidden @ weight.T."""
    n, dim, vocab = shape
    x = _inputs(n, dim, vocab, "cuda" if CUDA else "cpu")

    def step():
        x["hidden"] @ x["weight"].T
        _sync()

    benchmark.group = f"{_shape_id(shape)} fwd"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, shape, "matmul", "fwd", 2 * n * dim * vocab, None)


def _summary(records):
    """Per row its fraction of the GEMM peak; per shape our speedups and memory ratios against the rest."""
    out = {}
    for shape in dict.fromkeys(r["shape"] for r in records):
        rows = {(r["impl"], r["mode"]): r for r in records if r["shape"] == shape}
        peak = rows.get(("matmul", "fwd"))
        for row in rows.values():
            row["fraction_of_gemm_peak"] = row["tflops"] / peak["tflops"] if peak else None
        out[shape] = {}
        for ours, mode in ((impl, mode) for impl in OURS for mode in ("fwd", "fwd_bwd")):
            if (ours, mode) not in rows:
                continue
            mine = rows[ours, mode]
            summary = out[shape][f"{ours} {mode}"] = dict(fraction_of_gemm_peak=mine["fraction_of_gemm_peak"])
            for (other, other_mode), theirs in rows.items():
                if other_mode != mode or other in (ours, "matmul"):
                    continue
                summary[f"speedup_vs_{other}"] = theirs["median_s"] / mine["median_s"]
                if mine["peak_extra_mib"] and theirs["peak_extra_mib"] is not None:
                    summary[f"memory_ratio_{other}_to_ours"] = theirs["peak_extra_mib"] / mine["peak_extra_mib"]
    return out


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if not _records:
        return
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    BENCH_RESULTS.mkdir(parents=True, exist_ok=True)
    path = BENCH_RESULTS / f"lm_head_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}.json"
    summary = _summary(_records)
    path.write_text(json.dumps(dict(
        device=device, torch=torch.__version__, triton=triton.__version__, dtype=str(DTYPE).split(".")[-1],
        triton_interpreted=interpreter_active(), seq_len=SEQ_LEN, rounds=ROUNDS,
        flops="fwd 2NHV, fwd_bwd 8NHV (logits twice, d_hidden, d_weight) for every impl, so tflops compare times",
        peak="matmul: one hidden @ weight.T GEMM in this run",
        peak_extra="beyond prior allocations and the gradients left (CUDA only)",
        planned_extra="ours: lm_head_slab's bytes at the default budget",
        results=_records, summary=summary,
    ), indent=1) + "\n")
