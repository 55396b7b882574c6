"""A full GRPO step (rollouts, rewards, reference log-probs, update): vcr1's fast path against the paper's
algorithm as its released code runs it — HF `generate(num_return_sequences=G)`, the prompt repeated G
times in a padded batch, full-vocabulary logits (`pytest bench/ --benchmark-only`).

On CUDA: a Qwen2.5-VL-7B-shaped model with random init, bf16, cut to 4 of 28 text layers and 4 of 32
vision blocks; G = 8, one prompt per step as in the paper, synthetic 448-px videos of about 3.6k video
tokens, 256-token completions. On CPU: the tiny embedded default at G = 4 (a few seconds a step).
Both write bench/results/step_<device>.json with per-phase times, tokens/s and peak memory.
"""
import json
import platform
import time
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vcr1 import tiny
from vcr1.config import parse_config
from vcr1.data.synthetic import generate
from vcr1.train import Tally, Trainer
from vcr1_testing import BENCH_RESULTS, synthetic_tasks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = {
    "fast": ["--engine.fast_rollout", "true", "--engine.shared_prefix", "true", "--engine.loss_backend", "auto"],
    "reference": ["--engine.fast_rollout", "false", "--engine.shared_prefix", "false",
                  "--engine.loss_backend", "torch"],
}
SHAPE = {
    "cuda": dict(layers="4 of 28 text layers, 4 of 32 vision blocks", video_size=448, group=8, prompts=1,
                 completion=256, rounds=3),
    "cpu": dict(layers="tiny embedded default", video_size=112, group=4, prompts=2, completion=32, rounds=3),
}[DEVICE]


def seven_b_checkpoint(root: Path) -> Path:
    """A random Qwen2.5-VL-7B-shaped checkpoint (fewer layers) with the locally built tokenizer."""
    tok = tiny.build_tokenizer()
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=4, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]),
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[3], tokens_per_second=2, window_size=112),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    del model
    return root / "model"


def trainer_args(root: Path, path: str) -> list[str]:
    data = generate(root / "data", tasks=synthetic_tasks(), n_train=8, n_test=1, size=SHAPE["video_size"])["train"]
    args = ["--output_dir", str(root / path), "--stage", "grpo", "--max_steps", "100",
            "--grpo.num_generations", str(SHAPE["group"]), "--prompts_per_step", str(SHAPE["prompts"]),
            "--grpo.max_completion_length", str(SHAPE["completion"]),
            "--data", f"tg:{data['tg']['annotations']}:{data['tg']['media_root']}", *PATHS[path]]
    if DEVICE == "cuda":
        # The paper's defaults under the overrides (an empty recipe), not configs/tiny.yaml's tiny-model settings.
        (root / "paper.yaml").write_text("{}\n")
        args += ["--config", str(root / "paper.yaml"), "--model", str(seven_b_checkpoint(root)),
                 "--engine.zero_stage", "0", "--engine.offload", "false"]
    return args


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    yield out
    if len(out) == 2:
        write_results(out)


def write_results(out: dict):
    report = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "shape": SHAPE, **out,
        "speedup_tokens_per_s": out["fast"]["tokens_per_s"] / out["reference"]["tokens_per_s"],
    }
    BENCH_RESULTS.mkdir(parents=True, exist_ok=True)
    (BENCH_RESULTS / f"step_{DEVICE}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_bench_grpo_step(benchmark, tmp_path_factory, results, path):
    root = tmp_path_factory.mktemp(f"step_{path}")
    trainer = Trainer(parse_config(trainer_args(root, path)))
    trainer.grpo_step(Tally())  # warm-up: allocator, kernels, CUDA graphs
    trainer.phase.pop()
    rows = []

    def step():
        t0 = time.perf_counter()
        tally = Tally()
        trainer.grpo_step(tally)
        rows.append({**tally.reduce(), "step_time": time.perf_counter() - t0, **trainer.phase.pop()})

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=SHAPE["rounds"], iterations=1)
    best = min(rows, key=lambda r: r["step_time"])
    result = {
        "step_time_s": best["step_time"],
        "tokens_per_s": best["tokens"] / best["step_time"],  # prompt + completion tokens of the step
        "tokens": best["tokens"], "completion_length": best["completion_length"],
        "phases_s": {k.removeprefix("time/"): v for k, v in best.items() if k.startswith("time/")},
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None,
    }
    results[path] = result
    benchmark.extra_info.update(result)
    trainer = None  # frees the model (the closure holds it too) before the other path
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
