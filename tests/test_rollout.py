"""vcr1.rollout on a tiny random Qwen2.5-VL with fabricated video prompts: greedy equality with HF
generate, the sampled distribution, seeds, log-probs, stops."""
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vcr1 import rollout
from vcr1.model import mrope_positions
from vcr1.rollout import Sampling, StaticCacheEngine, generate, hf_generate
from vcr1_testing import requires_cuda

VOCAB, VIDEO, V_START, V_END = 300, 295, 293, 294
NEVER = 299  # an eos id the checks below keep out of the completions


def tiny_config() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=297, pad_token_id=298,
            bos_token_id=298, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
            fullatt_block_indexes=[1]),
        image_token_id=296, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END,
        tie_word_embeddings=False,
    )


def make_model(device="cpu", dtype=torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config())
    model.config._attn_implementation = "sdpa"
    model.lm_head.weight.data.mul_(8)  # logits spread over a few units, so sampling checks have power
    return model.to(device, dtype).eval()


def make_prompt(n_text: int, t: int, h: int, w: int, seconds: float, config, seed: int) -> dict:
    """Random text around one <|video_pad|> block of t·h·w/4 tokens, random patches, vcr1's positions."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 290, (n_text,), generator=gen)
    video = torch.full((t * h * w // 4,), VIDEO)
    ids = torch.cat([text[:3], torch.tensor([V_START]), video, torch.tensor([V_END]), text[3:]])[None]
    grid, sec = torch.tensor([[t, h, w]]), torch.tensor([seconds])
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.randn(t * h * w, 1176, generator=gen), "video_grid_thw": grid,
        "second_per_grid_ts": sec, "mm_token_type_ids": (ids == VIDEO).int() * 2,
        "position_ids": mrope_positions(ids[0], grid, sec, config)[:, None],
    }


# (text tokens, t, h, w, seconds per temporal patch): the first two videos are long for their size, where
# vcr1's text-after-video position (block max + 1) differs from transformers 5's (start + max(H, W)).
SHAPES = [(6, 2, 4, 4, 2.0), (11, 4, 4, 8, 1.0), (19, 2, 8, 4, 1.5)]


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def prompts(model):
    return [make_prompt(*shape, model.config, seed=i) for i, shape in enumerate(SHAPES)]


def recompute_logprobs(model, prompt, completion, temperature=1.0):
    """Log-probs of a completion from one full forward over prompt ‖ completion with vcr1's positions: the
    trainer's distribution, log_softmax(logits / temperature) over the full vocabulary."""
    pos = prompt["position_ids"]
    new = pos.max() + 1 + torch.arange(completion.length - 1)
    ids = torch.cat([prompt["input_ids"], completion.token_ids[None, :-1]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.cat([pos, new.expand(3, 1, -1)], 2),
                       pixel_values_videos=prompt["pixel_values_videos"], video_grid_thw=prompt["video_grid_thw"],
                       second_per_grid_ts=prompt["second_per_grid_ts"]).logits[0]
    logits = logits[prompt["input_ids"].shape[1] - 1:]
    logp = (logits.float() / temperature).log_softmax(-1)
    return logp.gather(-1, completion.token_ids[:, None])[:, 0]


def test_prompts_exercise_the_position_convention(prompts, model):
    merge = model.config.vision_config.spatial_merge_size
    for (n_text, _, h, w, _), p in list(zip(SHAPES, prompts))[:2]:
        hf_next = 3 + 1 + max(h, w) // merge + 1 + (n_text - 3)  # text, start, video, end, text: HF 5's count
        assert int(p["position_ids"].max()) + 1 > hf_next


def test_greedy_matches_hf_with_ragged_stops(model, prompts):
    free = generate(model, prompts, num_samples=2, max_new_tokens=12, greedy=True, eos_token_id=NEVER)
    seqs = [group[0].token_ids for group in free]
    assert all(NEVER not in s for s in seqs)
    eos = [int(seqs[0][2]), int(seqs[1][6])]  # rows stop at different steps, some never
    fast = generate(model, prompts, num_samples=2, max_new_tokens=12, greedy=True, eos_token_id=eos)
    ref = hf_generate(model, prompts, num_samples=2, max_new_tokens=12, greedy=True, eos_token_id=eos)

    lengths = []
    for seq, f_group, r_group in zip(seqs, fast, ref):
        hits = [i for i, tok in enumerate(seq.tolist()) if tok in eos]
        want = hits[0] + 1 if hits else 12
        for f, r in zip(f_group, r_group):
            assert f.token_ids.tolist() == r.token_ids.tolist() == seq[:want].tolist()
            assert f.length == want and f.finish_reason == r.finish_reason == ("eos" if hits else "length")
            # tight: HF on its own 3-D positions is off by more than 1e-3 on the first two prompts
            torch.testing.assert_close(f.logprobs, r.logprobs, atol=2e-5, rtol=0)
        lengths.append(want)
    assert len(set(lengths)) == 3 and 12 in lengths  # ragged: two stops at different steps, one runs out


def truncated(logits, temperature, keep):
    """softmax(logits / T) over the `keep` most likely tokens, zero elsewhere."""
    probs = torch.zeros_like(logits)
    top = logits.topk(keep)
    probs[top.indices] = (top.values / temperature).softmax(-1)
    return probs


def nucleus_size(logits, temperature, top_p):
    """How many of the most likely tokens the top-p filter keeps: until their mass reaches top_p."""
    probs = (logits / temperature).softmax(-1).sort(descending=True).values.tolist()
    mass, n = 0.0, 0
    while mass < top_p:
        mass, n = mass + probs[n], n + 1
    return n


def chi2_pvalue(counts, probs):
    """Pearson's chi-square p-value of counts under probs; 0 when a zero-probability token was drawn."""
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    big = expected >= 5
    small = (~big) & (probs > 0)
    obs = torch.cat([counts[big], counts[small].sum()[None]]) if small.any() else counts[big]
    exp = torch.cat([expected[big], expected[small].sum()[None]]) if small.any() else expected[big]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2), stat / 2))


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 8, 1.0), (1.3, None, 0.6)])
def test_first_token_distribution(model, prompts, temperature, top_k, top_p):
    n = 20_000
    out = generate(model, prompts[:1], num_samples=n, max_new_tokens=1, temperature=temperature, top_k=top_k,
                   top_p=top_p, eos_token_id=NEVER, seed=0)
    counts = torch.bincount(torch.stack([c.token_ids[0] for c in out[0]]), minlength=VOCAB).double()
    with torch.no_grad():
        logits = model(**{k: v for k, v in prompts[0].items() if k != "mm_token_type_ids"}).logits[0, -1].double()
    keep = top_k if top_k else nucleus_size(logits, temperature, top_p)
    assert 2 < keep < VOCAB // 2  # the filter binds
    assert chi2_pvalue(counts, truncated(logits, temperature, keep)) > 1e-3
    for wrong_t, wrong_keep in [(temperature * 1.15, keep), (temperature / 1.15, keep),
                                (temperature, keep - 1), (temperature, keep + 1)]:
        assert chi2_pvalue(counts, truncated(logits, wrong_t, wrong_keep)) < 1e-3


