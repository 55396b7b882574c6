"""The GRPO algorithm's stages (vcr1/grpo.py) on a tiny model with text prompts: log-probs at the sampling
temperature, the zero-weight micro-batch, and the warm-up's target ending like the chat template's turn."""
from types import SimpleNamespace

import pytest
import torch

from vcr1 import grpo
from vcr1.config import GRPOConfig
from vcr1.data.dataset import reference_tokens
from vcr1.data.sample import Sample
from vcr1.model import END_OF_TURN, install_lm_head, load_model, load_tokenizer
from vcr1.tasks import get_task


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer(None)
    model = load_model(None, tokenizer, seed=0)
    install_lm_head(model)
    return model, tokenizer


def _groups(tokenizer, rewards):
    """Two text prompts with two completions each (ragged)."""
    prompts = ["Where does the red circle appear?", "Which option is right?"]
    examples = tuple(SimpleNamespace(inputs={"input_ids": torch.tensor([tokenizer(p)["input_ids"]])},
                                     sample=SimpleNamespace(task="tg", uid=f"u{i}", solution={"span": [1.0, 2.0]}))
                     for i, p in enumerate(prompts))
    completions = ((torch.tensor([5, 9, 13]), torch.tensor([7, 8])), (torch.tensor([21]), torch.tensor([3, 4, 5, 6])))
    return grpo.Groups(examples, completions, rewards=torch.tensor(rewards))


def test_old_and_ref_logprobs_use_the_sampling_temperature(tiny):
    """π_old = π_ref = the policy: at any temperature the first ratio is 1 (the loss equals the on-policy
    loss) and the KL is 0."""
    model, tokenizer = tiny
    g = GRPOConfig(num_generations=2, temperature=0.6, num_iterations=2, beta=0.04)
    passes = dict(shared_prefix=True, backend="torch")
    batch = grpo.with_advantages(_groups(tokenizer, [1.0, 0.0, 0.3, 0.9]), g)
    with_old = grpo.with_logprobs(batch, g, old=model, ref=model, **passes)
    loss, stats = grpo.policy_loss(model, with_old, g, **passes)
    on_policy, _ = grpo.policy_loss(model, grpo.with_logprobs(batch, g, ref=model, **passes), g, **passes)
    assert float(stats["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(stats["clip_ratio"]) == 0.0
    assert float(loss.detach()) == pytest.approx(float(on_policy.detach()), rel=1e-5, abs=1e-7)


def test_a_micro_batch_with_no_scorable_group_trains_with_a_zero_loss(tiny, monkeypatch):
    model, tokenizer = tiny
    g = GRPOConfig(num_generations=2)

    def broken(*a, **kw):
        raise ValueError("reward bug")

    monkeypatch.setattr(get_task("tg"), "rewards", broken)
    scored = grpo.score_groups(_groups(tokenizer, [0.0] * 4), tokenizer, g, think=False)
    assert scored.failed == 2 and scored.groups.weight == 0 and len(scored.groups.examples) == 2
    batch = grpo.with_advantages(scored.groups, g)
    model.zero_grad()
    loss, _ = grpo.policy_loss(model, batch, g, shared_prefix=True, backend="torch")
    loss.backward()
    assert float(loss) == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(gr) == 0 for gr in grads)  # the passes ran; nothing moved


@pytest.mark.parametrize("task,solution,fields", [
    ("tg", {"span": [1.5, 4.0]}, {"event": "The red circle appears."}),
    ("gqa", {"answer": "(B)", "glue": [[1.0, 2.5]]}, {"question": "What?", "options": ["a", "b"]}),
])
def test_warm_up_target_ends_the_turn_as_the_chat_template_does(tiny, task, solution, fields):
    _, tokenizer = tiny
    sample = Sample(task=task, uid="u", video="v.mp4", fields=fields, solution=solution)
    answer = get_task(task).reference_answer(fields, solution, think=True)
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    turn = rendered.split("<|im_start|>assistant\n", 1)[1]
    expected = tokenizer(turn, add_special_tokens=False)["input_ids"]
    target = reference_tokens(sample, tokenizer, think=True)
    assert expected[:len(target)] == target and tokenizer.convert_ids_to_tokens(target[-1]) == END_OF_TURN
