"""Group forward memory: packed vs padded vs the ideal, measured small on CPU, counted at Qwen2.5-VL-7B.

Measured (`pytest bench/test_bench_memory.py --benchmark-only`): a Qwen2.5-VL with 7B's proportions
(tests/support/vcr1_memory.py: GQA 7:1, MLP 5.29x hidden, hidden 224, 2 layers, fp32), one group of
G = 8 answers of 24 tokens on a video prompt of 270 and of 782 tokens. Per path: the bytes the forward
saves for backward (distinct storages, parameters excluded), the peak of live tensor bytes allocated
during forward + backward, and the time of forward + backward.

Counted (no compute): `activation_bytes`, a closed form of what each layer saves, is checked against the
measured bytes at the small shape (gradient checkpointing off and on), then evaluated at
Qwen2.5-VL-7B's shape for 16-768 frames to find the largest frame count whose policy forward + backward
fits one 80 GB GPU under ZeRO-3 on 8 GPUs. Writes bench/results/memory_<device>.json.
"""
import json
import platform

import pytest
import torch
import transformers
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vcr1.data.video import frame_pixel_budget, smart_resize
from vcr1_memory import group_forwards, proportioned_model, saved_bytes, video_group
from vcr1_testing import BENCH_RESULTS

GROUP, ANSWER = 8, 24
PROMPTS = {270: (4, 16, 16), 782: (4, 26, 28)}  # prompt tokens: video grid (t, h, w)
PATHS = ("packed", "packed_sdpa", "padded", "ideal")

# Qwen2.5-VL-7B-Instruct's shapes.
TEXT_7B = dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064)
VISION_7B = dict(hidden=1280, intermediate=3420, depth=32, heads=16)
# The paper's run (docs/paper.md §1, §2): G = 8, 1024-token answers, 8 x 80 GB; a 1280x720 source video.
SOURCE = (720, 1280)
TEXT_TOKENS = 128  # system prompt, question and the vision start/end tokens around the video
GPU_BYTES, GPUS = 80e9, 8


# ---- measured ----------------------------------------------------------------------------------

class PeakMemory(TorchDispatchMode):
    """The peak of live tensor bytes allocated under it: each op's output storages, dropped once freed."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= nbytes
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def forward_backward(forward):
    hidden = forward()
    (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum().backward()


@pytest.fixture(scope="module")
def setup():
    model = proportioned_model(head_dim=16)
    results = {}
    yield model, results
    if len(results) == len(PROMPTS) * len(PATHS):
        write_results(model, results)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prompt_tokens", list(PROMPTS))
def test_bench_group_memory(benchmark, setup, prompt_tokens, path):
    model, results = setup
    prompt, answers = video_group(PROMPTS[prompt_tokens], prompt_tokens, GROUP, ANSWER)
    forward = group_forwards(model, prompt, answers)[path]

    def step():
        forward_backward(forward)
        model.zero_grad(set_to_none=True)

    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    saved, _ = saved_bytes(model, forward)
    with PeakMemory() as peak:
        forward_backward(forward)
    model.zero_grad(set_to_none=True)
    result = {"saved_bytes": saved, "peak_bytes": peak.peak}
    if benchmark.stats is not None:  # None under --benchmark-disable
        result["time_s"] = benchmark.stats.stats.min
        results[(prompt_tokens, path)] = result
    benchmark.extra_info.update(result)


# ---- counted -----------------------------------------------------------------------------------

def _norm(width: int, e: int) -> int:
    """Bytes per row an RMSNorm saves: its fp32 input, the fp32 rsqrt, the normalised and weighted rows."""
    return (4 + 2 * e) * width + 4


def text_layer_bytes(text: dict, e: int) -> int:
    """Bytes per token one decoder layer saves: two norms, q/k/v/out and the fp32 log-sum-exp of a fused
    attention (GQA native), and the SwiGLU MLP's gate, act, up and product."""
    head_dim = text["hidden"] // text["heads"]
    attention = e * 2 * (text["heads"] + text["kv_heads"]) * head_dim + 4 * text["heads"]
    return 2 * _norm(text["hidden"], e) + attention + 4 * e * text["intermediate"]


