"""GRPO loss options: sequence-level importance ratios (GSPO) and truncated importance sampling (TIS)
against the rollout engine's log-probs, checked against a float64 reference written out here sequence by
sequence (it calls none of the code under test), with the "torch" and "triton" heads."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vcr1_kernels.logprobs as logprobs_module  # noqa: E402
from vcr1_kernels import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, grpo_loss, grpo_loss_from_logprobs  # noqa: E402
from vcr1_testing import HostReads, run_triton_tests_in_fresh_process

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_HERE = torch.cuda.is_available() or logprobs_module.interpreter_active()
requires_triton = pytest.mark.skipif(
    not TRITON_HERE, reason="triton was imported before TRITON_INTERPRET=1; test_triton_in_fresh_process runs it")
BACKENDS = [pytest.param("triton", marks=requires_triton), "torch"]
TOL = 1e-5  # fp32, as tests/test_kernels.py
MAX_LEN = 16  # max_completion_length for dr_grpo
EPS_LOW, EPS_HIGH, BETA, DELTA, TIS_CAP = 0.2, 0.28, 0.04, 1.3, 2.0

# Ragged sequences, one of them empty and one a single token. Each sequence's old log-probs sit a fixed
# shift away from the current ones (plus noise), so its sequence ratio s_i ≈ exp(-shift) lands where wanted:
# seq 0 (A > 0) above 1 + eps_high, seq 4 (A < 0) below 1 - eps_low, seq 5 (A < 0) above delta.
LENGTHS = [5, 0, 9, 1, 7, 6]
ADVANTAGES = [0.7, -0.4, 0.0, 0.9, -1.1, -0.6]
OLD_SHIFTS = [-0.5, 0.2, 0.1, 0.1, 0.4, -0.6]


# ---------------------------------------------------------------------------- float64 reference

def logprobs_f64(hidden, weight, targets):
    logprobs = (hidden.double() @ weight.double().T).log_softmax(dim=-1)
    return logprobs.gather(-1, targets[:, None]).squeeze(-1)


def reference_loss(logp, cu_seqlens, advantages, old, ref, *, level, loss_type, delta=None, rollout=None,
                   tis_cap=None, tis_on_kl=False):
    """The loss by definition, one sequence at a time, in float64: (loss, per-token ratios, TIS weights).

    tis_on_kl=True weighs the whole per-token loss (the KL too): the mistake the TIS tests must catch."""
    bounds = cu_seqlens.tolist()
    losses, ratios, weights = [], [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        n, lp, adv = end - start, logp[start:end], float(advantages[i])
        lp_old = lp.detach() if old is None else old[start:end].double()
        if level == "sequence":
            mean_log_ratio = (lp - lp_old).sum() / max(n, 1)
            ratio = torch.exp(mean_log_ratio.clamp(-20, 20)) * torch.ones(n, dtype=torch.float64)
        else:
            ratio = torch.exp((lp - lp_old).clamp(-20, 20))
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)
        pg = -torch.minimum(capped * adv, torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)
        kl = torch.zeros(n, dtype=torch.float64)
        if ref is not None:
            log_ref_ratio = (ref[start:end].double() - lp).clamp(-20, 20)
            kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        w = torch.ones(n, dtype=torch.float64)
        if rollout is not None:
            w = torch.clamp(torch.exp(lp_old.detach() - rollout[start:end].double()), max=tis_cap)
        losses.append(w * (pg + BETA * kl) if tis_on_kl else w * pg + BETA * kl)
        ratios.append(ratio.detach())
        weights.append(w)

    n_seqs, n_tokens = len(losses), sum(len(t) for t in losses)
    if loss_type == "grpo":  # mean over sequences of each sequence's token mean (an empty one gives 0)
        loss = sum(t.sum() / max(len(t), 1) for t in losses) / n_seqs
    elif loss_type == "bnpo":
        loss = sum(t.sum() for t in losses) / n_tokens
    elif loss_type == "dr_grpo":
        loss = sum(t.sum() for t in losses) / (n_seqs * MAX_LEN)
    else:  # dapo, default normaliser: the tokens of the batch
        loss = sum(t.sum() for t in losses) / n_tokens
    return loss, torch.cat(ratios), torch.cat(weights)


def expected_clip_ratio(ratios, cu_seqlens, advantages):
    adv = torch.repeat_interleave(advantages.double(), cu_seqlens.diff().long())
    clipped = ((ratios < 1 - EPS_LOW) & (adv < 0)) | ((ratios > 1 + EPS_HIGH) & (adv > 0))
    return clipped, clipped.double().mean().item()


# ---------------------------------------------------------------------------- inputs and checks

def make_batch(seed=0, dim=16, vocab=40):
    gen = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    hidden = torch.randn(n, dim, generator=gen)
    weight = 3 * dim**-0.5 * torch.randn(vocab, dim, generator=gen)
    targets = torch.multinomial((hidden.double() @ weight.double().T).softmax(-1), 1, generator=gen).squeeze(-1)
    logp = logprobs_f64(hidden, weight, targets)
    shift = torch.repeat_interleave(torch.tensor(OLD_SHIFTS, dtype=torch.float64), torch.tensor(LENGTHS))
    noise = lambda scale: scale * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)  # noqa: E731
    batch = dict(
        hidden=hidden, weight=weight, targets=targets,
        cu_seqlens=torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32),
        advantages=torch.tensor(ADVANTAGES),
        old_logprobs=(logp + shift + noise(0.3)).float(),
        ref_logprobs=(logp + noise(1.0)).float(),
    )
    return {k: v.to(DEVICE) for k, v in batch.items()}


def leaves(batch):
    ours = [batch[k].detach().clone().requires_grad_() for k in ("hidden", "weight")]
    ref = [batch[k].detach().double().requires_grad_() for k in ("hidden", "weight")]
    return ours, ref


def assert_close(actual, expected, tol=TOL):
    """Norm-relative closeness, with unit scale for quantities near zero (a loss can be ~0)."""
    err = (actual.double().cpu() - expected.double().cpu()).norm().item()
    scale = max(expected.double().norm().item(), 1.0 if expected.ndim == 0 else 1e-30)
    assert torch.isfinite(actual).all(), "non-finite values"
    assert err <= tol * scale, f"relative error {err / scale:.2e} > {tol:.0e}"


def assert_far(actual, other, tol=10 * TOL):
    """Far outside assert_close's tolerance (same scale): the two would never pass for each other."""
    err = (actual.double().cpu() - other.double().cpu()).norm().item()
    assert err > tol * max(other.double().norm().item(), 1.0 if other.ndim == 0 else 1e-30)


