"""What Qwen2.5-VL's processor returns for one prompt, built without it: chat template, `<|video_pad|>`
expanded to the clip's token count, video patches, and the 3-D positions vcr1 passes explicitly.

(transformers' video processor needs torchvision; vcr1 decodes and preprocesses in torch instead.)
"""
from __future__ import annotations

import torch

from vcr1.data.video import Clip, num_video_tokens, video_inputs
from vcr1.model import mm_token_type_ids, mrope_positions

VIDEO_PAD = "<|video_pad|>"


def encode_prompt(tokenizer, messages: list[dict], video_tokens: list[int]) -> list[int]:
    """Token ids of the chat prompt (with the assistant header), each video placeholder expanded."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pieces = text.split(VIDEO_PAD)
    if len(pieces) - 1 != len(video_tokens):
        raise ValueError(f"prompt holds {len(pieces) - 1} video placeholders for {len(video_tokens)} videos")
    pad_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if i < len(video_tokens):
            ids += [pad_id] * video_tokens[i]
    return ids


def prompt_inputs(tokenizer, model_config, messages: list[dict], video: Clip | dict) -> dict:
    """Model inputs of one prompt with one video, batch dimension 1, as the HF processor lays them out.

    `video` is a Clip, or its `video_inputs([clip])` already made: prompts given the same dict share its
    tensors, and the packed forward then encodes that video once. Also holds `position_ids` (3, 1, L)
    from `mrope_positions`, and `mm_token_type_ids` (0 text, 2 video) that transformers >= 5 needs to
    place video tokens during `generate`.
    """
    if isinstance(video, Clip):
        video = video_inputs([video])
    grid = video["video_grid_thw"]
    ids = torch.tensor([encode_prompt(tokenizer, messages, [num_video_tokens(g) for g in grid])])
    second = torch.as_tensor(video["second_per_grid_ts"], dtype=torch.float32).reshape(-1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": video["pixel_values_videos"],
        "video_grid_thw": grid,
        "second_per_grid_ts": second,
        "mm_token_type_ids": mm_token_type_ids(ids, model_config),
        "position_ids": mrope_positions(ids[0], grid, second, model_config)[:, None, :],
    }
