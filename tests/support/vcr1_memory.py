"""What tests/test_packing.py and bench/test_bench_memory.py share: a Qwen2.5-VL with 7B's proportions,
one video group, and the bytes a forward keeps for backward.

The proportions of Qwen2.5-VL-7B's language model: 7 query heads per key/value head (28 / 4), MLP width
18944 / 3584 = 5.29x the hidden size; the hidden size and depth are small so that it runs on a CPU.
"""
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vcr1 import packing
from vcr1.model import answer_positions, prompt_positions

VOCAB = 512
VISION_START, VISION_END, VIDEO = VOCAB - 3, VOCAB - 2, VOCAB - 1
TEXT_IDS = VOCAB - 8  # text ids lie below the special ones
PATCH_DIM = 3 * 2 * 14 * 14


def proportioned_model(head_dim: int = 16, kv_heads: int = 2, layers: int = 2, seed: int = 0):
    """Qwen2.5-VL with 7B's GQA 7:1 and MLP 5.29x hidden at hidden = 7 · kv_heads · head_dim, fp32, sdpa."""
    heads = 7 * kv_heads
    hidden = heads * head_dim
    half = head_dim // 2  # mRoPE sections (t, h, w) over half the head dimension, 7B's 16:24:24 ratio
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=round(hidden * 18944 / 3584),
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=32768, pad_token_id=0, bos_token_id=0, eos_token_id=1,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=section),
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
            fullatt_block_indexes=[1],
        ),
        video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).float()


def video_group(grid: tuple[int, int, int], prompt_tokens: int, group: int, answer: int, seed: int = 0):
    """A prompt of exactly prompt_tokens tokens (text around a video block of t·h·w/4 tokens) and
    `group` answers of `answer` tokens, as the processor and the sampler return them."""
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    text = prompt_tokens - t * h * w // 4 - 2
    if text < 0:
        raise ValueError(f"a grid of {grid} does not fit in {prompt_tokens} prompt tokens")
    words = torch.randint(2, TEXT_IDS, (text,), generator=gen)
    ids = torch.cat([words[:text // 2], torch.tensor([VISION_START]), torch.full((t * h * w // 4,), VIDEO),
                     torch.tensor([VISION_END]), words[text // 2:]])
    prompt = {
        "input_ids": ids[None],
        "pixel_values_videos": torch.randn(t * h * w, PATCH_DIM, generator=gen),
        "video_grid_thw": torch.tensor([grid]),
        "second_per_grid_ts": torch.tensor([1.0]),
    }
    answers = [torch.randint(2, TEXT_IDS, (answer,), generator=gen) for _ in range(group)]
    return prompt, answers


def saved_bytes(model, forward) -> tuple[int, object]:
    """Bytes of the distinct storages autograd keeps for backward while `forward()` runs, the model's
    parameters excluded; and what forward returned (keep it alive until the count is read)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(saved.values()), out


def ideal_hidden(model, prompt: dict, answers: list[torch.Tensor]) -> torch.Tensor:
    """The no-copy ideal: one plain causal forward over prompt ‖ all answers concatenated (the model's
    own sdpa path, no mask), hidden states of the same completion tokens the group forward returns."""
    ids = torch.cat([prompt["input_ids"][0], *answers])
    pos = prompt_positions(prompt, model.config)
    pos = torch.cat([pos, answer_positions(pos, len(ids) - pos.shape[1])], 1)
    hidden = model.model(input_ids=ids[None], position_ids=pos[:, None], use_cache=False,
                         pixel_values_videos=prompt["pixel_values_videos"], video_grid_thw=prompt["video_grid_thw"],
                         second_per_grid_ts=prompt["second_per_grid_ts"]).last_hidden_state[0]
    return hidden[prompt["input_ids"].shape[1] - 1:-1]


def group_forwards(model, prompt: dict, answers: list[torch.Tensor]) -> dict:
    """The group forward of one group per path, each returning the completion tokens' hidden states:
    the packed row (the prefix backend), the packed row with the copying reference backend (sdpa), the
    repeated-prompt padded batch, and the ideal; and, where the model's device and dtype run it (CUDA),
    the packed row with the flex backend ("packed_flex")."""
    forwards = {
        "packed": lambda: packing.completion_hidden(model, [prompt], [answers], attn_backend="prefix")[0],
        "packed_sdpa": lambda: packing.completion_hidden(model, [prompt], [answers], attn_backend="sdpa")[0],
        "padded": lambda: packing.completion_hidden(model, [prompt], [answers], shared_prefix=False)[0],
        "ideal": lambda: ideal_hidden(model, prompt, answers),
    }
    if packing.unavailable_reason("flex", model.device, model.dtype) is None:
        forwards["packed_flex"] = lambda: packing.completion_hidden(model, [prompt], [answers], attn_backend="flex")[0]
    return forwards


def group_saved_bytes(model, prompt: dict, answers: list[torch.Tensor]) -> dict[str, int]:
    """Bytes saved for backward by each of group_forwards."""
    return {name: saved_bytes(model, forward)[0] for name, forward in group_forwards(model, prompt, answers).items()}
