"""The GRPO algorithm's stages (vcr1/grpo.py) on a tiny model with text prompts: log-probs at the sampling
temperature, the rollout's log-probs kept through scoring, the zero-weight micro-batch, the forward options
(--engine.attn_backend reaching the attention kernel), and the warm-up's target ending like the chat
template's turn."""
from types import SimpleNamespace

import pytest
import torch

from vcr1 import grpo, packing
from vcr1.config import ConfigError, GRPOConfig, parse_config
from vcr1.data.dataset import reference_tokens
from vcr1.data.sample import Sample
from vcr1.grpo import ForwardOptions
from vcr1.model import END_OF_TURN, install_lm_head, load_model, load_tokenizer, stop_ids
from vcr1.preflight import check
from vcr1.tasks import get_task
from vcr1.train import CHOICES

REFERENCE_HEAD = ForwardOptions(head_backend="torch")


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
    grpo_cfg = GRPOConfig(num_generations=2, temperature=0.6, num_iterations=2, beta=0.04)
    fwd = REFERENCE_HEAD
    batch = grpo.with_advantages(_groups(tokenizer, [1.0, 0.0, 0.3, 0.9]), grpo_cfg)
    with_old = grpo.with_logprobs(batch, grpo_cfg, fwd, old=model, ref=model)
    loss, stats = grpo.policy_loss(model, with_old, grpo_cfg, fwd)
    on_policy, _ = grpo.policy_loss(model, grpo.with_logprobs(batch, grpo_cfg, fwd, ref=model), grpo_cfg, fwd)
    assert float(stats["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(stats["clip_ratio"]) == 0.0
    assert float(loss.detach()) == pytest.approx(float(on_policy.detach()), rel=1e-5, abs=1e-7)


def test_a_micro_batch_with_no_scorable_group_trains_with_a_zero_loss(tiny, monkeypatch):
    model, tokenizer = tiny
    grpo_cfg = GRPOConfig(num_generations=2)

    def broken(*a, **kw):
        raise ValueError("reward bug")

    monkeypatch.setattr(get_task("tg"), "rewards", broken)
    scored = grpo.score_groups(_groups(tokenizer, [0.0] * 4), tokenizer, grpo_cfg, think=False)
    assert scored.failed == 2 and scored.groups.weight == 0 and len(scored.groups.examples) == 2
    batch = grpo.with_advantages(scored.groups, grpo_cfg)
    model.zero_grad()
    loss, _ = grpo.policy_loss(model, batch, grpo_cfg, REFERENCE_HEAD)
    loss.backward()
    assert float(loss) == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(gr) == 0 for gr in grads)  # the passes ran; nothing moved


def test_rollout_logprobs_survive_scoring_aligned_with_their_completions(tiny, monkeypatch):
    """rollout_groups keeps each completion's sampler log-probs beside its tokens; score_groups keeps the rows
    of the groups it keeps. Sampled without top-k/top-p, they are the trainer's recomputed log-probs."""
    model, tokenizer = tiny
    grpo_cfg = GRPOConfig(num_generations=3, max_completion_length=6, temperature=0.7, top_k=None, top_p=1.0)
    examples = _groups(tokenizer, [0.0] * 4).examples
    rolled = grpo.rollout_groups(model, list(examples), grpo_cfg, stop_ids=stop_ids(model, tokenizer), seed=0)
    assert len(rolled.rollout_logprobs) == len(rolled.completions) == 2
    for tokens, logprobs in zip(rolled.completions, rolled.rollout_logprobs):
        assert len(logprobs) == len(tokens) == 3
        assert [len(lp) for lp in logprobs] == [len(t) for t in tokens]
        assert all(lp.dtype == torch.float32 and bool((lp <= 0).all()) for lp in logprobs)
    recomputed = grpo.completion_logprobs(model, rolled, REFERENCE_HEAD, temperature=grpo_cfg.temperature)
    sampled = torch.cat([lp for group in rolled.rollout_logprobs for lp in group])
    torch.testing.assert_close(sampled, recomputed, atol=1e-4, rtol=0)

    calls = []

    def first_group_fails(text, solution, think):
        calls.append(text)
        if len(calls) == 1:
            raise ValueError("reward bug")
        return {"format": 1.0}

    monkeypatch.setattr(get_task("tg"), "rewards", first_group_fails)
    scored = grpo.score_groups(rolled, tokenizer, grpo_cfg, think=False)
    assert scored.failed == 1 and scored.groups.weight == 1.0
    assert scored.groups.examples == rolled.examples[1:] and scored.groups.completions == rolled.completions[1:]
    assert scored.groups.rollout_logprobs == rolled.rollout_logprobs[1:]  # the same tensors, in the same order
    assert scored.groups.lengths == [len(lp) for group in scored.groups.rollout_logprobs for lp in group]


def test_forward_options_are_the_configs_engine_options():
    """--engine.attn_backend takes "auto" or any of vcr1/packing.py's backends, nothing else, and is bound
    with the other forward options once, from the config."""
    for backend in ("auto", *packing.ATTENTION_BACKENDS):
        assert parse_config(["--engine.attn_backend", backend]).engine.attn_backend == backend
    with pytest.raises(ConfigError, match="attn_backend"):
        parse_config(["--engine.attn_backend", "xformers"], choices=CHOICES)
    assert any("attn_backend" in line for line in check(parse_config(["--engine.attn_backend", "xformers"])).problems)
    if not torch.cuda.is_available():  # flex has no CPU backward: refused at start-up, not at the first step
        flex = check(parse_config(["--engine.attn_backend", "flex"]))
        assert any("attn_backend flex" in line for line in flex.problems)
    assert ForwardOptions.from_config(parse_config([])) == ForwardOptions(check_values=False)
    cfg = parse_config(["--engine.attn_backend", "torch", "--engine.loss_backend", "torch",
                        "--engine.shared_prefix", "false", "--engine.check_values", "true"])
    assert ForwardOptions.from_config(cfg) == ForwardOptions(shared_prefix=False, attn_backend="torch",
                                                             head_backend="torch", check_values=True)


def test_attn_backend_reaches_the_packed_attention(tiny, monkeypatch):
    """The attention kernel ForwardOptions names runs every packed forward of with_logprobs and policy_loss."""
    model, tokenizer = tiny
    calls = []
    sdpa = packing._VARLEN["sdpa"]
    monkeypatch.setitem(packing._VARLEN, "sdpa", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    grpo_cfg = GRPOConfig(num_generations=2, beta=0.04)
    batch = grpo.with_advantages(_groups(tokenizer, [1.0, 0.0, 0.3, 0.9]), grpo_cfg)
    layers = model.config.text_config.num_hidden_layers

    auto = ForwardOptions(head_backend="torch")  # "auto" is the prefix backend on the CPU
    grpo.policy_loss(model, grpo.with_logprobs(batch, grpo_cfg, auto, ref=model), grpo_cfg, auto)
    assert not calls
    fwd = ForwardOptions(attn_backend="sdpa", head_backend="torch")
    loss, _ = grpo.policy_loss(model, grpo.with_logprobs(batch, grpo_cfg, fwd, ref=model), grpo_cfg, fwd)
    assert len(calls) == 2 * layers and torch.isfinite(loss)  # π_ref's forward and the policy's, every layer


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


def test_the_trainer_runs_its_packed_forwards_on_the_configured_attn_backend(tmp_path, monkeypatch):
    """--engine.attn_backend reaches every packed forward of a warm-up step and a GRPO step."""
    from vcr1 import train
    from vcr1.data.synthetic import generate
    from vcr1_testing import synthetic_tasks

    synthetic = tmp_path / "synthetic"
    generate(synthetic, tasks=synthetic_tasks(), seed=0, n_train=2, n_test=1)
    cfg = parse_config(["--output_dir", str(tmp_path / "o"), "--data.synthetic_dir", str(synthetic),
                        "--data.synthetic_train", "2", "--data.synthetic_test", "1", "--sft.steps", "1",
                        "--sft.batch_size", "2", "--max_steps", "1", "--prompts_per_step", "2",
                        "--grpo.num_generations", "2", "--grpo.max_completion_length", "4",
                        "--engine.attn_backend", "sdpa"])
    trainer = train.Trainer(cfg)
    assert trainer.fwd == ForwardOptions.from_config(cfg) and trainer.fwd.attn_backend == "sdpa"
    calls = []
    sdpa = packing._VARLEN["sdpa"]
    monkeypatch.setitem(packing._VARLEN, "sdpa", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    trainer.sft_step(train.Tally())
    assert calls
    calls.clear()
    trainer.grpo_step(train.Tally())
    assert calls
