"""Group forward + backward: shared-prefix packed vs repeated-prompt padded (`pytest bench/ --benchmark-only`).

On CUDA: a Qwen2.5-VL-7B-shaped model with random init, bf16, cut to 4 of 28 text layers and 4 of 32
vision blocks; one group of G = 8 answers of 256 tokens on a prompt of 3,600 video tokens + text.
On CPU: the same layout at a tiny shape (fp32, under a minute). Both write bench/results/packing_<device>.json.
"""
import json
import platform

import pytest
import torch
import transformers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vcr1 import packing
from vcr1_kernels import token_logprobs
from vcr1_testing import BENCH_RESULTS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = {
    "cuda": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=4, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, mrope_section=[16, 24, 24], rope_theta=1e6),
        vision=dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[3]),
        layers_note="4 of 28 text layers, 4 of 32 vision blocks",
        grid=(16, 30, 30), text_tokens=128, group=8, answer=256, dtype=torch.bfloat16,
    ),
    "cpu": dict(
        text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, mrope_section=[2, 3, 3], rope_theta=1e6),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]),
        layers_note="tiny",
        grid=(2, 12, 12), text_tokens=16, group=8, answer=16, dtype=torch.float32,
    ),
}
SHAPE = SHAPES[DEVICE]
# Special ids at the top of the vocabulary; text ids below them.
VISION_START, VISION_END, VIDEO = (SHAPE["text"]["vocab_size"] - i for i in (3, 2, 1))
TEXT_IDS = SHAPE["text"]["vocab_size"] - 8


def build_model() -> Qwen2_5_VLForConditionalGeneration:
    text, vision = dict(SHAPE["text"]), SHAPE["vision"]
    rope = dict(rope_type="default", rope_theta=text.pop("rope_theta"), mrope_section=text.pop("mrope_section"))
    config = Qwen2_5_VLConfig(
        text_config=dict(text, rope_parameters=rope, max_position_embeddings=32768, pad_token_id=0,
                         bos_token_id=0, eos_token_id=1),
        vision_config=dict(vision, out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, tokens_per_second=2, window_size=112),
        video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.to(SHAPE["dtype"])


def build_group():
    """One prompt (text around the video block) and G answers, as the processor and sampler return them."""
    gen = torch.Generator().manual_seed(0)
    t, h, w = SHAPE["grid"]
    half = SHAPE["text_tokens"] // 2
    ids = torch.cat([torch.randint(0, TEXT_IDS, (half,), generator=gen), torch.tensor([VISION_START]),
                     torch.full((t * h * w // 4,), VIDEO), torch.tensor([VISION_END]),
                     torch.randint(0, TEXT_IDS, (half,), generator=gen)])
    prompt = {
        "input_ids": ids[None],
        "pixel_values_videos": torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=gen),
        "video_grid_thw": torch.tensor([[t, h, w]]),
        "second_per_grid_ts": torch.tensor([1.0]),
    }
    answers = [torch.randint(0, TEXT_IDS, (SHAPE["answer"],), generator=gen) for _ in range(SHAPE["group"])]
    return prompt, answers


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def group_forward(model, prompt, answers, shared_prefix):
    return packing.completion_hidden(model, [prompt], [answers], shared_prefix=shared_prefix)


def backward(model, hidden, targets, cu_seqlens):
    """The LM head on the answer tokens (as the trainer runs it), then backward."""
    token_logprobs(hidden, model.lm_head.weight, targets).sum().backward()
    model.zero_grad(set_to_none=True)


def saved_activation_bytes(model, prompt, answers, shared_prefix) -> int:
    """Bytes autograd keeps for backward in the group forward (parameters excluded; the LM head on
    the answer tokens is the same for both paths and left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = group_forward(model, prompt, answers, shared_prefix)
    backward(model, *out)
    return sum(saved.values())


def tokens(prompt, answers, shared_prefix) -> int:
    """Positions the language model runs: the packed row, or the padded batch with its padding."""
    n = prompt["input_ids"].shape[1]
    if shared_prefix:
        return n + sum(len(a) for a in answers)
    return len(answers) * (n + max(len(a) for a in answers))


@pytest.fixture(scope="module")
def setup():
    model = build_model()
    prompt, answers = build_group()
    results = {}
    yield model, prompt, answers, results
    if len(results) == 2:
        write_results(model, prompt, results)


def write_results(model, prompt, results):
    packed, padded = results["packed"], results["padded"]
    report = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "attention_backend": packing.pick_backend("auto", model.device, model.dtype),
        "shape": {
            "layers": SHAPE["layers_note"],
            "text": SHAPE["text"], "vision": SHAPE["vision"], "dtype": str(SHAPE["dtype"]),
            "video_grid_thw": SHAPE["grid"], "prompt_tokens": prompt["input_ids"].shape[1],
            "video_tokens": prompt["input_ids"].eq(VIDEO).sum().item(),
            "group": SHAPE["group"], "answer_tokens": SHAPE["answer"],
        },
        "packed": packed, "padded": padded,
        "speedup": padded["time_s"] / packed["time_s"],  # from the fastest rounds: robust to a busy host
        "activation_memory_ratio": padded["saved_activation_bytes"] / packed["saved_activation_bytes"],
    }
    if DEVICE == "cuda":
        report["peak_memory_ratio"] = padded["peak_memory_bytes"] / packed["peak_memory_bytes"]
    BENCH_RESULTS.mkdir(parents=True, exist_ok=True)
    (BENCH_RESULTS / f"packing_{DEVICE}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


@pytest.mark.parametrize("path", ["packed", "padded"])
def test_bench_group_forward_backward(benchmark, setup, path):
    model, prompt, answers, results = setup
    shared_prefix = path == "packed"

    def step():
        backward(model, *group_forward(model, prompt, answers, shared_prefix))
        sync()

    rounds = 3 if DEVICE == "cuda" else 5
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)

    result = {"tokens": tokens(prompt, answers, shared_prefix),
              "saved_activation_bytes": saved_activation_bytes(model, prompt, answers, shared_prefix)}
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - base
    if benchmark.stats is not None:  # None under --benchmark-disable
        result["time_s"] = benchmark.stats.stats.min
        result["time_s_median"] = benchmark.stats.stats.median
        results[path] = result
    benchmark.extra_info.update(result)
