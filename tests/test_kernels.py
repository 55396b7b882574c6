"""Fused LM-head kernels against a float64 reference and Liger-Kernel.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before triton
is first imported; if another test module imported it first, the Triton cases re-run in a fresh process.
"""
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vcr1_kernels.logprobs as logprobs_module  # noqa: E402
from vcr1_kernels import grpo_loss, lm_head_slab, token_logprobs  # noqa: E402
from vcr1_testing import run_triton_tests_in_fresh_process

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_HERE = torch.cuda.is_available() or logprobs_module.interpreter_active()
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(
    not TRITON_HERE, reason="triton was imported before TRITON_INTERPRET=1; test_triton_in_fresh_process runs it")
# "triton" runs the default head (torch.mm logits per slab, Triton epilogues); "triton_tiles" has Triton
# compute the logit tiles too.
HEADS = {"torch": dict(backend="torch"), "triton": dict(backend="triton", logits="matmul"),
         "triton_tiles": dict(backend="triton", logits="triton")}
TRITON_HEADS = [pytest.param(name, marks=requires_triton) for name in ("triton", "triton_tiles")]
RUNNABLE_BACKENDS = [*TRITON_HEADS, "torch"]
SLAB_MAX_COLUMNS = logprobs_module.SLAB_MAX_COLUMNS
TEST_SLAB = 256  # slabs this narrow give the small test vocabularies several slabs and a ragged last one
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
MAX_LEN = 16  # max_completion_length for dr_grpo


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every float buffer from torch.empty / torch.empty_like starts as NaN, so unwritten outputs show."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def wrapper(*args, **kwargs):
            out = make(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out
        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))


@pytest.fixture(autouse=True)
def narrow_slabs(monkeypatch):
    monkeypatch.setattr(logprobs_module, "SLAB_MAX_COLUMNS", TEST_SLAB)


# ---------------------------------------------------------------------------- float64 references

def logprobs_f64(hidden, weight, targets, temperature=1.0):
    logprobs = (hidden.double() @ weight.double().T / temperature).log_softmax(dim=-1)
    return logprobs.gather(-1, targets[:, None]).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)


