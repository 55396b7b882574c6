"""Rollouts: G sampled completions per video prompt.

The fast engine prefills each prompt once (the vision tower once per distinct decoded video) and
decodes the G samples of every prompt of the batch together from two static KV caches: the prompts'
own keys/values, shared by their G samples and never copied, and the samples' generated tokens. On
CUDA each decode step is a replayed CUDA graph; in eager mode (CPU, ZeRO-3) a prompt whose G samples
have all stopped leaves the batch, so a long answer does not keep short ones computing. `hf_generate`
is the reference: HF `generate(num_return_sequences=G)` per prompt.

Both follow vcr1's 3-D positions (`vcr1.model.prompt_positions`, then `answer_start` + k for generated
token k on all three rows: the release rule, see docs/design.md).

Log-probs are each sampled token's log_softmax(logits / temperature) over the full vocabulary: the
distribution the trainer recomputes, so their difference measures only the two engines' kernels and
precision. Tokens are drawn after the top-k and top-p filters (`process_logits`), whose truncation the
log-probs leave out (docs/design.md). Greedy decoding reports log_softmax(logits).

Under DeepSpeed ZeRO-3 the weights are sharded: the caller wraps these calls in
`vcr1.distributed.generation_weights`, which gathers the full weights once and removes ZeRO-3's per-module
hooks for the call (DeepSpeed's `unwrap_model_for_generation`), so decoding makes no collective. Either
engine takes the model as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vcr1.model import accepts_mm_token_type_ids, answer_start, mm_token_type_ids, prompt_positions, stop_ids
from vcr1.monitor import nvtx_range
from vcr1.packing import video_embeds

VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
WINDOW = 128  # generated keys are read in windows of this many slots: one CUDA graph per window size
CHECK_EVERY = 8  # decode steps between checks that every row has stopped (each check syncs the GPU)


@dataclass(frozen=True)
class Sampling:
    """How to sample: G = num_samples completions per prompt of at most max_new_tokens tokens."""
    num_samples: int
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    greedy: bool = False
    eos_token_id: int | list[int] | None = None
    seed: int | None = None


@dataclass
class Completion:
    """One sampled completion: its tokens (with the EOS when one was produced) and their log-probs."""
    token_ids: torch.Tensor  # 1-D long
    logprobs: torch.Tensor  # 1-D fp32, see the module docstring
    finish_reason: str  # "eos" or "length"

    @property
    def length(self) -> int:
        return len(self.token_ids)


# ---------------------------------------------------------------------------------------- sampling

def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float = 1.0) -> torch.Tensor:
    """fp32 logits / temperature with the tokens outside top-k, then outside the top-p nucleus, at -inf.

    HF's order and semantics: a token survives top-p when the probability of the tokens ranked above it
    is below top_p, so the most likely token always survives.
    """
    x = logits.float() / temperature
    if top_k is not None and top_k < x.shape[-1]:
        x = x.masked_fill(x < x.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
    if top_p < 1.0:
        ranked, order = x.sort(dim=-1, descending=True)
        p = ranked.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None):
    """Next token [N] of each row, drawn after top-k / top-p, and its fp32 log-prob [N] under the unfiltered
    log_softmax(logits / temperature) (the module docstring says why)."""
    if sampling.greedy:
        tokens = logits.argmax(-1)
        logp = logits.float().log_softmax(-1)
    else:
        filtered = process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
        tokens = torch.multinomial(filtered.log_softmax(-1).exp(), 1, generator=generator)[:, 0]
        logp = (logits.float() / sampling.temperature).log_softmax(-1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def _stops(model, eos_token_id) -> list[int]:
    """The stop ids: those given, else `vcr1.model.stop_ids` of the model."""
    if eos_token_id is None:
        return stop_ids(model)
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


# ----------------------------------------------------------------------------------------- prefill

def _video(prompt: dict, device) -> dict:
    return {k: prompt[k].to(device) for k in VIDEO_KEYS if prompt.get(k) is not None}


def _prefill(model, prompt: dict, videos: dict[int, torch.Tensor]):
    """One prompt through the whole model: per-layer keys/values [kv_heads, L, d], last logits, next position.

    videos caches the vision tower's output by pixel tensor: prompts built from one decoded clip share
    that tensor (as in the packed training forward), so the tower runs once per distinct video.
    """
    device = model.lm_head.weight.device
    pos = prompt_positions(prompt, model.config).to(device)[:, None]
    ids = prompt["input_ids"].to(device)
    embeds = model.model.get_input_embeddings()(ids)
    pixels = prompt.get("pixel_values_videos")
    if pixels is not None:
        if id(pixels) not in videos:
            videos[id(pixels)] = video_embeds(model, pixels.to(device), prompt["video_grid_thw"].to(device))
        is_video = (ids == model.config.video_token_id)[..., None]
        embeds = embeds.masked_scatter(is_video, videos[id(pixels)].to(embeds.dtype))
    out = model.model(inputs_embeds=embeds, position_ids=pos, use_cache=True)
    # transformers 5.24 renamed the output's past_key_values to cache
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    if cache is None:
        raise RuntimeError("the prefill returned no KV cache: rollouts need the model in eval mode when it "
                           "uses gradient checkpointing")
    kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    return kv, model.lm_head(out.last_hidden_state[0, -1]).float(), answer_start(pos)


# ------------------------------------------------------------------------------------------ decode

def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _by_prompt(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P·G, kv, r, n] -> [P, kv, G·r, n]: a prompt's G samples become extra query rows of its keys."""
    rows, kv, r, n = x.shape
    p = rows // group_size
    return x.view(p, group_size, kv, r, n).transpose(1, 2).reshape(p, kv, group_size * r, n)