def test_seed_determinism(model, prompts):
    kw = dict(num_samples=3, max_new_tokens=8, temperature=1.0, top_k=50, eos_token_id=NEVER)
    a, b, c = (generate(model, prompts, seed=s, **kw) for s in (1, 1, 2))
    ids = [[x.token_ids.tolist() for x in group] for group in a]
    assert ids == [[x.token_ids.tolist() for x in group] for group in b]
    assert ids != [[x.token_ids.tolist() for x in group] for group in c]
    assert all(torch.equal(x.logprobs, y.logprobs) for ga, gb in zip(a, b) for x, y in zip(ga, gb))
    assert len({tuple(x) for x in ids[0]}) > 1  # a prompt's samples differ from each other


@pytest.mark.parametrize("rollout", [generate, hf_generate])
def test_logprobs_match_full_forward(model, prompts, rollout):
    kw = dict(temperature=0.8, top_k=40, top_p=0.95)
    out = rollout(model, prompts, num_samples=2, max_new_tokens=10, seed=3, eos_token_id=NEVER, **kw)
    for prompt, group in zip(prompts, out):
        for c in group:
            assert c.logprobs.dtype == torch.float32 and c.length == 10
            # sampled under top-k / top-p, scored over the full vocabulary as the trainer scores them
            expected = recompute_logprobs(model, prompt, c, kw["temperature"])
            torch.testing.assert_close(c.logprobs, expected, atol=1e-4, rtol=0)


def test_max_length_and_finish_reasons(model, prompts):
    out = generate(model, prompts, num_samples=2, max_new_tokens=5, seed=0, eos_token_id=NEVER)
    assert all(c.length == 5 and c.finish_reason == "length" for group in out for c in group)
    first = generate(model, prompts, num_samples=1, max_new_tokens=1, greedy=True, eos_token_id=NEVER)
    eos = int(first[1][0].token_ids[0])
    out = generate(model, prompts[1:2], num_samples=2, max_new_tokens=6, greedy=True, eos_token_id=[NEVER, eos])
    assert all(c.token_ids.tolist() == [eos] and c.finish_reason == "eos" for c in out[0])


def test_positions_default_to_mrope(model, prompts):
    bare = [{k: v for k, v in p.items() if k != "position_ids"} for p in prompts]
    a = generate(model, prompts, num_samples=1, max_new_tokens=6, greedy=True, eos_token_id=NEVER)
    b = generate(model, bare, num_samples=1, max_new_tokens=6, greedy=True, eos_token_id=NEVER)
    assert all(torch.equal(x[0].logprobs, y[0].logprobs) for x, y in zip(a, b))


