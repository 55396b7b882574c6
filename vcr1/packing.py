"""The group forward: hidden states of every completion token of a micro-batch of GRPO groups.

A group is one prompt (text + video) and its G sampled completions. The reference path runs each
(prompt + completion) as its own row of a right-padded batch, the vision tower per row (the paper's
way). The fast path packs the micro-batch into one row with no padding,

    [prompt_1 | a_11 … a_1G | prompt_2 | a_21 … | …]

runs the vision tower once per video, and attends so that a prompt is causal over itself and each
answer sees its prompt plus, causally, itself (never a sibling): P + G·C tokens of work instead of
G·(P + C).

Attention backends: "flex" (CUDA: FlexAttention with a block mask of the packed row's structure) and
"prefix" (any device: PrefixAttention, plain torch) read the prompt's keys/values where they lie, once for
all G answers, and keep for backward only q, k, v, the output and the log-sum-exp (the memory of one
plain causal forward over the packed row). "flash" and "torch" (CUDA varlen kernels) and "sdpa" (the
reference: one masked SDPA call per segment) take a copy of the prompt's keys/values per answer. The
trainer's choice is --engine.attn_backend ("auto": the first available of ATTENTION_BACKENDS).
"""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from functools import cache, cached_property, partial

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:
    BlockMask = flex_attention = None

from vcr1.model import answer_positions, hidden_states, prompt_positions

ATTENTION_BACKENDS = ("flex", "flash", "torch", "prefix", "sdpa")  # the order "auto" tries them in
# Query rows per block of scores in the prefix backend: bounds its transient memory (128 gave both the
# lowest peak and time of 1024/256/128 on CPU at bench/test_bench_memory.py's 782-token prompt).
BLOCK = 128
# The flex backend's sparse block (query rows x key columns; FlexAttention's default and its kernels' tile).
FLEX_BLOCK = 128


def _prompt(model, inputs: dict) -> dict:
    """One prompt's ids [L], 3-D positions [3, L] and video inputs, on the model's device."""
    device = model.device
    ids = inputs["input_ids"].reshape(-1).to(device)
    grid, seconds = inputs.get("video_grid_thw"), inputs.get("second_per_grid_ts")
    positions = prompt_positions(inputs, model.config).to(device)
    pixels = inputs.get("pixel_values_videos")
    return {
        "ids": ids, "positions": positions,
        # Prompts built from one decoded clip share its tensor: their video is encoded once per forward.
        "video_key": None if pixels is None else id(pixels),
        "pixels": None if pixels is None else pixels.to(device),
        "grid": None if grid is None else grid.reshape(-1, 3).to(device),
        "seconds": None if seconds is None else torch.as_tensor(seconds).reshape(-1).to(device),
    }


def _cat_video(prompts: list[dict], repeats: list[int]) -> tuple:
    """pixel_values_videos, video_grid_thw, second_per_grid_ts of prompt i repeated repeats[i] times."""
    with_video = [(p, n) for p, n in zip(prompts, repeats) if p["pixels"] is not None]
    if not with_video:
        return None, None, None
    return tuple(torch.cat([p[key] for p, n in with_video for _ in range(n)])
                 for key in ("pixels", "grid", "seconds"))


def _padded_hidden(model, prompts: list[dict], completions_list: list[list[torch.Tensor]]) -> torch.Tensor:
    """Reference: every (prompt + completion) its own right-padded row, the video repeated per row."""
    rows, positions = [], []
    for prompt, completions in zip(prompts, completions_list):
        for c in completions:
            rows.append(torch.cat([prompt["ids"], c]))
            positions.append(torch.cat([prompt["positions"], answer_positions(prompt["positions"], len(c))], 1))
    width = max(len(r) for r in rows)
    pad_id = model.config.text_config.pad_token_id or 0
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=model.device)
    pos = torch.ones(3, len(rows), width, dtype=torch.long, device=model.device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=model.device)
    for i, (r, p) in enumerate(zip(rows, positions)):
        ids[i, :len(r)], pos[:, i, :len(r)], mask[i, :len(r)] = r, p, 1
    pixels, grid, seconds = _cat_video(prompts, [len(c) for c in completions_list])
    hidden = hidden_states(model, ids, pos, mask, pixels, grid, seconds)

    # Row i's completion token j is predicted by position len(prompt) + j - 1.
    picked = []
    i = 0
    for prompt, completions in zip(prompts, completions_list):
        start = len(prompt["ids"]) - 1
        for c in completions:
            picked.append(hidden[i, start:start + len(c)])
            i += 1
    return torch.cat(picked)