def grpo_loss_f64(logp, cu_seqlens, advantages, old, ref, *, beta, epsilon_low, epsilon_high, delta,
                  loss_type, normalizer=None):
    """TRL's per-token GRPO loss, one sequence at a time, in float64."""
    bounds = cu_seqlens.tolist()
    per_seq = []
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        lp, adv = logp[start:end], advantages[b].double()
        log_ratio = lp - (lp.detach() if old is None else old[start:end].double())
        ratio = log_ratio.clamp(-20, 20).exp()
        capped = ratio if delta is None else ratio.clamp(max=delta)
        loss = -torch.minimum(capped * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
        if ref is not None:
            log_ref_ratio = (ref[start:end].double() - lp).clamp(-20, 20)
            loss = loss + beta * (log_ref_ratio.exp() - log_ref_ratio - 1)
        per_seq.append(loss)
    tokens = torch.cat(per_seq)
    if loss_type == "grpo":
        return torch.stack([s.mean() for s in per_seq]).mean()
    if loss_type == "bnpo":
        return tokens.mean()
    if loss_type == "dr_grpo":
        return tokens.sum() / (len(per_seq) * MAX_LEN)
    return tokens.sum() / (tokens.numel() if normalizer is None else normalizer)


# ---------------------------------------------------------------------------- inputs and checks

def make_batch(lengths, dim, vocab, dtype=torch.float32, *, temperature=1.0, seed=0):
    """Packed completions with targets sampled from the model and old/ref log-probs close to it, so
    ratios leave the clip range on both sides; advantages cycle through positive, negative and zero."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    hidden = torch.randn(n, dim, generator=gen).to(dtype)
    weight = (3 * dim**-0.5 * torch.randn(vocab, dim, generator=gen)).to(dtype)
    probs = (hidden.double() @ weight.double().T / temperature).softmax(-1)
    targets = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    logp, _ = logprobs_f64(hidden, weight, targets, temperature)
    signs = torch.tensor([1.0, -1.0, 0.0]).repeat(len(lengths))[:len(lengths)]
    batch = dict(
        hidden=hidden, weight=weight, targets=targets,
        cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
        advantages=signs * (0.2 + torch.rand(len(lengths), generator=gen)),
        old_logprobs=(logp + 1.2 * torch.rand(n, generator=gen, dtype=torch.float64) - 0.6).float(),
        ref_logprobs=(logp + 2.0 * torch.rand(n, generator=gen, dtype=torch.float64) - 1.0).float(),
    )
    return {k: v.to(DEVICE) for k, v in batch.items()}


def leaves(batch):
    """Fresh gradient-tracking copies of hidden and weight: for the kernels and for the f64 reference."""
    ours = [batch[k].detach().clone().requires_grad_() for k in ("hidden", "weight")]
    ref = [batch[k].detach().double().requires_grad_() for k in ("hidden", "weight")]
    return ours, ref


def assert_close(actual, expected, tol):
    """Norm-relative closeness, with unit scale for quantities near zero (a loss can be ~0)."""
    err = (actual.double() - expected.double()).norm().item()
    scale = max(expected.double().norm().item(), 1.0 if expected.ndim == 0 else 1e-30)
    assert torch.isfinite(actual).all(), "non-finite values"
    assert err <= tol * scale, f"relative error {err / scale:.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------- token_logprobs

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n,dim,vocab,temperature", [
    (37, 48, 257, 1.0),  # vocab = 4 interpreter tiles + 1 column: a padded tail nearly a whole tile wide
    (64, 32, 1000, 0.7),
    (5, 80, 300, 1.3),
    (1, 16, 65, 1.0),
    (150, 32, 1031, 0.6),  # several row tiles; the tail is 7 columns
])
@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
def test_token_logprobs_match_float64(backend, n, dim, vocab, temperature, dtype):
    batch = make_batch([n], dim, vocab, dtype, temperature=temperature, seed=n)
    (hidden, weight), (hidden64, weight64) = leaves(batch)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    logp, entropy = token_logprobs(hidden, weight, batch["targets"], temperature=temperature,
                                   return_entropy=True, **HEADS[backend])
    (logp * upstream).sum().backward()
    logp64, entropy64 = logprobs_f64(hidden64, weight64, batch["targets"], temperature)
    (logp64 * upstream.double()).sum().backward()

    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == entropy.shape == (n,)
    assert not entropy.requires_grad
    tol = TOL[dtype]
    assert_close(logp, logp64, tol)
    assert_close(entropy, entropy64, tol)
    assert hidden.grad.dtype == weight.grad.dtype == dtype
    assert_close(hidden.grad, hidden64.grad, tol)
    assert_close(weight.grad, weight64.grad, tol)


class NewTensors(TorchDispatchMode):
    """Records the shape of every tensor an op creates with storage of its own (views, in-place and out=
    results share an input's storage; the Triton interpreter's host aliases share the storage it passes)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = tree_leaves((args, kwargs))
        known = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor)}
        known |= {x.data_ptr() for x in inputs if isinstance(x, torch.UntypedStorage)}
        self.shapes |= {tuple(t.shape) for t in tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in known}
        return out


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
@pytest.mark.parametrize("trainable", ["both", "hidden", "weight", "no_grad"])
def test_only_needed_gradient_buffers_are_allocated(backend, trainable):
    """A frozen head allocates no [V, H] buffer, a frozen input no [N, H] one, and a forward under
    no_grad (pi_old, pi_ref) neither; the "both" case shows the recorder sees those buffers when made."""
    n, dim, vocab = 20, 48, 300  # N, H, V and the slab widths all differ, so shapes name the buffers
    batch = make_batch([n], dim, vocab)
    (hidden, weight), (hidden64, weight64) = leaves(batch)
    hidden.requires_grad_(trainable in ("both", "hidden"))
    weight.requires_grad_(trainable in ("both", "weight"))
    with NewTensors() as record, torch.set_grad_enabled(trainable != "no_grad"):
        logp = token_logprobs(hidden, weight, batch["targets"], **HEADS[backend])
        if trainable != "no_grad":
            logp.sum().backward()

    assert ((n, dim) in record.shapes) == (trainable in ("both", "hidden"))
    assert ((vocab, dim) in record.shapes) == (trainable in ("both", "weight"))
    assert logp.requires_grad == (trainable != "no_grad")
    logprobs_f64(hidden64, weight64, batch["targets"])[0].sum().backward()
    for ours, ref in ((hidden, hidden64), (weight, weight64)):
        if ours.requires_grad:
            assert_close(ours.grad, ref.grad, 1e-5)
        else:
            assert ours.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", TRITON_HEADS)
