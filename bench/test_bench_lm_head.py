"""LM-head GRPO loss: fused Triton kernels against the torch reference, Liger-Kernel and materialised logits.

`pytest bench/test_bench_lm_head.py --benchmark-only` times the GRPO loss (old and ref log-probs given)
forward ("fwd", under no_grad, as for the old/ref passes) and forward+backward ("fwd_bwd", trainable
head) at the Qwen2.5-VL heads on CUDA, or at a toy shape on CPU, plus a bare bf16 head matmul as the
throughput yardstick. Each run writes bench/results/lm_head_<device>.json.
"""
import json
import re

import pytest
import torch
import triton

from vcr1_kernels import grpo_loss, grpo_loss_from_logprobs
from vcr1_testing import BENCH_RESULTS

CUDA = torch.cuda.is_available()
SEQ_LEN = 512  # completion tokens per packed sequence
ROUNDS = 5

cuda_only = pytest.mark.skipif(not CUDA, reason="head-sized shapes need a CUDA GPU")
cpu_only = pytest.mark.skipif(CUDA, reason="toy shape for machines without a GPU")
SHAPES = [  # (N tokens, hidden H, vocab V)
    pytest.param((4096, 3584, 152064), id="7B-4k", marks=cuda_only),
    pytest.param((16384, 3584, 152064), id="7B-16k", marks=cuda_only),
    pytest.param((4096, 2048, 151936), id="3B-4k", marks=cuda_only),
    pytest.param((16384, 2048, 151936), id="3B-16k", marks=cuda_only),
    pytest.param((1024, 256, 8195), id="toy", marks=cpu_only),
]
IMPLS = [
    pytest.param("triton", marks=pytest.mark.skipif(not CUDA, reason="Triton's CPU interpreter is too slow to time")),
    "torch",
    "liger",
    "eager",
    pytest.param("compiled", marks=pytest.mark.skipif(not CUDA, reason="Inductor compile time dominates on CPU")),
]
_records = []


def _eager_logprobs(hidden, weight, targets):
    """What TRL does: the whole [N, V] logits in the input dtype, then an fp32 log-softmax."""
    return (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


_compiled_logprobs = torch.compile(_eager_logprobs, dynamic=False)


def _inputs(n, dim, vocab, dtype, device):
    gen = torch.Generator(device).manual_seed(0)
    return dict(
        hidden=torch.randn(n, dim, generator=gen, device=device, dtype=dtype),
        weight=(dim**-0.5 * torch.randn(vocab, dim, generator=gen, device=device)).to(dtype),
        targets=torch.randint(vocab, (n,), generator=gen, device=device),
        cu_seqlens=torch.arange(0, n + 1, SEQ_LEN, device=device, dtype=torch.int32),
        advantages=torch.randn(n // SEQ_LEN, generator=gen, device=device),
        old_logprobs=-3 * torch.rand(n, generator=gen, device=device),
        ref_logprobs=-3 * torch.rand(n, generator=gen, device=device),
    )


def _loss_fn(impl, x):
    """A closure computing the loss from x's hidden and weight (whose grads the caller sets up)."""
    packed = (x["targets"], x["cu_seqlens"], x["advantages"], x["old_logprobs"], x["ref_logprobs"])
    if impl in ("triton", "torch"):
        return lambda: grpo_loss(x["hidden"], x["weight"], *packed, backend=impl)[0]
    if impl in ("eager", "compiled"):
        logprobs = _eager_logprobs if impl == "eager" else _compiled_logprobs
        return lambda: grpo_loss_from_logprobs(logprobs(x["hidden"], x["weight"], x["targets"]), *packed[1:])[0]
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


def _record(benchmark, shape, impl, mode, flops, extra):
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    seconds = benchmark.stats.stats.median
    row = dict(shape=_shape_id(shape), n=shape[0], h=shape[1], v=shape[2], impl=impl, mode=mode, median_s=seconds,
               tflops=flops / seconds / 1e12, peak_extra_mib=None if extra is None else extra / 2**20)
    benchmark.extra_info.update(row)
    _records.append(row)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_grpo_loss_speed(benchmark, shape, impl, mode):
    n, dim, vocab = shape
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    x = _inputs(n, dim, vocab, dtype, device)
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
    _record(benchmark, shape, impl, mode, (8 if training else 2) * n * dim * vocab, extra)


@pytest.mark.parametrize("shape", SHAPES)
def test_head_matmul_speed(benchmark, shape):
    """The yardstick: a bare head matmul in the benchmark dtype, hidden @ weight.T."""
    n, dim, vocab = shape
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    x = _inputs(n, dim, vocab, dtype, device)

    def step():
        x["hidden"] @ x["weight"].T
        _sync()

    benchmark.group = f"{_shape_id(shape)} fwd"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, shape, "matmul", "fwd", 2 * n * dim * vocab, None)


def _targets(records):
    """The issue's targets, per shape, for forward+backward: Triton against the matmul, Liger and eager."""
    out = {}
    for shape in dict.fromkeys(r["shape"] for r in records):
        rows = {(r["impl"], r["mode"]): r for r in records if r["shape"] == shape}
        ours = rows.get(("triton", "fwd_bwd"))
        if ours is None:
            continue
        out[shape] = {}
        if ("matmul", "fwd") in rows:
            out[shape]["fraction_of_matmul_tflops"] = ours["tflops"] / rows["matmul", "fwd"]["tflops"]
        for other in ("liger", "eager", "compiled"):
            if (other, "fwd_bwd") in rows:
                theirs = rows[other, "fwd_bwd"]
                out[shape][f"speedup_vs_{other}"] = theirs["median_s"] / ours["median_s"]
                if ours["peak_extra_mib"]:
                    out[shape][f"memory_ratio_{other}_to_triton"] = theirs["peak_extra_mib"] / ours["peak_extra_mib"]
    return out


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if not _records:
        return
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    BENCH_RESULTS.mkdir(parents=True, exist_ok=True)
    path = BENCH_RESULTS / f"lm_head_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}.json"
    path.write_text(json.dumps(dict(
        device=device, torch=torch.__version__, triton=triton.__version__,
        dtype="bfloat16" if CUDA else "float32", seq_len=SEQ_LEN, rounds=ROUNDS,
        flops="fwd 2NHV, fwd_bwd 8NHV", peak_extra="beyond prior allocations and the gradients left",
        results=_records, targets=_targets(_records),
    ), indent=1) + "\n")