# ---- the packed path ---------------------------------------------------------------------------

@dataclass
class PackedSegments:
    """The packed row's attention segments, handed to the attention function in place of a mask.

    Segment s (a prompt, or one answer) has queries q[cu_q[s]:cu_q[s+1]] and keys
    k[kv_index[cu_k[s]:cu_k[s+1]]]: the prompt itself, or the answer's prompt followed by the answer.
    The causal mask is aligned bottom-right, so answer token i sees its whole prompt and answer
    tokens ≤ i. This is flash-attn's varlen layout, taken by the flash, torch and sdpa backends.

    The prefix backend reads `pieces` instead, rows of the packed row itself, never copied: (q0, q1, k0,
    k1, causal) has queries q0:q1 attend to keys k0:k1, causally (key ≤ query) or to all of them. A
    prompt is one causal piece; a group's answers are one non-causal piece on their prompt plus a
    causal piece each on themselves, merged by log-sum-exp.

    The flex backend reads the row's tokens' segment, group and is-prompt flag ([T] each) through
    `block_mask`, built on first use and then reused by every layer of the packed forward (and by a
    gradient-checkpointing replay, which hands the same object). It is a cached_property, which writes the
    instance's __dict__ directly, so it would keep working were the class made frozen.
    """
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    kv_index: torch.Tensor
    max_q: int
    max_k: int
    pieces: tuple[tuple[int, int, int, int, bool], ...]
    segment: torch.Tensor  # [T] int32: the segment each token belongs to (a prompt, or one answer)
    group: torch.Tensor  # [T] int32: the group (prompt and its answers) each token belongs to
    prompt: torch.Tensor  # [T] bool: whether the token is a prompt token
    attn_backend: str  # "auto" or one of ATTENTION_BACKENDS

    @cached_property
    def block_mask(self) -> BlockMask:
        mask_mod = _mask_mod(self.segment, self.group, self.prompt)
        return _block_mask(mask_mod, len(self.segment), self.segment.device)


def _mask_mod(segment: torch.Tensor, group: torch.Tensor, prompt: torch.Tensor):
    """FlexAttention's mask_mod of the packed row: query q sees key k within its own segment causally, and
    an answer token sees every prompt token of its group (never a sibling answer)."""
    def mask_mod(b, h, q, k):
        own = (segment[q] == segment[k]) & (k <= q)
        return own | (~prompt[q] & prompt[k] & (group[q] == group[k]))
    return mask_mod