def test_backward_is_bitwise_deterministic(backend, dtype):
    batch = make_batch([40, 29], 40, 600, dtype, temperature=0.8, seed=2)  # 3 slabs, ragged rows and tail
    upstream = torch.randn(69, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads = []
    for _ in range(2):
        (hidden, weight), _ = leaves(batch)
        logp = token_logprobs(hidden, weight, batch["targets"], temperature=0.8, **HEADS[backend])
        grads.append(torch.autograd.grad((logp * upstream).sum(), (hidden, weight)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@requires_cuda
@pytest.mark.parametrize("logits", ["matmul", "triton"])
def test_backward_is_bitwise_deterministic_on_gpu(logits, monkeypatch):
    """At a size where many programs run at once, so that any race between them would show."""
    monkeypatch.setattr(logprobs_module, "SLAB_MAX_COLUMNS", SLAB_MAX_COLUMNS)
    n, dim, vocab = 2048, 1024, 50000
    gen = torch.Generator(DEVICE).manual_seed(0)
    hidden = torch.randn(n, dim, generator=gen, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = (dim**-0.5 * torch.randn(vocab, dim, generator=gen, device=DEVICE)).bfloat16().requires_grad_()
    targets = torch.randint(vocab, (n,), generator=gen, device=DEVICE)
    grads = []
    for _ in range(2):
        logp = token_logprobs(hidden, weight, targets, backend="triton", logits=logits,
                              max_extra_bytes=64 * 2**20)  # several slabs
        grads.append(torch.autograd.grad(logp.sum(), (hidden, weight)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_no_atomics_in_kernels():
    """Atomic adds make the summation order (and so the gradients) depend on scheduling."""
    sources = Path(logprobs_module.__file__).parent.glob("*.py")
    assert not [path.name for path in sources if "atomic" in path.read_text()]


def test_slab_width_keeps_the_memory_budget(monkeypatch):
    monkeypatch.setattr(logprobs_module, "SLAB_MAX_COLUMNS", SLAB_MAX_COLUMNS)
    head_7b = dict(dim=3584, vocab=152064, dtype=torch.bfloat16)
    slab, extra = lm_head_slab(16384, **head_7b)
    assert extra <= 2**30 and slab >= 4096 and slab % logprobs_module.SLAB_ALIGN == 0
    assert lm_head_slab(1024, **head_7b)[1] < 2**30 / 8
    for logits in ("matmul", "triton"):
        for need_d_hidden in (True, False):
            for budget in (2**27, 2**28, 2**29):
                slab, extra = lm_head_slab(4096, **head_7b, logits=logits, need_d_hidden=need_d_hidden,
                                           max_extra_bytes=budget)
                assert extra <= budget
                wider, _ = lm_head_slab(4096, **head_7b, logits=logits, need_d_hidden=need_d_hidden,
                                        max_extra_bytes=2 * budget)
                assert wider > slab or slab == SLAB_MAX_COLUMNS  # the budget, not the cap, set the width
    assert lm_head_slab(8, 16, 100, torch.float32)[0] == 100  # a small vocabulary is one slab
    with pytest.raises(ValueError, match="max_extra_bytes"):
        lm_head_slab(16384, **head_7b, max_extra_bytes=2**28)


def test_auto_backend_picks_triton_only_on_cuda(monkeypatch):
    batch = make_batch([8], 16, 50)
    calls = []
    forward = logprobs_module._forward
    monkeypatch.setattr(logprobs_module, "_forward", lambda *a: calls.append(a) or forward(*a))
    token_logprobs(batch["hidden"], batch["weight"], batch["targets"])
    assert bool(calls) == (DEVICE == "cuda")


# ---------------------------------------------------------------------------- grpo_loss

CASES = {  # name: (old log-probs, ref log-probs, delta)
    "on_policy": (False, False, None),
    "ref_only": (False, True, None),
    "clipped": (True, True, None),
    "clipped_delta": (True, True, 1.3),
}


def run_grpo(batch, backend, loss_type, case, *, temperature=1.0, **kwargs):
    """Our loss and gradients next to the float64 reference's."""
    use_old, use_ref, delta = CASES[case]
    old = batch["old_logprobs"] if use_old else None
    ref = batch["ref_logprobs"] if use_ref else None
    options = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, delta=delta, loss_type=loss_type, **kwargs)
    (hidden, weight), (hidden64, weight64) = leaves(batch)
    loss, stats = grpo_loss(hidden, weight, batch["targets"], batch["cu_seqlens"], batch["advantages"], old,
                            ref, temperature=temperature, max_completion_length=MAX_LEN, **HEADS[backend],
                            **options)
    loss.backward()
    logp64, entropy64 = logprobs_f64(hidden64, weight64, batch["targets"], temperature)
    loss64 = grpo_loss_f64(logp64, batch["cu_seqlens"], batch["advantages"], old, ref, **options)
    loss64.backward()
    return (loss, hidden.grad, weight.grad, stats), (loss64, hidden64.grad, weight64.grad, logp64, entropy64)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
def test_grpo_loss_matches_float64(backend, loss_type, case):
    batch = make_batch([5, 11, 1, 7], 40, 300, temperature=0.9, seed=3)
    ours, ref = run_grpo(batch, backend, loss_type, case, temperature=0.9)
    for actual, expected in zip(ours[:3], ref[:3]):
        assert_close(actual, expected, 1e-5)

    stats, logp64, entropy64 = ours[3], ref[3], ref[4]
    assert all(not s.requires_grad and s.ndim == 0 for s in stats.values())
    assert_close(stats["entropy"], entropy64.mean(), 1e-5)
    if CASES[case][1]:
        log_ref_ratio = batch["ref_logprobs"].double() - logp64.detach()
        assert_close(stats["kl"], (log_ref_ratio.exp() - log_ref_ratio - 1).mean(), 1e-5)
    else:
        assert stats["kl"] == 0
    if CASES[case][0]:  # the inputs must clip on both sides, or this test proves little
        ratio = (logp64.detach() - batch["old_logprobs"].double()).exp()
        adv = torch.repeat_interleave(batch["advantages"], batch["cu_seqlens"].diff().long())
        low, high = (ratio < 0.8) & (adv < 0), (ratio > 1.28) & (adv > 0)
        assert low.any() and high.any()
        assert stats["clip_ratio"].item() == pytest.approx((low | high).double().mean().item())
    else:
        assert stats["clip_ratio"] == 0


@requires_triton
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_bf16_triton(loss_type):
    batch = make_batch([9, 4, 12], 48, 257, torch.bfloat16, seed=5)
    ours, ref = run_grpo(batch, "triton", loss_type, "clipped_delta")
    for actual, expected in zip(ours[:3], ref[:3]):
        assert_close(actual, expected, 1e-2)


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
def test_dapo_normalizer_splits_over_micro_batches(backend):
    """Micro-batches normalised by the global token count add up to the whole batch's dapo loss."""
    batch = make_batch([6, 3, 8, 5], 32, 200, seed=7)
    (hidden, weight), _ = leaves(batch)
    args = (batch["targets"], batch["cu_seqlens"], batch["advantages"], batch["old_logprobs"],
            batch["ref_logprobs"])
    whole, _ = grpo_loss(hidden, weight, *args, loss_type="dapo", **HEADS[backend])
    whole_grads = torch.autograd.grad(whole, (hidden, weight))

    cu, n = batch["cu_seqlens"], hidden.shape[0]
    total = torch.zeros(())
    for first, last in ((0, 2), (2, 4)):  # sequences [first, last) form one micro-batch
        rows = slice(int(cu[first]), int(cu[last]))
        part, _ = grpo_loss(hidden[rows], weight, batch["targets"][rows], cu[first:last + 1] - cu[first],
                            batch["advantages"][first:last], batch["old_logprobs"][rows],
                            batch["ref_logprobs"][rows], loss_type="dapo", normalizer=n,
                            **HEADS[backend])
        part.backward()
        total = total + part.detach().cpu()
    assert_close(total, whole.detach().cpu(), 1e-5)
    assert_close(hidden.grad, whole_grads[0], 1e-5)
    assert_close(weight.grad, whole_grads[1], 1e-5)


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
def test_extreme_log_ratios_are_clamped(backend):
    batch = make_batch([4, 4], 32, 100, seed=11)
    logp, _ = logprobs_f64(batch["hidden"], batch["weight"], batch["targets"])
    batch["old_logprobs"] = (logp - 40).float()  # exp(40) overflows fp32 unless clamped
    batch["ref_logprobs"] = (logp + 50).float()
    ours, ref = run_grpo(batch, backend, "grpo", "clipped")
    for actual, expected in zip(ours[:3], ref[:3]):
        assert_close(actual, expected, 1e-5)


# ---------------------------------------------------------------------------- Liger-Kernel parity

@requires_triton
@pytest.mark.parametrize("case", ["on_policy", "clipped", "clipped_delta"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_liger_triton(loss_type, case):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    lengths = [5, 9, 2]
    batch = make_batch(lengths, 32, 257, temperature=0.8, seed=13)
    use_old, use_ref, delta = CASES[case]
    old = batch["old_logprobs"] if use_old else None
    ref = batch["ref_logprobs"] if use_ref else None
    normalizer = 40 if loss_type == "dapo" else None  # a global token count from other micro-batches
    options = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, delta=delta, temperature=0.8,
                   loss_type=loss_type, max_completion_length=MAX_LEN)

    (hidden, weight), _ = leaves(batch)
    loss, stats = grpo_loss(hidden, weight, batch["targets"], batch["cu_seqlens"], batch["advantages"], old, ref,
                            normalizer=normalizer, backend="triton", **options)
    grads = torch.autograd.grad(loss, (hidden, weight))

    # Liger wants [B, T, ...] with a mask; scatter the packed rows into that layout.
    batch_size, width = len(lengths), max(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    slots = mask.flatten().nonzero().squeeze(-1).to(DEVICE)

    def padded(x):
        flat = x.new_zeros(batch_size * width, *x.shape[1:]).index_copy(0, slots, x)
        return flat.view(batch_size, width, *x.shape[1:])

    (hidden_l, weight_l), _ = leaves(batch)
    module = liger.LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=ref is not None, **options)
    loss_l, metrics = module(padded(hidden_l), weight_l, padded(batch["targets"]), mask.to(DEVICE).long(),
                             batch["advantages"], ref_per_token_logps=None if ref is None else padded(ref),
                             old_per_token_logps=None if old is None else padded(old),
                             num_items_in_batch=normalizer)
    grads_l = torch.autograd.grad(loss_l, (hidden_l, weight_l))

    assert_close(loss, loss_l, 1e-5)
    assert_close(grads[0], grads_l[0], 1e-5)
    assert_close(grads[1], grads_l[1], 1e-5)
    assert_close(stats["clip_ratio"], metrics[-1], 1e-5)
    if ref is not None:
        assert_close(stats["kl"], metrics[0], 1e-5)


# ---------------------------------------------------------------------------- validation

def _bad(**change):
    batch = make_batch([3, 2], 16, 40)
    args = dict(hidden=batch["hidden"], weight=batch["weight"], targets=batch["targets"],
                cu_seqlens=batch["cu_seqlens"], advantages=batch["advantages"], backend="torch")
    args.update(change)
    return args


@pytest.mark.parametrize("change,error,match", [
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(logits="cublas"), ValueError, "logits"),
    (dict(loss_type="ppo"), ValueError, "loss_type"),
    (dict(loss_type="dr_grpo"), ValueError, "max_completion_length"),
    (dict(normalizer=10), ValueError, "normalizer"),
    (dict(loss_type="dapo", normalizer=0), ValueError, "normalizer"),
    (dict(delta=0.0), ValueError, "delta"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32)), ValueError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 4, 3, 5], dtype=torch.int32)), ValueError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0.0, 3.0, 5.0])), ValueError, "cu_seqlens"),
    (dict(advantages=torch.ones(3)), ValueError, "advantages"),
    (dict(old_logprobs=torch.zeros(4)), ValueError, "old_logprobs"),
    (dict(targets=torch.zeros(5, dtype=torch.int32)), TypeError, "int64"),
    (dict(targets=torch.full((5,), 40)), ValueError, "targets"),
    (dict(weight=torch.zeros(40, 8)), ValueError, "hidden"),
    (dict(weight=torch.zeros(40, 16, dtype=torch.float64)), TypeError, "fp32"),
])
def test_invalid_inputs_are_rejected(change, error, match):
    args = _bad(**{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in change.items()})
    with pytest.raises(error, match=match):
        grpo_loss(**args)


