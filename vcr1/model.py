"""Loading Qwen2.5-VL (a local checkpoint or the tiny default), its 3-D mRoPE positions, and a forward
that returns hidden states so the LM head can run through the fused kernels.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2_5_VLForConditionalGeneration

from vcr1 import tiny
from vcr1.config import DTYPE_NAMES

DTYPES = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float16, torch.float32)))


def load_tokenizer(model_dir: str | None) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, or the locally built tiny one when no checkpoint is given."""
    if model_dir is None:
        return tiny.build_tokenizer()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.chat_template is None:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template "
                         "(copy chat_template.json from the base model)")
    return tok


def load_model(model_dir: str | None, tokenizer, *, dtype: str = "fp32", attn: str = "sdpa",
               seed: int = 0, init: str | None = None) -> Qwen2_5_VLForConditionalGeneration:
    """A local Qwen2.5-VL checkpoint, or the tiny default built from its config: random (seeded) or, with
    `init`, the weights of a warm-start file (see vcr1.warm_start; `warm_start` names the shipped one)."""
    if model_dir is None:
        model = tiny.build_model(tokenizer, seed=seed, init=init)
        model.config._attn_implementation = attn
        return model.to(DTYPES[dtype])
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json there "
                                "(a local Qwen2.5-VL checkpoint is expected)")
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=DTYPES[dtype], attn_implementation=attn)


def mrope_positions(input_ids: torch.Tensor, video_grid_thw: torch.Tensor | None,
                    second_per_grid_ts, config) -> torch.Tensor:
    """3-D rotary positions (3, L) of one unpadded sequence, as the original Qwen2.5-VL release computes them.

    Text tokens advance all three rows by one. A video block of T×H×W merged tokens gets
    t = floor(i · second_per_grid_t · tokens_per_second), h and w = its grid row and column, all offset by
    the position where the block starts; the text after it resumes at the block's largest position + 1.
    (transformers 5.x resumes at start + max(H, W) instead, which the released checkpoints never saw.)
    """
    merge = config.vision_config.spatial_merge_size
    tokens_per_second = config.vision_config.tokens_per_second
    is_video = (input_ids == config.video_token_id).tolist()
    grids = [] if video_grid_thw is None else video_grid_thw.tolist()
    seconds = [1.0] * len(grids) if second_per_grid_ts is None else [float(s) for s in second_per_grid_ts]

    rows, start, i, n, video = [], 0, 0, len(is_video), 0
    while i < n:
        if not is_video[i]:
            j = i
            while j < n and not is_video[j]:
                j += 1
            rows.append(torch.arange(start, start + j - i).expand(3, -1))
            start += j - i
            i = j
            continue
        if video >= len(grids):
            raise ValueError("more video blocks in input_ids than rows in video_grid_thw")
        t, h, w = grids[video][0], grids[video][1] // merge, grids[video][2] // merge
        tt = (torch.arange(t, dtype=torch.float64) * seconds[video] * tokens_per_second).long()
        block = torch.stack(torch.meshgrid(tt, torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1) + start
        if i + block.shape[1] > n or not all(is_video[i:i + block.shape[1]]):
            raise ValueError(f"video {video}: expected {block.shape[1]} consecutive video tokens at {i}")
        rows.append(block)
        start = int(block.max()) + 1
        i += block.shape[1]
        video += 1
    if video != len(grids):
        raise ValueError(f"video_grid_thw has {len(grids)} rows but input_ids hold {video} video blocks")
    return torch.cat(rows, dim=1).to(input_ids.device) if rows else torch.zeros(3, 0, dtype=torch.long)


def prompt_positions(prompt: dict, config) -> torch.Tensor:
    """A processed prompt's 3-D positions (3, L): its own `position_ids` when it has them, else
    `mrope_positions` of its tokens and video grid."""
    if prompt.get("position_ids") is not None:
        return prompt["position_ids"].reshape(3, -1)
    ids = prompt["input_ids"].reshape(-1)
    return mrope_positions(ids, prompt.get("video_grid_thw"), prompt.get("second_per_grid_ts"), config)


def answer_start(prompt_positions: torch.Tensor) -> int:
    """The release rule for generated text: answer token k sits at the prompt's largest position + 1 + k,
    all three rows equal (docs/design.md, "Positions (mRoPE): the release rule")."""
    return int(prompt_positions.max()) + 1 if prompt_positions.numel() else 0


def answer_positions(prompt_positions: torch.Tensor, length: int) -> torch.Tensor:
    """Positions (3, length) of an answer of `length` tokens after a prompt at `prompt_positions`."""
    start = answer_start(prompt_positions)
    return torch.arange(start, start + length, device=prompt_positions.device).expand(3, -1)


def mm_token_type_ids(input_ids: torch.Tensor, config) -> torch.Tensor:
    """0 for text, 2 for video tokens: what transformers >= 5 needs to place video tokens in `generate`."""
    return (input_ids == config.video_token_id).int() * 2


END_OF_TURN = "<|im_end|>"  # how Qwen's chat template closes every turn, the assistant's included


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn: what a complete answer ends with (see `stop_ids`)."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {END_OF_TURN} token")
    return token_id


def stop_ids(model, tokenizer=None) -> list[int]:
    """The token ids that end a completion: the end of the chat turn and <|endoftext|> (when the tokenizer
    is given), and the eos ids of the checkpoint's generation config and text config."""
    ids = set()
    if tokenizer is not None:
        ids |= {end_of_turn_id(tokenizer), tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    for source in (getattr(model, "generation_config", None), model.config.text_config):
        extra = getattr(source, "eos_token_id", None)
        ids |= set(extra if isinstance(extra, (list, tuple)) else [extra])
    found = sorted(i for i in ids if isinstance(i, int) and i >= 0)
    if not found:
        raise ValueError("no stop token: the tokenizer and the model's configs name no eos_token_id")
    return found


def accepts_mm_token_type_ids(model) -> bool:
    """transformers >= 5 needs mm_token_type_ids to place video tokens during generate; older ones reject it."""
    return "mm_token_type_ids" in inspect.signature(model.forward).parameters


def hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                  pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None) -> torch.Tensor:
    """Last hidden states [B, L, H] of the language model (the LM head is left to the fused kernels)."""
    out = model.model(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
        pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts, use_cache=False,
    )
    return out.last_hidden_state


class LMHead(torch.nn.Module):
    """Stands in for `model.lm_head`, holding the same weight Parameter.

    Called plainly it returns logits (HF generate needs that); called with `fn` it hands the weight to a
    fused kernel, `fn(hidden, weight, **kw)`. Going through a module call matters under ZeRO-3: DeepSpeed
    gathers a module's sharded parameters only around that module's own forward and backward.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight

    def forward(self, hidden: torch.Tensor, fn=None, **kwargs):
        if fn is None:
            return torch.nn.functional.linear(hidden, self.weight)
        return fn(hidden, self.weight, **kwargs)


def install_lm_head(model) -> None:
    if not isinstance(model.lm_head, LMHead):
        model.lm_head = LMHead(model.lm_head)