def _block_mask(mask_mod, t: int, device: torch.device) -> BlockMask:
    """mask_mod's BlockMask over a row of t tokens, in FLEX_BLOCK tiles.

    The same tiles as create_block_mask (tests/test_packing.py checks), but mask_mod is evaluated 16 query
    tiles at a time: transient memory of 16·FLEX_BLOCK·t booleans, where create_block_mask evaluates the
    whole [t, t] mask at once (0.2 GB per intermediate at the 14k-token row of a 768-frame group).
    """
    n = -(-t // FLEX_BLOCK)
    keys = torch.arange(n * FLEX_BLOCK, device=device)
    counts = []  # allowed (query, key) pairs per tile; positions past the row count as masked
    for r0 in range(0, n * FLEX_BLOCK, 16 * FLEX_BLOCK):
        rows = torch.arange(r0, min(r0 + 16 * FLEX_BLOCK, n * FLEX_BLOCK), device=device)[:, None]
        allowed = mask_mod(0, 0, rows.clamp(max=t - 1), keys.clamp(max=t - 1)) & (rows < t) & (keys < t)
        counts.append(allowed.view(-1, FLEX_BLOCK, n, FLEX_BLOCK).sum((1, 3)))
    counts = torch.cat(counts)
    full = counts == FLEX_BLOCK ** 2  # tiles that need no mask_mod in the kernel

    def ordered(tiles):  # FlexAttention's layout: per query tile, how many key tiles, then which
        tiles = tiles.to(torch.int32)
        return (tiles.sum(-1, dtype=torch.int32)[None, None],
                tiles.argsort(dim=-1, descending=True, stable=True).to(torch.int32)[None, None])

    block_mask = BlockMask.from_kv_blocks(*ordered((counts > 0) & ~full), *ordered(full), BLOCK_SIZE=FLEX_BLOCK,
                                          mask_mod=mask_mod, seq_lengths=(t, t))
    # Tile counts symbolic from the first compile of _flex on: dynamo would otherwise specialise the first
    # row's and recompile at the second length.
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        tiles = getattr(block_mask, name)
        torch._dynamo.maybe_mark_dynamic(tiles, list(range(2, tiles.dim())))
    return block_mask


def unavailable_reason(backend: str, device, dtype: torch.dtype) -> str | None:
    """Why a packed-attention backend cannot run on this device and dtype, or None when it can.

    "prefix" and "sdpa" run anywhere. "flex" needs CUDA (torch's FlexAttention has no CPU backward), fp16,
    bf16 or fp32, and Triton; "flash" and "torch" need CUDA, fp16 or bf16, and their package.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {ATTENTION_BACKENDS} or 'auto'")
    if backend in ("prefix", "sdpa"):
        return None
    if backend == "flex":
        if flex_attention is None:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        if torch.device(device).type != "cuda":
            return f"flex attention needs a CUDA device (torch {torch.__version__} has no CPU backward for it)"
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"flex attention needs fp16, bf16 or fp32, not {dtype}"
        if importlib.util.find_spec("triton") is None:
            return "flex attention compiles Triton kernels; triton is not installed"
        return None
    if torch.device(device).type != "cuda":
        return f"{backend} varlen attention needs a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{backend} varlen attention needs fp16 or bf16, not {dtype}"
    if backend == "flash" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if backend == "torch" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


@cache
def pick_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend "auto" resolves to (the first available of ATTENTION_BACKENDS: flex on CUDA, prefix on
    CPU), or the requested one, checked."""
    if backend == "auto":
        return next(b for b in ATTENTION_BACKENDS if unavailable_reason(b, device, dtype) is None)
    if reason := unavailable_reason(backend, device, dtype):
        raise RuntimeError(f"packed attention backend {backend!r} is unavailable: {reason}")
    return backend


def _sdpa_varlen(q, k, v, seg: PackedSegments, scale: float) -> torch.Tensor:
    """Reference: one SDPA call per segment with an explicit bottom-right causal mask."""
    out = []
    bounds = zip(seg.cu_q.tolist(), seg.cu_q[1:].tolist(), seg.cu_k.tolist(), seg.cu_k[1:].tolist())
    for q0, q1, k0, k1 in bounds:
        lq, lk = q1 - q0, k1 - k0
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        qs, ks, vs = (t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def _blocks(pieces):
    """The pieces cut into blocks of at most BLOCK query rows; a causal block drops keys past its last query."""
    for q0, q1, k0, k1, causal in pieces:
        for b0 in range(q0, q1, BLOCK):
            b1 = min(b0 + BLOCK, q1)
            yield b0, b1, k0, min(k1, b1) if causal else k1, causal


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Where the prefix backend's softmax and sums run: fp32, or the inputs' dtype when wider."""
    return torch.promote_types(dtype, torch.float32)


def _block_scores(q, k, block, scale) -> torch.Tensor:
    """Scores (in _wide precision) [kv, rep, n, m] of query rows b0:b1 against keys k0:k1, masked when causal.

    GQA native: the rep query heads of a key head are extra rows of one matmul on that head's keys.
    """
    b0, b1, k0, k1, causal = block
    kv, d = k.shape[0], k.shape[-1]
    rows = q[:, b0:b1].reshape(kv, -1, d)
    s = (rows @ k[:, k0:k1].transpose(1, 2)).to(_wide(q.dtype)).mul_(scale).view(kv, -1, b1 - b0, k1 - k0)
    if causal:
        later = torch.arange(k0, k1, device=q.device) > torch.arange(b0, b1, device=q.device)[:, None]
        s.masked_fill_(later, float("-inf"))
    return s


class PrefixAttention(torch.autograd.Function):
    """Attention over the packed row by pieces (see PackedSegments), no key/value copied or repeated.

    q [heads, T, d], k and v [kv_heads, T, d], any strides. Forward merges the pieces' partial softmaxes
    by log-sum-exp; it saves q, k, v, the output and the log-sum-exp [heads, T], and backward recomputes
    each block's scores from them (flash attention's scheme, in plain torch). Gradients are summed in
    a fixed order: deterministic. Returns out [heads, T, d], stored as [T, heads, d] so that the
    caller's [1, T, heads·d] is a view of it.
    """

    @staticmethod
    def forward(ctx, q, k, v, pieces, scale):
        h, t, d = q.shape
        kv = k.shape[0]
        acc = q.new_zeros(kv, h // kv, t, d, dtype=_wide(q.dtype))
        lse = q.new_full((kv, h // kv, t), float("-inf"), dtype=_wide(q.dtype))
        for block in _blocks(pieces):
            b0, b1, k0, k1, _ = block
            s = _block_scores(q, k, block, scale)
            part = s.logsumexp(-1)
            o = (s - part[..., None]).exp_().to(v.dtype) @ v[:, None, k0:k1]
            merged = torch.logaddexp(lse[..., b0:b1], part)
            acc[..., b0:b1, :] = (acc[..., b0:b1, :] * (lse[..., b0:b1] - merged).exp()[..., None]
                                  + o.to(acc.dtype) * (part - merged).exp()[..., None])
            lse[..., b0:b1] = merged
        out = q.new_empty(t, h, d).transpose(0, 1)
        out.copy_(acc.view(h, t, d))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pieces, ctx.scale = pieces, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        h, t, d = q.shape
        kv = k.shape[0]
        wide = _wide(q.dtype)
        grad = grad.view(kv, h // kv, t, d)
        delta = (grad.to(wide) * out.view(kv, h // kv, t, d).to(wide)).sum(-1)  # rowsum(dO · O)
        dq = torch.zeros(kv, h // kv, t, d, dtype=wide, device=q.device)
        dk = torch.zeros(kv, t, d, dtype=wide, device=q.device)
        dv = torch.zeros_like(dk)
        for block in _blocks(ctx.pieces):
            b0, b1, k0, k1, _ = block
            p = (_block_scores(q, k, block, ctx.scale) - lse[..., b0:b1, None]).exp_()
            do = grad[..., b0:b1, :]
            dv[:, k0:k1] += p.to(v.dtype).flatten(1, 2).transpose(1, 2) @ do.flatten(1, 2)
            dp = (do @ v[:, None, k0:k1].transpose(-1, -2)).to(wide)
            ds = (p * (dp - delta[..., b0:b1, None]) * ctx.scale).to(q.dtype)
            dq[..., b0:b1, :] += ds @ k[:, None, k0:k1]
            dk[:, k0:k1] += ds.flatten(1, 2).transpose(1, 2) @ q[:, b0:b1].reshape(kv, -1, d)
        return dq.view(h, t, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


@cache
def _flex():
    """flex_attention compiled once per process (not at import: creating the wrapper loads dynamo, about 1 s).

    dynamic=True keeps the row length T symbolic (and _block_mask marks the tile counts dynamic), so rows
    of every length share one compiled graph per dtype, head shape and grad mode (rows of one tile,
    T <= FLEX_BLOCK, get their own: dynamo specialises size-1 dims). Seen with backend="aot_eager" on CPU,
    torch 2.13; tests/test_packing.py checks on CUDA that new lengths compile nothing. The alternative,
    padding T to a multiple of FLEX_BLOCK, would copy q, k and v in every layer and still compile once per
    padded length.
    """
    return torch.compile(flex_attention, dynamic=True)


def _flex_attention(query, key, value, seg: PackedSegments, scale: float) -> torch.Tensor:
    """The whole packed row under its block mask: query [1, heads, T, d], key and value [1, kv_heads, T, d]
    (any strides), GQA native; nothing gathered or repeated. FlexAttention's Triton backward computes dQ
    and dK/dV in separate programs, each summing in a fixed order (no atomics): deterministic."""
    return _flex()(query, key, value, block_mask=seg.block_mask, scale=scale, enable_gqa=True)


def _flash_varlen(q, k, v, seg: PackedSegments, scale: float) -> torch.Tensor:
    """flash-attn (>= 2.1 aligns causal bottom-right when q is shorter than k; GQA native)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q.contiguous(), k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k,
                                  softmax_scale=scale, causal=True)


