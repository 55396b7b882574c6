"""Advantages and every GRPO loss type against values computed by hand (docs/paper.md §1, TRL definitions)."""
import math

import pytest
import torch

from vcr1.loss import group_advantages, sft_loss
from vcr1_kernels import grpo_loss
from vcr1_testing import HostReads

# Two groups of G=2. Group 1 rewards (1, 0): mean 0.5, unbiased std sqrt(0.5) → A = ±0.5 / (0.70711 + 1e-4).
REWARDS = torch.tensor([1.0, 0.0, 3.0, 3.0])


def test_group_advantages_by_hand():
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert torch.allclose(group_advantages(REWARDS, 2, "group"), torch.tensor([a, -a, 0.0, 0.0]), atol=1e-6)


def test_batch_and_none_scaling_by_hand():
    # batch: the std of all four rewards (unbiased): mean 1.75, squared deviations 0.5625+3.0625+1.5625+1.5625
    # = 6.75, so std = sqrt(6.75 / 3) = 1.5
    std = 1.5
    assert torch.allclose(group_advantages(REWARDS, 2, "batch"),
                          torch.tensor([0.5, -0.5, 0, 0]) / (std + 1e-4), atol=1e-6)
    assert torch.allclose(group_advantages(REWARDS, 2, "batch", batch_std=torch.tensor(2.0)),
                          torch.tensor([0.5, -0.5, 0, 0]) / 2.0001, atol=1e-6)
    assert torch.equal(group_advantages(REWARDS, 2, "none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_advantages_reject_bad_input():
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 2, "sequence")


# Loss case: 2 sequences (1 and 3 tokens), vocab 2 with a zero head so logp = log(1/2) for every token.
LOGP = math.log(0.5)
SHIFT_OLD = [0.5, 0.0, 0.3, -0.5]  # logp - old: ratios e^0.5, 1, e^0.3, e^-0.5
SHIFT_REF = [0.1, 0.2, 0.0, -0.3]  # ref - logp
ADV = [1.0, -2.0]
BETA = 0.04


def _case(**kw):
    torch.manual_seed(0)
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.zeros(2, 3)
    logp = torch.full((4,), LOGP, dtype=torch.float64)
    old = logp - torch.tensor(SHIFT_OLD, dtype=torch.float64)
    ref = logp + torch.tensor(SHIFT_REF, dtype=torch.float64)
    return grpo_loss(hidden, weight, torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 4], dtype=torch.int32),
                     torch.tensor(ADV), old.float(), ref.float(), beta=BETA, backend="torch", **kw)


def _per_token(delta=None):
    """-min(r·A, clip(r)·A) + β·k3, written out token by token."""
    k3 = [math.exp(d) - d - 1 for d in SHIFT_REF]
    r = [math.exp(s) for s in SHIFT_OLD]
    if delta is not None:
        r = [min(x, delta) for x in r]
    adv = [ADV[0], ADV[1], ADV[1], ADV[1]]
    clip = [min(max(x, 0.8), 1.2) for x in [math.exp(s) for s in SHIFT_OLD]]
    return [-min(r[i] * adv[i], clip[i] * adv[i]) + BETA * k3[i] for i in range(4)]


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", lambda t: (t[0] + sum(t[1:]) / 3) / 2),
    ("bnpo", lambda t: sum(t) / 4),
    ("dr_grpo", lambda t: sum(t) / (2 * 4)),
    ("dapo", lambda t: sum(t) / 4),
])
def test_loss_types_by_hand(loss_type, expected):
    loss, stats = _case(loss_type=loss_type, max_completion_length=4)
    t = _per_token()
    # the values written out: token 0 is clipped high (A>0), token 3 clipped low (A<0)
    assert t[0] == pytest.approx(-1.2 + BETA * (math.exp(0.1) - 1.1))
    assert t[2] == pytest.approx(2 * math.exp(0.3))
    assert loss.item() == pytest.approx(expected(t), rel=1e-5)
    assert stats["clip_ratio"].item() == pytest.approx(0.5)
    assert stats["kl"].item() == pytest.approx(sum(math.exp(d) - d - 1 for d in SHIFT_REF) / 4, rel=1e-5)


def test_dapo_normalizer_and_delta_by_hand():
    loss, _ = _case(loss_type="dapo", normalizer=10.0)
    assert loss.item() == pytest.approx(sum(_per_token()) / 10, rel=1e-5)
    loss, _ = _case(loss_type="grpo", delta=1.3)
    t = _per_token(delta=1.3)
    assert t[2] == pytest.approx(2.6)
    assert loss.item() == pytest.approx((t[0] + sum(t[1:]) / 3) / 2, rel=1e-5)


def test_on_policy_ratio_is_one_and_gradient_is_minus_advantage():
    """μ = 1 (the paper): ratio = exp(logp - logp.detach()) = 1, d loss / d logp = -A / |o| per token."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(5, 4, requires_grad=True)
    targets = torch.tensor([1, 2, 3])
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    adv = torch.tensor([0.7, -1.3])
    loss, stats = grpo_loss(hidden, weight, targets, cu, adv, beta=0.0, backend="torch")
    loss.backward()
    # reference: the same gradient from the surrogate -(A/|o|)·logp summed, averaged over sequences
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp = torch.log_softmax(h2 @ w2.T, -1).gather(1, targets[:, None])[:, 0]
    (-(0.7 * logp[0] + (-1.3) * logp[1:].sum() / 2) / 2).backward()
    assert torch.allclose(hidden.grad, h2.grad, atol=1e-6) and torch.allclose(weight.grad, w2.grad, atol=1e-6)
    assert loss.item() == pytest.approx(-(0.7 - 1.3) / 2, abs=1e-6)
    assert stats["clip_ratio"].item() == 0.0


def test_sft_loss_is_token_mean_then_sequence_mean():
    logp = torch.tensor([-1.0, -2.0, -4.0])
    assert sft_loss(logp, torch.tensor([0, 1, 3])).item() == pytest.approx((1.0 + 3.0) / 2)




@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_loss_reads_no_tensor_value_on_the_host_unless_asked(loss_type):
    """The trainer's loss path without --engine.check_values waits for nothing (forward and backward);
    with it, the value checks read the tensors."""
    torch.manual_seed(0)
    hidden = torch.randn(7, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    kw = dict(cu_seqlens=cu, advantages=torch.tensor([0.5, -0.5]), ref_logprobs=torch.randn(7) - 3, beta=0.04,
              loss_type=loss_type, normalizer=torch.tensor(7.0) if loss_type == "dapo" else None, backend="torch")
    for check, expect_reads in ((False, False), (True, True)):
        with HostReads() as mode:
            loss, _ = grpo_loss(hidden, weight, targets, check_values=check, **kw)
            loss.backward()
        assert bool(mode.reads) == expect_reads, mode.reads