# ---------------------------------------------------------------------------- memory and isolation

@requires_cuda
@pytest.mark.parametrize("logits", ["matmul", "triton"])
def test_triton_keeps_its_memory_budget(logits, monkeypatch):
    monkeypatch.setattr(logprobs_module, "SLAB_MAX_COLUMNS", SLAB_MAX_COLUMNS)
    n, dim, vocab, budget = 4096, 512, 32768, 40 * 2**20  # [N, V] fp32 logits would take 512 MiB
    batch = make_batch([n // 8] * 8, dim, vocab, torch.bfloat16)
    (hidden, weight), _ = leaves(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = grpo_loss(hidden, weight, batch["targets"], batch["cu_seqlens"], batch["advantages"],
                        batch["old_logprobs"], batch["ref_logprobs"], backend="triton", logits=logits,
                        max_extra_bytes=budget)
    loss.backward()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (n + vocab) * dim * 2  # the bf16 gradients returned
    slab, planned = lm_head_slab(n, dim, vocab, torch.bfloat16, logits=logits, max_extra_bytes=budget)
    assert slab < vocab and planned <= budget
    assert extra <= grads + planned + 64 * n * 4, f"{extra / 2**20:.0f} MiB extra"  # + O(N) loss vectors


@pytest.mark.skipif(TRITON_HERE, reason="the Triton tests already ran in this process")
def test_triton_in_fresh_process():
    run_triton_tests_in_fresh_process(__file__)