def _torch_varlen(q, k, v, seg: PackedSegments, scale: float) -> torch.Tensor:
    """torch.nn.attention.varlen (CUDA flash kernels, causal aligned bottom-right like flash-attn)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    # torch 2.10 takes is_causal (and no scale); later versions a (left, right) window, GQA from 2.12.
    kwargs = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:
        raise NotImplementedError(f"torch {torch.__version__} varlen_attn has no scale argument")
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    else:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q.contiguous(), k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, **kwargs)


# These take the prompt's K/V gathered per answer (kv_index; an atomic index_add in backward): a segment's
# keys must be contiguous for the varlen kernels. Not copying would take two calls merged by log-sum-exp
# with a gradient through the log-sum-exp, which their autograd functions do not give; on CUDA, "flex"
# is the no-copy path.
_VARLEN = {"flash": _flash_varlen, "torch": _torch_varlen, "sdpa": _sdpa_varlen}


def _attention(module, query, key, value, attention_mask, *args, fallback, **kwargs):
    """Packed attention when handed PackedSegments; otherwise the implementation it wraps, unchanged."""
    if not isinstance(attention_mask, PackedSegments):
        return fallback(module, query, key, value, attention_mask, *args, **kwargs)
    seg = attention_mask
    # Resolved here, from the query itself, so autocast's bf16 still reaches the flash kernels. No
    # attention dropout: Qwen2.5-VL trains with attention_dropout = 0.
    backend = pick_backend(seg.attn_backend, query.device, query.dtype)
    if backend == "prefix":
        out = PrefixAttention.apply(query[0], key[0], value[0], seg.pieces, module.scaling)
        return out.transpose(0, 1).unsqueeze(0), None
    if backend == "flex":
        return _flex_attention(query, key, value, seg, module.scaling).transpose(1, 2), None
    q = query[0].transpose(0, 1)  # [1, heads, T, head_dim] -> [T, heads, head_dim]
    k, v = (t[0].transpose(0, 1).index_select(0, seg.kv_index) for t in (key, value))
    return _VARLEN[backend](q, k, v, seg, module.scaling).unsqueeze(0), None


def _install(model) -> None:
    """Wrap the language model's attention implementation with _attention (idempotent).

    The wrapper replaces the entry in transformers' global ALL_ATTENTION_FUNCTIONS rather than
    registering a new name: the config keeps its name (transformers' flash-attn paths select their
    kernel by it), ordinary calls pass through untouched, and a gradient-checkpointing replay in backward
    dispatches through the wrapper again with the same PackedSegments.
    """
    config = model.model.language_model.config
    if getattr(config, "use_sliding_window", False):
        raise NotImplementedError("packed attention does not implement Qwen2's sliding-window layers")
    name = config._attn_implementation
    if name not in ALL_ATTENTION_FUNCTIONS:
        raise NotImplementedError(f"packed attention wraps a registered attention implementation "
                                  f"(sdpa, flash_attention_2, ...), not {name!r}")
    current = ALL_ATTENTION_FUNCTIONS[name]
    if not getattr(current, "vcr1_packed", False):
        wrapper = partial(_attention, fallback=current)
        wrapper.vcr1_packed = True
        ALL_ATTENTION_FUNCTIONS[name] = wrapper


def _pack(prompts: list[dict], completions_list: list[list[torch.Tensor]], attn_backend: str):
    """The packed row [prompt_1 | a_11 … a_1G | prompt_2 | …]: ids [T], positions [4, T] (the text
    row, then t/h/w), the attention segments, and the row of the hidden state that predicts each
    completion token."""
    device = prompts[0]["ids"].device
    ids, positions, queries, keys, rows, pieces, owner, is_prompt = [], [], [], [], [], [], [], []
    offset = 0
    for group, (prompt, completions) in enumerate(zip(prompts, completions_list)):
        n = len(prompt["ids"])
        total = sum(len(c) for c in completions)
        pieces += [(offset, offset + n, offset, offset + n, True),
                   (offset + n, offset + n + total, offset, offset + n, False)]
        span = torch.arange(offset, offset + n, device=device)
        ids.append(prompt["ids"])
        positions.append(torch.cat([torch.arange(n, device=device)[None], prompt["positions"]]))
        queries.append(span)
        keys.append(span)
        owner.append(group)
        is_prompt.append(True)
        offset += n
        for c in completions:
            own = torch.arange(offset, offset + len(c), device=device)
            ids.append(c)
            text = torch.arange(n, n + len(c), device=device)[None]
            positions.append(torch.cat([text, answer_positions(prompt["positions"], len(c))]))
            queries.append(own)
            keys.append(torch.cat([span, own]))
            owner.append(group)
            is_prompt.append(False)
            # The prompt's last token predicts every answer's first token.
            rows.append(torch.cat([span[-1:], own[:-1]]))
            pieces.append((offset, offset + len(c), offset, offset + len(c), True))
            offset += len(c)

    def cumulative(spans):
        return F.pad(torch.tensor([len(s) for s in spans], device=device).cumsum(0), (1, 0)).to(torch.int32)

    def per_token(values, dtype):  # one value per segment, repeated over its tokens
        lengths = torch.tensor([len(s) for s in queries], device=device)
        return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(lengths, output_size=offset)

    segments = PackedSegments(cumulative(queries), cumulative(keys), torch.cat(keys),
                              max(map(len, queries)), max(map(len, keys)), tuple(pieces),
                              per_token(list(range(len(queries))), torch.int32), per_token(owner, torch.int32),
                              per_token(is_prompt, torch.bool), attn_backend)
    return torch.cat(ids), torch.cat(positions, 1), segments, torch.cat(rows)


def video_embeds(model, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The vision tower over all videos at once (it already attends per frame pair and window)."""
    features = model.model.get_video_features(pixels, grid)
    # transformers 5 returns a ModelOutput holding the per-video split; 4.x the split itself.
    return torch.cat(getattr(features, "pooler_output", features))


