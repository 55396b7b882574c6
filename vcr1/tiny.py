"""The embedded default model: a tiny random Qwen2.5-VL and a tokenizer built locally.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on the task prompts and answer
formats, carrying Qwen2.5-VL's special tokens and chat template, so the prompt code that serves a real
Qwen2.5-VL tokenizer serves this one unchanged.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig

# Qwen2's pre-tokenizer split: digits one by one, words with their leading space.
QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's special tokens, in its order.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2.5-VL's chat template: default system prompt, vision placeholders in content order.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOKENIZER_VOCAB = 1024


def _corpus(seed: int = 0) -> list[str]:
    """Prompts and answers of the synthetic default's tasks (their `corpus`), with varied numbers and words."""
    from vcr1.data.synthetic import COLORS, SHAPES
    from vcr1.tasks import SYNTHETIC, get_task

    tasks = [get_task(name) for name in SYNTHETIC]
    rng = random.Random(seed)
    lines = []
    for _ in range(300):
        obj = f"{rng.choice(COLORS)} {rng.choice(SHAPES)}"
        span = tuple(sorted(round(rng.uniform(0, 60), 2) for _ in range(2)))
        box = [round(rng.random(), 2) for _ in range(4)]
        options = [f"({c}) {rng.choice(COLORS)} {rng.choice(SHAPES)}" for c in "ABCD"]
        draw = {"object": obj, "span": span, "box": box, "options": options, "letter": rng.choice("ABCD")}
        for think in (True, False):
            lines += [task.corpus(draw, think) for task in tasks]
        lines += [task.corpus(draw, None) for task in tasks]
    return lines


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE (deterministic for a seed) and wrap it like Qwen2.5-VL's tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL small enough to train on 2 CPU cores; same patch/merge geometry as the real one."""
    ids = tokenizer.convert_tokens_to_ids
    vocab = 64 * -(-len(tokenizer) // 64)
    hidden, heads = 128, 4
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=4,
            num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=8192,
            rms_norm_eps=1e-6, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            # mRoPE splits head_dim/2 = 16 rotary frequencies into t/h/w sections.
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6]),
        ),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
            window_size=112, fullatt_block_indexes=[1],
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


# ---- the shipped warm start (`python -m vcr1.warm_start` rebuilds it)

WARM_START = Path(__file__).resolve().parent / "assets" / "warm_start.safetensors"
SHIPPED = "warm_start"  # the value of --model.init that names WARM_START (configs/tiny.yaml's)


def init_file(init: str | None) -> Path | None:
    """The weights file a --model.init value names: WARM_START for `warm_start`, None for unset/none."""
    if init is None:
        return None
    return WARM_START if init == SHIPPED else Path(init)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and merges: weights only fit the tokenizer they were trained with."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def load_warm_start(model, path, tokenizer) -> dict:
    """Load the weights of `path` into the tiny `model` (every parameter, same shapes); returns the metadata.

    Raises ValueError when the file was built for another tokenizer (the tokenizer is rebuilt from the
    prompts, so changing a prompt changes it): rebuild with `python -m vcr1.warm_start`.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("vcr1", "{}"))
    if meta.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{path} was built for another tokenizer (fingerprint {meta.get('tokenizer')}, this one "
                         f"{tokenizer_fingerprint(tokenizer)}); rebuild it with `python -m vcr1.warm_start`")
    model.load_state_dict(load_file(str(path)), strict=True)
    return meta