def run(batch, backend, *, old, rollout=None, **options):
    """Our loss, gradients (hidden, weight) and stats next to the float64 reference's."""
    (hidden, weight), (hidden64, weight64) = leaves(batch)
    args = (batch["cu_seqlens"], batch["advantages"], old, batch["ref_logprobs"])
    tis = {} if rollout is None else dict(rollout_logprobs=rollout, tis_cap=TIS_CAP)
    loss, stats = grpo_loss(hidden, weight, batch["targets"], *args, beta=BETA, epsilon_low=EPS_LOW,
                            epsilon_high=EPS_HIGH, max_completion_length=MAX_LEN, backend=backend, **tis,
                            **options)
    grads = torch.autograd.grad(loss, (hidden, weight))
    level = options.get("importance_sampling_level", "token")
    loss64, ratios64, weights64 = reference_loss(
        logprobs_f64(hidden64, weight64, batch["targets"]), *args, level=level, loss_type=options["loss_type"],
        delta=options.get("delta"), rollout=rollout, tis_cap=TIS_CAP)
    grads64 = torch.autograd.grad(loss64, (hidden64, weight64))
    return (loss, *grads, stats), (loss64, *grads64, ratios64, weights64)


# ---------------------------------------------------------------------------- sequence level (GSPO)

CASES = {"on_policy": (False, None), "off_policy": (True, None), "off_policy_delta": (True, DELTA)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_level_matches_float64(backend, loss_type, case):
    batch = make_batch(seed=1)
    use_old, delta = CASES[case]
    old = batch["old_logprobs"] if use_old else None
    ours, ref = run(batch, backend, old=old, loss_type=loss_type, delta=delta, importance_sampling_level="sequence")
    for actual, expected in zip(ours[:3], ref[:3]):
        assert_close(actual, expected)

    stats, ratios64 = ours[3], ref[3]
    assert set(stats) == {"kl", "clip_ratio", "entropy"}
    assert all(not s.requires_grad and s.ndim == 0 for s in stats.values())
    clipped, fraction = expected_clip_ratio(ratios64, batch["cu_seqlens"], batch["advantages"])
    assert stats["clip_ratio"].item() == pytest.approx(fraction, abs=1e-7)
    if use_old:  # sequences clip on both sides (else this proves little), and delta caps one
        nonempty = torch.tensor(LENGTHS) > 0
        seq_ratio = ratios64[batch["cu_seqlens"][:-1].long().cpu()[nonempty]]
        seq_adv = batch["advantages"].cpu()[nonempty]
        assert clipped.any() and ((seq_ratio > 1 + EPS_HIGH) & (seq_adv > 0)).any()
        assert ((seq_ratio < 1 - EPS_LOW) & (seq_adv < 0)).any() and ((seq_ratio > DELTA) & (seq_adv < 0)).any()
    else:  # on-policy: s_i = 1 in value (its gradient still flows: the reference comparison above)
        assert torch.equal(ratios64, torch.ones_like(ratios64)) and stats["clip_ratio"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_matters_at_sequence_level(backend):
    batch = make_batch(seed=1)
    kw = dict(old=batch["old_logprobs"], loss_type="grpo", importance_sampling_level="sequence")
    with_delta, without = run(batch, backend, delta=DELTA, **kw)[0], run(batch, backend, **kw)[0]
    assert_far(with_delta[0], without[0])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_level_is_the_default_bit_for_bit(backend, loss_type):
    batch = make_batch(seed=2)
    results = []
    for extra in ({}, dict(importance_sampling_level="token")):
        (hidden, weight), _ = leaves(batch)
        loss, stats = grpo_loss(hidden, weight, batch["targets"], batch["cu_seqlens"], batch["advantages"],
                                batch["old_logprobs"], batch["ref_logprobs"], delta=DELTA, loss_type=loss_type,
                                max_completion_length=MAX_LEN, backend=backend, **extra)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight)), *stats.values()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_and_token_levels_differ(backend):
    batch = make_batch(seed=1)
    token, token64 = run(batch, backend, old=batch["old_logprobs"], loss_type="grpo")
    seq, seq64 = run(batch, backend, old=batch["old_logprobs"], loss_type="grpo", importance_sampling_level="sequence")
    for a, b in zip(token[:3], token64[:3]):  # the token-level reference above is the usual one
        assert_close(a, b)
    for a, b in zip(seq[:3], token[:3]):
        assert_far(a, b)
    assert seq[3]["clip_ratio"] != token[3]["clip_ratio"]