def _distinct_video_embeds(model, prompts: list[dict]) -> torch.Tensor | None:
    """Video embeddings of every prompt in order, the vision tower run once per distinct video: prompts
    holding the same pixel tensor reuse one output (its gradient then accumulates from all of them)."""
    first: dict[int, int] = {}
    for i, p in enumerate(prompts):
        if p["video_key"] is not None:
            first.setdefault(p["video_key"], i)
    if not first:
        return None
    distinct = [prompts[i] for i in first.values()]
    pixels, grid, _ = _cat_video(distinct, [1] * len(distinct))
    tokens = (grid.prod(-1) // model.config.vision_config.spatial_merge_size ** 2).tolist()
    per_video = dict(zip(first, video_embeds(model, pixels, grid).split(tokens)))
    return torch.cat([per_video[p["video_key"]] for p in prompts if p["video_key"] is not None])


def _packed_hidden(model, prompts: list[dict], completions_list: list[list[torch.Tensor]],
                   attn_backend: str) -> torch.Tensor:
    """Fast path: one packed row, the vision tower once per distinct video, answers sharing their prompt."""
    _install(model)
    ids, positions, segments, rows = _pack(prompts, completions_list, attn_backend)
    embeds = model.model.get_input_embeddings()(ids)
    video = _distinct_video_embeds(model, prompts)
    if video is not None:
        is_video = (ids == model.config.video_token_id)[:, None]
        embeds = embeds.masked_scatter(is_video, video.to(embeds.dtype))
    # A mask dict is taken as already built, so no dense [T, T] mask is made; every layer type gets
    # the segments.
    masks = {kind: segments for kind in ("full_attention", "sliding_attention")}
    out = model.model.language_model(inputs_embeds=embeds[None], position_ids=positions[:, None],
                                     attention_mask=masks, use_cache=False)
    return out.last_hidden_state[0, rows]


# ---- the interface -----------------------------------------------------------------------------

def completion_hidden(model, prompt_inputs_list: list[dict], completions_list: list[list[torch.Tensor]], *,
                      shared_prefix: bool = True, attn_backend: str = "auto"):
    """Hidden states predicting every completion token, group by group, completions in order.

    prompt_inputs_list[i] is what the processor returns for group i's prompt (input_ids,
    pixel_values_videos, video_grid_thw, second_per_grid_ts, optionally position_ids);
    completions_list[i] its completions (1-D token ids, ragged, non-empty).
    Returns hidden [N, H] (the LM head is left to the caller), targets [N] and the completion
    boundaries cu_seqlens [B + 1] int32, N = total completion tokens, B = total completions.
    shared_prefix=False is the repeated-prompt padded reference; attn_backend picks the packed attention
    kernel ("auto" or one of ATTENTION_BACKENDS).
    """
    prompts = [_prompt(model, p) for p in prompt_inputs_list]
    completions_list = [[c.reshape(-1).to(model.device) for c in cs] for cs in completions_list]
    if any(len(c) == 0 for cs in completions_list for c in cs) or any(not cs for cs in completions_list):
        raise ValueError("every group needs at least one completion, and every completion at least one token")
    completions = [c for cs in completions_list for c in cs]
    targets = torch.cat(completions)
    lengths = torch.tensor([0] + [len(c) for c in completions], device=model.device)
    cu_seqlens = lengths.cumsum(0).to(torch.int32)
    if shared_prefix:
        hidden = _packed_hidden(model, prompts, completions_list, attn_backend)
    else:
        hidden = _padded_hidden(model, prompts, completions_list)
    return hidden, targets, cu_seqlens