def vision_block_bytes(vision: dict, e: int) -> int:
    """Bytes per patch one vision block saves: two norms, the qkv output, rotated q and k, the windows'
    outputs and their concatenation, the fp32 log-sum-exp, and the SwiGLU MLP."""
    return (2 * _norm(vision["hidden"], e) + 7 * e * vision["hidden"] + 4 * vision["heads"]
            + 4 * e * vision["intermediate"])


def activation_bytes(text: dict, vision: dict, e: int, *, prompt: int, patches: int, group: int, answer: int,
                     path: str, checkpointing: bool) -> dict[str, int]:
    """What the group forward of one group keeps for backward ("saved"), and the activation peak of its
    backward ("peak": under checkpointing, plus the largest layer's recomputed activations).

    path: "packed" (vcr1's row with the prefix backend; equal to "ideal", one causal row over prompt ‖
    answers), "packed_gather" (the same row with a backend that gathers the prompt's K/V per answer: the
    flash/torch varlen and sdpa backends), or "padded" (the paper's batch of G rows prompt ‖ answer, the
    vision tower on G copies of the video). Patches are vision-tower rows (4 per video token); the LM head
    is left out (the same for every path).
    """
    rows = prompt + group * answer if path != "padded" else group * (prompt + answer)
    patches = patches * group if path == "padded" else patches
    head_dim, vision_head = text["hidden"] // text["heads"], vision["hidden"] // vision["heads"]
    layer, block = text_layer_bytes(text, e) * rows, vision_block_bytes(vision, e) * patches
    if path == "packed_gather":  # each answer's copy of the prompt's keys and values, and the gather index
        layer += 2 * e * group * prompt * text["kv_heads"] * head_dim
    # Outside the layers: pixels (in the model's dtype), the window order, the merger (a norm, the GELU's
    # input and output); token ids, the video mask and the final norm; the packed row's picked rows.
    fixed = (patches * (1176 * e + 4 + _norm(vision["hidden"], e) + 2 * e * vision["hidden"])
             + rows * (9 + (4 + e) * text["hidden"] + 4)
             + (8 * group * answer if path.startswith("packed") else 0)
             + (8 * (prompt + group * (prompt + answer)) if path == "packed_gather" else 0))
    if checkpointing:  # each layer and block keeps only its input; backward replays one at a time
        saved = fixed + e * (text["layers"] * rows * text["hidden"] + vision["depth"] * patches * vision["hidden"])
        return {"saved": saved, "peak": saved + max(layer, block)}
    # Without: every layer and block, and the rotary tables (bf16 text, fp32 vision) they share.
    saved = fixed + text["layers"] * layer + vision["depth"] * block + 2 * e * rows * head_dim \
        + 2 * 4 * patches * vision_head
    return {"saved": saved, "peak": saved}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_count_matches_measurement(checkpointing):
    """The closed form equals the bytes measured at the small shape, on every measured path."""
    model = proportioned_model(head_dim=8)
    if checkpointing:
        # transformers 5.24 renamed gradient_checkpointing_enable; the GPU machines' 5.17 may not have the new name.
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.train()
    grid, prompt_tokens = (2, 8, 8), 48
    prompt, answers = video_group(grid, prompt_tokens, GROUP, 12)
    text = dict(hidden=112, intermediate=model.config.text_config.intermediate_size, layers=2, heads=14, kv_heads=2)
    vision = dict(hidden=32, intermediate=64, depth=2, heads=2)
    forwards = group_forwards(model, prompt, answers)
    for path in ("packed", "padded", "ideal"):
        want = activation_bytes(text, vision, 4, prompt=prompt_tokens, patches=grid[0] * grid[1] * grid[2],
                                group=GROUP, answer=12, path=path, checkpointing=checkpointing)["saved"]
        assert saved_bytes(model, forwards[path])[0] == want, path