def test_sequence_level_gradient_passes_gradcheck():
    """The custom backward of the per-sequence mean against finite differences, in float64."""
    gen = torch.Generator().manual_seed(4)
    n = sum(LENGTHS)
    logp = (-2 * torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_()
    batch = make_batch(seed=1)
    # old log-probs near the current ones, so that no sequence clips and every token has a gradient
    old = (logp.detach() + 0.2 * torch.rand(n, generator=gen, dtype=torch.float64) - 0.1).float()

    def loss(lp):
        return grpo_loss_from_logprobs(lp, batch["cu_seqlens"].cpu(), batch["advantages"].cpu(), old, None,
                                       delta=DELTA, loss_type="bnpo", importance_sampling_level="sequence")[0]
    assert torch.autograd.gradcheck(loss, (logp,))
    grad = torch.autograd.grad(loss(logp), logp)[0]
    advantage = torch.repeat_interleave(torch.tensor(ADVANTAGES), torch.tensor(LENGTHS))
    assert torch.equal(grad != 0, advantage != 0)


# ---------------------------------------------------------------------------- truncated importance sampling

@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("use_old", [True, False], ids=["off_policy", "on_policy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tis_is_a_no_op_when_the_engines_agree(backend, use_old, level):
    batch = make_batch(seed=3)
    (hidden, weight), _ = leaves(batch)
    old = batch["old_logprobs"] if use_old else None
    with torch.no_grad():  # the engine's log-probs: bitwise the trainer's (pi_old, or pi itself on-policy)
        rollout = (old.clone() if use_old
                   else logprobs_module.token_logprobs(hidden, weight, batch["targets"], backend=backend))
    results = []
    for tis in ({}, dict(rollout_logprobs=rollout, tis_cap=TIS_CAP)):
        (hidden, weight), _ = leaves(batch)
        loss, stats = grpo_loss(hidden, weight, batch["targets"], batch["cu_seqlens"], batch["advantages"], old,
                                batch["ref_logprobs"], loss_type="dapo", importance_sampling_level=level,
                                backend=backend, **tis)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight)), stats))
    (*off, stats_off), (*on, stats_on) = results
    assert all(torch.equal(a, b) for a, b in zip(off, on))
    assert stats_on.pop("tis_weight").item() == 1.0 and "tis_weight" not in stats_off
    assert all(torch.equal(stats_on[k], stats_off[k]) for k in stats_off)


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("use_old", [True, False], ids=["off_policy", "on_policy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tis_weights_are_capped_and_weigh_the_clipped_term_only(backend, use_old, loss_type, level):
    batch = make_batch(seed=4)
    n = sum(LENGTHS)
    gen = torch.Generator().manual_seed(5)
    old = batch["old_logprobs"] if use_old else None
    base = old.cpu().double() if use_old else logprobs_f64(batch["hidden"], batch["weight"], batch["targets"])
    # the engine's log-probs: close to pi_old, but far lower on every third token (weights there hit the cap)
    gap = 0.2 * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    gap[::3] = 3.0
    rollout = (base - gap).float().to(DEVICE)

    ours, ref = run(batch, backend, old=old, rollout=rollout, loss_type=loss_type, importance_sampling_level=level)
    for actual, expected in zip(ours[:3], ref[:3]):
        assert_close(actual, expected)

    # the weights, computed independently: min(exp(old - rollout), C), with old = the f64 log-probs on-policy
    weights = torch.exp(base - rollout.cpu().double()).clamp(max=TIS_CAP)
    assert (weights == TIS_CAP).sum() >= n // 3 and (weights < 1).any()
    assert_close(ours[3]["tis_weight"], weights.mean())
    assert_close(ref[4], weights)
    assert not ours[3]["tis_weight"].requires_grad

    # the weights multiply the clipped term only: weighing the KL too (or not weighing at all) is caught
    (hidden64, weight64), logp_args = leaves(batch)[1], (batch["cu_seqlens"], batch["advantages"], old,
                                                         batch["ref_logprobs"])
    logp64 = logprobs_f64(hidden64, weight64, batch["targets"])
    on_kl = reference_loss(logp64, *logp_args, level=level, loss_type=loss_type, rollout=rollout,
                           tis_cap=TIS_CAP, tis_on_kl=True)[0]
    unweighted = reference_loss(logp64, *logp_args, level=level, loss_type=loss_type)[0]
    assert_far(ours[0], on_kl)
    assert_far(ours[0], unweighted)


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
def test_no_gradient_flows_into_old_or_rollout_logprobs(level):
    batch = make_batch(seed=4)
    (hidden, weight), _ = leaves(batch)
    old = batch["old_logprobs"].clone().requires_grad_()
    rollout = (batch["old_logprobs"] - 0.5).requires_grad_()  # weights exp(0.5), under the cap
    loss, stats = grpo_loss(hidden, weight, batch["targets"], batch["cu_seqlens"], batch["advantages"], old,
                            batch["ref_logprobs"], rollout_logprobs=rollout, tis_cap=TIS_CAP,
                            importance_sampling_level=level, backend="torch")
    assert loss.requires_grad and not stats["tis_weight"].requires_grad
    loss.backward()
    assert old.grad is None and rollout.grad is None
    assert hidden.grad is not None and weight.grad is not None


# ---------------------------------------------------------------------------- host reads and validation



def test_options_read_no_tensor_value_on_the_host_without_check_values():
    batch = make_batch(seed=1)
    (hidden, weight), _ = leaves(batch)
    with HostReads() as mode:
        loss, _ = grpo_loss(hidden, weight, batch["targets"], batch["cu_seqlens"], batch["advantages"],
                            batch["old_logprobs"], batch["ref_logprobs"], importance_sampling_level="sequence",
                            rollout_logprobs=batch["old_logprobs"] - 0.5, tis_cap=TIS_CAP, backend="torch",
                            check_values=False)
        loss.backward()
    assert not mode.reads, mode.reads


def _bad(**change):
    batch = make_batch()
    n = sum(LENGTHS)
    args = dict(logp=torch.full((n,), -1.0), cu_seqlens=batch["cu_seqlens"].cpu(),
                advantages=batch["advantages"].cpu(), rollout_logprobs=torch.full((n,), -1.2), tis_cap=2.0)
    args.update(change)
    return args


@pytest.mark.parametrize("change,match", [
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(importance_sampling_level=None), "importance_sampling_level"),
    (dict(tis_cap=None), "rollout_logprobs and tis_cap"),
    (dict(rollout_logprobs=None), "rollout_logprobs and tis_cap"),
    (dict(tis_cap=0.0), "tis_cap"),
    (dict(tis_cap=-1.0), "tis_cap"),
    (dict(tis_cap=float("nan")), "tis_cap"),
    (dict(tis_cap=torch.tensor(2.0)), "tis_cap"),
    (dict(rollout_logprobs=torch.zeros(sum(LENGTHS) - 1)), "rollout_logprobs"),
    (dict(rollout_logprobs=torch.zeros(sum(LENGTHS), 1)), "rollout_logprobs"),
    (dict(rollout_logprobs=torch.zeros(sum(LENGTHS), dtype=torch.long)), "rollout_logprobs"),
])
def test_invalid_options_are_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        grpo_loss_from_logprobs(**_bad(**change))
    batch = make_batch()
    args = _bad(**change)
    args.pop("logp")
    with pytest.raises(ValueError, match=match):
        grpo_loss(batch["hidden"], batch["weight"], batch["targets"], backend="torch", **args)


def test_valid_options_are_accepted():
    loss, stats = grpo_loss_from_logprobs(**_bad(importance_sampling_level="sequence"))
    assert torch.isfinite(loss) and stats["tis_weight"].item() == pytest.approx(math.exp(0.2))


@pytest.mark.skipif(TRITON_HERE, reason="the Triton tests already ran in this process")
def test_triton_in_fresh_process():
    run_triton_tests_in_fresh_process(__file__)
