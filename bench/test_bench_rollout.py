"""Rollout throughput: the static-cache engine against HF generate(num_return_sequences=G), and its
decode step against the memory-bandwidth bound (weight + KV bytes read per step / copy bandwidth).

CPU: a tiny model (shapes below), to keep the harness working. CUDA: Qwen2.5-VL-7B's text shapes with
4 of its 28 layers and a 2-block vision tower, bf16, 4 prompts × G = 8 = 32 rows.
Results: bench/results/rollout_{cpu,cuda}.json.
"""
import json
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vcr1.model import mrope_positions
from vcr1.rollout import PrefilledBatch, generate, hf_generate
from vcr1_testing import BENCH_RESULTS, requires_cuda

CPU_SHAPE = dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=1024, vision_hidden=32,
                 prompts=4, samples=4, text_tokens=40, grid=(2, 8, 8), max_new_tokens=32, step=16)
# Qwen2.5-VL-7B text shapes, fewer layers; 16 frames at 392 px: 1568 video tokens per prompt. Step 191 reads a
# 256-slot window of generated keys, the 4/3 over-read of an average step.
CUDA_SHAPE = dict(hidden=3584, layers=4, heads=28, kv_heads=4, intermediate=18944, vocab=152064, vision_hidden=1280,
                  prompts=4, samples=8, text_tokens=120, grid=(8, 28, 28), max_new_tokens=256, step=191)


def build_model(s: dict, device, dtype):
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], max_position_embeddings=32768,
                         eos_token_id=s["vocab"] - 1, pad_token_id=s["vocab"] - 2, bos_token_id=s["vocab"] - 2,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=_mrope_section(s["hidden"] // s["heads"]))),
        vision_config=dict(depth=2, hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
                           num_heads=max(s["vision_hidden"] // 80, 2), out_hidden_size=s["hidden"], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=s["vocab"] - 4, video_token_id=s["vocab"] - 3, vision_start_token_id=s["vocab"] - 6,
        vision_end_token_id=s["vocab"] - 5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    model.config._attn_implementation = "sdpa"
    return model


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's t/h/w split [16, 24, 24] of 64 rotary frequencies, scaled to head_dim / 2."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def build_prompts(s: dict, config) -> list[dict]:
    """Random text around one video block per prompt; prompt i gets i extra text tokens (ragged lengths)."""
    t, h, w = s["grid"]
    gen = torch.Generator().manual_seed(0)
    prompts = []
    for i in range(s["prompts"]):
        text = torch.randint(0, s["vocab"] - 8, (s["text_tokens"] + i,), generator=gen)
        video = [config.video_token_id] * (t * h * w // 4)
        ids = torch.cat([text[:8], torch.tensor([config.vision_start_token_id, *video, config.vision_end_token_id]),
                         text[8:]])[None]
        grid, sec = torch.tensor([[t, h, w]]), torch.tensor([1.0])
        prompts.append({
            "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": torch.randn(t * h * w, 1176, generator=gen), "video_grid_thw": grid,
            "second_per_grid_ts": sec, "mm_token_type_ids": (ids == config.video_token_id).int() * 2,
            "position_ids": mrope_positions(ids[0], grid, sec, config)[:, None],
        })
    return prompts


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, device, repeats: int) -> float:
    """Median wall time of fn over repeats (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s of a large device-to-device copy, counting its read and its write."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _seconds(lambda: dst.copy_(src), device, repeats=10)


def step_bytes(model, batch: PrefilledBatch, prompt_lengths: list[int], step: int) -> dict:
    """Bytes a decode step must read: every weight of the language model and head except the embedding
    table (a gather of N rows), each prompt's keys/values once, each row's generated ones so far."""
    lm = model.model.language_model
    weights = sum(p.numel() * p.element_size() for p in lm.parameters()) - lm.embed_tokens.weight.nbytes
    weights += model.lm_head.weight.nbytes
    per_token = 2 * len(lm.layers) * batch.kv_heads * batch.d * batch.kp.element_size()
    rows = batch.kg.shape[1]
    return {"weights": weights, "prompt_kv": per_token * sum(prompt_lengths),
            "generated_kv": per_token * rows * (step + 1)}


def run(s: dict, device: torch.device, dtype, benchmark, repeats: int) -> dict:
    model = build_model(s, device, dtype)
    prompts = build_prompts(s, model.config)
    kw = dict(num_samples=s["samples"], max_new_tokens=s["max_new_tokens"], temperature=1.0, top_k=50,
              eos_token_id=s["vocab"] - 1, seed=0)
    rows = s["prompts"] * s["samples"]

    seconds = []  # timed here too: with --benchmark-disable (CTest's smoke) the fixture keeps no stats

    def fast():
        _sync(device)
        start = time.perf_counter()
        out = generate(model, prompts, **kw)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        return out

    out = benchmark.pedantic(fast, rounds=repeats, iterations=1, warmup_rounds=1)
    fast_s = statistics.median(seconds[-repeats:])  # the warm-up round is not counted
    fast_tokens = sum(c.length for group in out for c in group)
    _sync(device)
    start = time.perf_counter()
    ref = hf_generate(model, prompts, **kw)  # once: the fast engine's rounds have warmed the device up
    _sync(device)
    ref_s = time.perf_counter() - start
    ref_tokens = sum(c.length for group in ref for c in group)

    with torch.no_grad():
        batch = PrefilledBatch(model, prompts, s["samples"], s["max_new_tokens"], cuda_graphs=device.type == "cuda")
        tokens = torch.zeros(rows, dtype=torch.long, device=device)
        step_s = _seconds(lambda: batch.decode(tokens, s["step"]), device, repeats=20)
    bw = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 28)
    needed = step_bytes(model, batch, [p["input_ids"].shape[1] for p in prompts], s["step"])
    bound_s = sum(needed.values()) / bw
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "load_average": os.getloadavg()[0],  # other processes on the machine skew the CPU numbers
        "dtype": str(dtype), "shape": {**s, "grid": list(s["grid"])}, "rows": rows,
        "prompt_tokens": [p["input_ids"].shape[1] for p in prompts],
        "fast": {"seconds": fast_s, "tokens": fast_tokens, "tokens_per_s": fast_tokens / fast_s},
        "hf_generate": {"seconds": ref_s, "tokens": ref_tokens, "tokens_per_s": ref_tokens / ref_s},
        "speedup": (fast_tokens / fast_s) / (ref_tokens / ref_s),
        "decode_step": {"step": s["step"], "seconds": step_s, "bytes_read": needed, "copy_bandwidth_Bps": bw,
                        "bandwidth_bound_s": bound_s, "ratio_to_bound": step_s / bound_s},
    }
    benchmark.extra_info.update({k: result[k] for k in ("speedup", "rows")})
    benchmark.extra_info["ratio_to_bound"] = result["decode_step"]["ratio_to_bound"]
    BENCH_RESULTS.mkdir(parents=True, exist_ok=True)
    path = BENCH_RESULTS / f"rollout_{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def test_rollout_cpu(benchmark):
    run(CPU_SHAPE, torch.device("cpu"), torch.float32, benchmark, repeats=3)


@requires_cuda
def test_rollout_cuda(benchmark):
    result = run(CUDA_SHAPE, torch.device("cuda"), torch.bfloat16, benchmark, repeats=3)
    print(f"speedup {result['speedup']:.1f}x (target >= 5), "
          f"decode step {result['decode_step']['ratio_to_bound']:.2f}x the bandwidth bound (target <= 1.5)")