def _by_row(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of _by_prompt."""
    p, kv, gr, n = x.shape
    r = gr // group_size
    return x.view(p, kv, group_size, r, n).transpose(1, 2).reshape(p * group_size, kv, r, n)


def _attend(q, kp, vp, kg, vg, bias, group_size, scale):
    """One softmax over [prompt keys ‖ generated keys] for each row's query q [N, kv, r, d].

    kp, vp [P, kv, L, d] are read once per prompt for all its G samples; kg, vg [N, kv, W, d] per row.
    """
    on_prompt = _by_row(_by_prompt(q, group_size) @ kp.transpose(-1, -2), group_size)
    scores = torch.cat([on_prompt, q @ kg.transpose(-1, -2)], dim=-1)
    p = (scores.float() * scale + bias).softmax(-1).to(q.dtype)
    p_prompt, p_generated = p.split([kp.shape[2], kg.shape[2]], dim=-1)
    return _by_row(_by_prompt(p_prompt, group_size) @ vp, group_size) + p_generated @ vg


class PrefilledBatch:
    """Prompts prefilled once, their G samples each ready to decode a token per `decode` call.

    Static caches: the prompts' keys/values [layers, P, kv_heads, L_max, d] (left-aligned, shorter
    prompts masked), shared by their G samples, and the samples' own [layers, P·G, kv_heads, T, d], where
    every row writes decode step t at slot t. Row n is sample n % G of prompt n // G.
    """

    def __init__(self, model, prompts: list[dict], num_samples: int, max_new_tokens: int,
                 cuda_graphs: bool = False):
        text = model.config.text_config
        if getattr(text, "use_sliding_window", False):
            raise NotImplementedError("sliding-window attention layers are not supported by the static cache")
        self.model, self.group_size = model, num_samples
        self.lm = model.model.language_model
        attn = self.lm.layers[0].self_attn
        self.d, self.kv_heads = attn.head_dim, text.num_key_value_heads
        self.scale = self.d ** -0.5
        weight = model.lm_head.weight
        layers, n = len(self.lm.layers), len(prompts) * num_samples

        lengths = torch.tensor([prompt["input_ids"].shape[1] for prompt in prompts], device=weight.device)
        self.kp = weight.new_zeros(layers, len(prompts), self.kv_heads, int(lengths.max()), self.d)
        self.vp = torch.zeros_like(self.kp)
        logits, next_pos, videos = [], [], {}
        for i, prompt in enumerate(prompts):
            kv, last, pos = _prefill(model, prompt, videos)
            for layer, (k, v) in enumerate(kv):
                self.kp[layer, i, :, :k.shape[1]] = k
                self.vp[layer, i, :, :v.shape[1]] = v
            logits.append(last)
            next_pos.append(pos)
        self.first_logits = torch.stack(logits)
        self.next_pos = torch.tensor(next_pos, device=weight.device).repeat_interleave(num_samples)
        keep = torch.arange(self.kp.shape[3], device=weight.device) < lengths[:, None]
        self.prompt_bias = torch.zeros(keep.shape, device=weight.device).masked_fill(~keep, float("-inf"))
        self.prompt_bias = self.prompt_bias.repeat_interleave(num_samples, 0)[:, None, None]

        self.slots = max(max_new_tokens - 1, 1)  # the last token sampled is never fed back
        self.kg = weight.new_zeros(layers, n, self.kv_heads, self.slots, self.d)
        self.vg = torch.zeros_like(self.kg)
        rotary = self.lm.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.float(), getattr(rotary, "attention_scaling", 1.0)

        self.graphs = {} if cuda_graphs else None
        if cuda_graphs:
            self.pool = torch.cuda.graph_pool_handle()
            self.static_tokens = torch.zeros(n, dtype=torch.long, device=weight.device)
            self.static_step = torch.zeros(1, dtype=torch.long, device=weight.device)

    def window(self, step: int) -> int:
        """How many generated slots step `step` reads: its own and all before, rounded up to WINDOW when the
        step is a CUDA graph (one graph per window size); exactly those in eager mode."""
        if self.graphs is None:
            return step + 1
        return min(self.slots, WINDOW * (step // WINDOW + 1))

    def retire(self, done: torch.Tensor):
        """Stop decoding the prompts marked in `done` [P] (bool, in this batch's current prompt order): their
        caches and rows leave the batch, so later steps compute only the prompts still answering."""
        if self.graphs is not None:
            raise RuntimeError("a graphed batch keeps its shapes: its rows cannot retire")
        keep = (~done).nonzero()[:, 0]
        rows = (keep[:, None] * self.group_size + torch.arange(self.group_size, device=keep.device)).reshape(-1)
        self.kp, self.vp = self.kp[:, keep], self.vp[:, keep]
        self.kg, self.vg = self.kg[:, rows], self.vg[:, rows]
        self.next_pos, self.prompt_bias = self.next_pos[rows], self.prompt_bias[rows]

    def decode(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed each row's token of decode step `step` (its step-th generated token); logits [N, V] fp32."""
        w = self.window(step)
        if self.graphs is None:
            return self._step(tokens, torch.tensor([step], device=tokens.device), w)
        self.static_tokens.copy_(tokens)
        self.static_step.fill_(step)
        if w not in self.graphs:
            self.graphs[w] = self._capture(w)
        graph, logits = self.graphs[w]
        graph.replay()
        return logits

    def _capture(self, w: int):
        """A CUDA graph of one step reading w generated slots (the warm-up writes what the replay will)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(self.static_tokens, self.static_step, w)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(self.static_tokens, self.static_step, w)
        return graph, logits

    def _step(self, tokens: torch.Tensor, step: torch.Tensor, w: int) -> torch.Tensor:
        x = self.lm.embed_tokens(tokens)
        # Generated tokens have equal t/h/w positions, where mRoPE is plain RoPE.
        freqs = (self.next_pos + step).float()[:, None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        cos, sin = (emb.cos() * self.rope_scale).to(x.dtype), (emb.sin() * self.rope_scale).to(x.dtype)
        later = torch.arange(w, device=x.device) > step
        gen_bias = torch.zeros(w, device=x.device).masked_fill(later, float("-inf"))
        bias = torch.cat([self.prompt_bias, gen_bias.expand(*self.prompt_bias.shape[:3], w)], dim=-1)
        for i, layer in enumerate(self.lm.layers):
            x = x + self._attention(i, layer.self_attn, layer.input_layernorm(x), cos, sin, step, w, bias)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.lm.norm(x)).float()

    def _attention(self, i, attn, h, cos, sin, step, w, bias):
        n = h.shape[0]
        q = _rotate(attn.q_proj(h).view(n, -1, self.d), cos, sin)
        k = _rotate(attn.k_proj(h).view(n, -1, self.d), cos, sin)
        self.kg[i].index_copy_(2, step, k[:, :, None])
        self.vg[i].index_copy_(2, step, attn.v_proj(h).view(n, -1, 1, self.d))
        q = q.view(n, self.kv_heads, -1, self.d)
        o = _attend(q, self.kp[i], self.vp[i], self.kg[i, :, :, :w], self.vg[i, :, :, :w], bias, self.group_size,
                    self.scale)
        return attn.o_proj(o.reshape(n, -1))


# ----------------------------------------------------------------------------------------- engines

def _completions(tokens, logprobs, lengths, stopped, group_size: int) -> list[list[Completion]]:
    """Rows of [N, T] results cut to their lengths, grouped G per prompt."""
    rows = [Completion(tokens[n, :int(lengths[n])].clone(), logprobs[n, :int(lengths[n])].clone(),
                       "eos" if stopped[n] else "length") for n in range(len(tokens))]
    return [rows[i:i + group_size] for i in range(0, len(rows), group_size)]


class StaticCacheEngine:
    """Prefill once per prompt, decode all P·G rows together; CUDA graphs for the decode step on GPU.

    Graphs are captured per call (its caches are new), so weights gathered for the call are fine. They
    default off under ZeRO-3, whose per-module hooks still run on every call and must not be captured.
    """

    def __init__(self, model, cuda_graphs: bool | None = None):
        self.model = model
        if cuda_graphs is None:
            zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
            cuda_graphs = model.lm_head.weight.is_cuda and not zero3
        self.cuda_graphs = cuda_graphs

    @torch.no_grad()
    def generate(self, prompts: list[dict], sampling: Sampling) -> list[list[Completion]]:
        s, device = sampling, self.model.lm_head.weight.device
        with nvtx_range("rollout/prefill"):
            batch = PrefilledBatch(self.model, prompts, s.num_samples, s.max_new_tokens, self.cuda_graphs)
        eos = torch.tensor(_stops(self.model, s.eos_token_id), device=device)
        gen = None if s.greedy else _generator(device, s.seed)
        n = len(prompts) * s.num_samples
        tokens = torch.zeros(n, s.max_new_tokens, dtype=torch.long, device=device)
        logprobs = torch.zeros(n, s.max_new_tokens, device=device)
        lengths = torch.full((n,), s.max_new_tokens, device=device)
        stopped = torch.zeros(n, dtype=torch.bool, device=device)
        logits = batch.first_logits.repeat_interleave(s.num_samples, 0)
        live = torch.arange(n, device=device)  # the result rows the batch still decodes, in its row order
        with nvtx_range("rollout/decode"):
            for t in range(s.max_new_tokens):
                if t:
                    logits = batch.decode(tokens[live, t - 1], t - 1)
                tokens[live, t], logprobs[live, t] = sample(logits, s, gen)
                hit = torch.isin(tokens[:, t], eos) & ~stopped  # retired rows are stopped already
                lengths = torch.where(hit, t + 1, lengths)
                stopped |= hit
                if t % CHECK_EVERY != CHECK_EVERY - 1:
                    continue
                if bool(stopped.all()):
                    break
                if not self.cuda_graphs:  # a graph replays one fixed shape
                    # Eager steps cost what their rows compute: prompts whose samples have all stopped (a
                    # short answer beside a long one) leave the batch.
                    done = stopped[live].view(-1, s.num_samples).all(1)
                    if bool(done.any()):
                        batch.retire(done)
                        live = live.view(-1, s.num_samples)[~done].reshape(-1)
        return _completions(tokens.cpu(), logprobs.cpu(), lengths.cpu(), stopped.cpu(), s.num_samples)


class HFEngine:
    """The reference: HF `generate(num_return_sequences=G)` per prompt, driven with vcr1's positions."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[dict], sampling: Sampling) -> list[list[Completion]]:
        if sampling.seed is None:
            return [self._one(prompt, sampling) for prompt in prompts]
        device = self.model.lm_head.weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(sampling.seed)
            return [self._one(prompt, sampling) for prompt in prompts]

    def _one(self, prompt: dict, s: Sampling) -> list[Completion]:
        model, device = self.model, self.model.lm_head.weight.device
        eos = _stops(model, s.eos_token_id)
        ids = prompt["input_ids"].to(device)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **_video(prompt, device),
                      # given positions make HF follow vcr1's convention and count on from the last one
                      position_ids=prompt_positions(prompt, model.config).to(device)[:, None])
        if accepts_mm_token_type_ids(model):
            inputs["mm_token_type_ids"] = mm_token_type_ids(ids, model.config)
        # Every knob explicit: unset ones would come from the checkpoint's generation_config.
        knobs = dict(do_sample=False) if s.greedy else dict(
            do_sample=True, temperature=s.temperature, top_k=s.top_k or 0, top_p=s.top_p)
        out = model.generate(
            **inputs, **knobs, max_new_tokens=s.max_new_tokens, eos_token_id=eos, pad_token_id=eos[0],
            repetition_penalty=1.0, num_return_sequences=1 if s.greedy else s.num_samples,
            output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, ids.shape[1]:]
        logits = torch.stack(out.logits, 1).float() / (1.0 if s.greedy else s.temperature)
        logprobs = logits.log_softmax(-1).gather(-1, new[..., None])[..., 0]
        is_eos = torch.isin(new, torch.tensor(eos, device=device))
        stopped = is_eos.any(1)
        lengths = torch.where(stopped, is_eos.int().argmax(1) + 1, new.shape[1])
        rows = _completions(new.cpu(), logprobs.cpu(), lengths.cpu(), stopped.cpu(), len(new))[0]
        return rows * s.num_samples if s.greedy else rows  # greedy samples are all the same


def generate(model, prompts: list[dict], *, num_samples: int, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, greedy: bool = False,
             eos_token_id: int | list[int] | None = None, seed: int | None = None) -> list[list[Completion]]:
    """Per prompt, num_samples completions from the static-cache engine (see the module docstring).

    `prompts` are `vcr1.data.processor.prompt_inputs` dicts (input_ids [1, L], video inputs, optional
    position_ids (3, 1, L)). Deterministic for the same prompts, settings and seed.
    """
    sampling = Sampling(num_samples, max_new_tokens, temperature, top_k, top_p, greedy, eos_token_id, seed)
    return StaticCacheEngine(model).generate(prompts, sampling)


def hf_generate(model, prompts: list[dict], *, num_samples: int, max_new_tokens: int, temperature: float = 1.0,
                top_k: int | None = None, top_p: float = 1.0, greedy: bool = False,
                eos_token_id: int | list[int] | None = None, seed: int | None = None) -> list[list[Completion]]:
    """The same as `generate` through HF `model.generate`: the reference path."""
    sampling = Sampling(num_samples, max_new_tokens, temperature, top_k, top_p, greedy, eos_token_id, seed)
    return HFEngine(model).generate(prompts, sampling)