def video_tokens(frames: int) -> int:
    """LLM tokens of a SOURCE video sampled at `frames` frames under VideoChat-R1's budget (docs/paper.md §2)."""
    budget = dict(min_pixels=16 * 28 * 28, total_pixels=3584 * 28 * 28, max_pixels=768 * 28 * 28)
    h, w = smart_resize(*SOURCE, min_pixels=budget["min_pixels"], max_pixels=frame_pixel_budget(frames, **budget))
    return frames // 2 * (h // 28) * (w // 28)


def model_7b_parameters() -> int:
    """Qwen2.5-VL-7B's parameter count, from its modules built on the meta device (no memory, no compute)."""
    t, v = TEXT_7B, VISION_7B
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=t["hidden"], intermediate_size=t["intermediate"], num_hidden_layers=t["layers"],
                         num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"], vocab_size=t["vocab"]),
        vision_config=dict(depth=v["depth"], hidden_size=v["hidden"], intermediate_size=v["intermediate"],
                           num_heads=v["heads"], out_hidden_size=t["hidden"]),
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(config).parameters())


def fit_table() -> dict:
    """Activation bytes at 7B (bf16) for 16-768 frames, and the largest frame count that fits per path."""
    params = model_7b_parameters()
    # Per GPU under ZeRO-3 on 8: bf16 weights and gradients and fp32 Adam (master, m, v), 16 bytes per
    # parameter, sharded; the frozen bf16 reference model (KL term), sharded; and the gathered working
    # set, DeepSpeed's default stage3_max_live_parameters = 1e9 bf16 parameters.
    static = params * (16 + 2) / GPUS + 1e9 * 2
    paths = ("packed", "packed_gather", "padded")
    rows = []
    largest = {f"{path}_{ckpt}": None for path in paths for ckpt in ("no_ckpt", "ckpt")}  # None: no count fits
    for frames in range(16, 769, 2):
        tokens = video_tokens(frames)
        row = {"frames": frames, "video_tokens": tokens, "prompt_tokens": tokens + TEXT_TOKENS}
        for path in paths:
            for ckpt in (False, True):
                peak = activation_bytes(TEXT_7B, VISION_7B, 2, prompt=tokens + TEXT_TOKENS, patches=4 * tokens,
                                        group=GROUP, answer=1024, path=path, checkpointing=ckpt)["peak"]
                key = f"{path}_{'ckpt' if ckpt else 'no_ckpt'}"
                row[f"{key}_activation_gb"] = peak / 1e9
                if static + peak <= GPU_BYTES:
                    largest[key] = frames
        if frames in (16, 32, 64, 128, 256, 384, 512, 640, 768):
            rows.append(row)
    return {"parameters": params, "static_bytes_per_gpu": static, "gpu_bytes": GPU_BYTES, "gpus": GPUS,
            "source_video": SOURCE, "text_tokens": TEXT_TOKENS, "group": GROUP, "answer_tokens": 1024,
            "rows": rows, "largest_frames_that_fit": largest}


def write_results(model, results):
    text = model.config.text_config
    report = {
        "device": platform.processor() or "cpu", "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "shape": {"hidden": text.hidden_size, "intermediate": text.intermediate_size, "layers": text.num_hidden_layers,
                  "heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads, "dtype": "float32",
                  "group": GROUP, "answer_tokens": ANSWER, "video_grids": PROMPTS},
        "measured": {str(n): {path: results[(n, path)] for path in PATHS} for n in PROMPTS},
        "ratios": {str(n): {f"{a}/{b} {key}": results[(n, a)][key] / results[(n, b)][key] for a, b, key in (
            ("packed", "ideal", "saved_bytes"), ("packed_sdpa", "ideal", "saved_bytes"),
            ("padded", "packed", "saved_bytes"), ("packed", "ideal", "peak_bytes"),
            ("padded", "packed", "peak_bytes"), ("padded", "packed", "time_s"), ("packed_sdpa", "packed", "time_s"),
        )} for n in PROMPTS},
        "qwen2_5_vl_7b": fit_table(),
    }
    BENCH_RESULTS.mkdir(parents=True, exist_ok=True)
    (BENCH_RESULTS / "memory_cpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