def test_windows_do_not_change_results(model, prompts):
    """A step that reads more generated slots than it has written (a CUDA graph's rounded-up window: the
    extra slots are masked) gives the logits of a step reading exactly those written (eager mode)."""
    batch = rollout.PrefilledBatch(model, prompts, num_samples=2, max_new_tokens=9)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for step in range(batch.slots):
            tokens = torch.randint(0, 290, (len(prompts) * 2,), generator=gen)
            at = torch.tensor([step])
            exact = batch._step(tokens, at, step + 1)  # writes this step's keys; the calls below rewrite them
            for w in sorted({min(step + 3, batch.slots), batch.slots}):
                torch.testing.assert_close(batch._step(tokens, at, w), exact, atol=1e-6, rtol=0)


def test_retired_prompts_leave_the_batch_without_changing_the_rest(model, prompts, monkeypatch):
    """Prompts whose samples all stopped leave the eager batch; the prompts still answering get the same
    greedy tokens and log-probs as when every row decodes to the end."""
    free = generate(model, prompts, num_samples=2, max_new_tokens=10, greedy=True, eos_token_id=NEVER)
    eos = [int(free[0][0].token_ids[1]), int(free[2][0].token_ids[4])]
    monkeypatch.setattr(rollout, "CHECK_EVERY", 100)  # never checked: no prompt retires
    whole = generate(model, prompts, num_samples=2, max_new_tokens=10, greedy=True, eos_token_id=eos)
    retired, retire = [], rollout.PrefilledBatch.retire
    monkeypatch.setattr(rollout, "CHECK_EVERY", 1)
    monkeypatch.setattr(rollout.PrefilledBatch, "retire",
                        lambda self, done: (retired.append(done.tolist()), retire(self, done)))
    early = generate(model, prompts, num_samples=2, max_new_tokens=10, greedy=True, eos_token_id=eos)
    assert retired and sum(sum(d) for d in retired) >= 2  # at least two prompts left before the end
    for a, b in zip(whole, early):
        for x, y in zip(a, b):
            assert x.token_ids.tolist() == y.token_ids.tolist() and x.finish_reason == y.finish_reason
            torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-6, rtol=0)


@requires_cuda
def test_cuda_graphs_match_eager():
    model = make_model("cuda")
    prompts = [make_prompt(*shape, model.config, seed=i) for i, shape in enumerate(SHAPES)]
    sampling = Sampling(num_samples=4, max_new_tokens=150, greedy=True, eos_token_id=NEVER)  # crosses a window
    eager = StaticCacheEngine(model, cuda_graphs=False).generate(prompts, sampling)
    graphed = StaticCacheEngine(model, cuda_graphs=True).generate(prompts, sampling)
    for ge, gg in zip(eager, graphed):
        for e, g in zip(ge, gg):
            assert e.token_ids.tolist() == g.token_ids.tolist()
            torch.testing.assert_close(e.logprobs, g.logprobs, atol=1e-5, rtol=0)
    sampled = Sampling(num_samples=4, max_new_tokens=150, temperature=1.0, top_k=50, eos_token_id=NEVER, seed=0)
    a, b = (StaticCacheEngine(model).generate(prompts, sampled) for _ in range(2))
    tokens = [[[c.token_ids.tolist() for c in group] for group in run] for run in (a, b)]
    assert tokens[0] == tokens[1]



def test_prompts_sharing_a_video_encode_it_once(model, prompts):
    """Two prompts holding one decoded clip (one pixel tensor): the vision tower runs once for both, and
    the completions equal those of the same prompts with the clip copied (the tower run per prompt)."""
    first = prompts[0]
    t, h, w = first["video_grid_thw"][0].tolist()
    twin = make_prompt(9, t, h, w, 2.0, model.config, seed=5)
    twin["pixel_values_videos"] = first["pixel_values_videos"]
    copied = dict(twin, pixel_values_videos=first["pixel_values_videos"].clone())
    calls = []
    hook = model.model.visual.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        shared = generate(model, [first, twin, prompts[1]], num_samples=2, max_new_tokens=6, seed=3)
        shared_calls, calls[:] = list(calls), []
        separate = generate(model, [first, copied, prompts[1]], num_samples=2, max_new_tokens=6, seed=3)
    finally:
        hook.remove()
    patches = [first["pixel_values_videos"].shape[0], prompts[1]["pixel_values_videos"].shape[0]]
    assert shared_calls == patches and calls == [patches[0], *patches]
    for s_group, c_group in zip(shared, separate):
        for s, c in zip(s_group, c_group):
            assert torch.equal(s.token_ids, c.token_ids) and torch.equal(s.logprobs, c.logprobs)
