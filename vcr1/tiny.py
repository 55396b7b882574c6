"""The embedded default model: a tiny random Qwen2.5-VL and a tokenizer built locally.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on the task prompts and answer
formats, carrying Qwen2.5-VL's special tokens and chat template, so the prompt code that serves a real
Qwen2.5-VL tokenizer serves this one unchanged.

    python -m vcr1.tiny --family qwen2_5_vl --out DIR [--init warm_start|none] [--seed N] [--force]

writes the tiny model as a Hugging Face checkpoint directory of that family (see `FAMILIES`): what
`from_pretrained` and `--model DIR` load, for tests and for trying a model family's code path in seconds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
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


def build_model(tokenizer, *, seed: int = 0, init: str | None = None):
    """The tiny Qwen2.5-VL (fp32) of `tiny_config`: random weights drawn from `seed` (without touching the
    global RNG), or with `init` the weights of a warm-start file (`init_file`; `warm_start` = the shipped one)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer))
    if init is not None:
        load_warm_start(model, init_file(init), tokenizer)
    return model


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


# ---- the tiny model as a checkpoint directory of a model family (`python -m vcr1.tiny`)

# The frame sizes and counts the tiny recipe trains with (configs/tiny.yaml's data.video; fps and
# min_frames are the config's defaults): what the processor files tell a Hugging Face user to feed it.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
FPS, MIN_FRAMES, MAX_FRAMES = 2.0, 4, 16
# Qwen2VLVideoProcessor's own keys (its Qwen2VLVideoProcessorInitKwargs, less the two whose defaults are kept:
# cap_pixels_per_frame, max_video_tokens) besides transformers' VideosKwargs, and the file's class keys.
QWEN2_VL_VIDEO_KEYS = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "min_frames",
                       "max_frames", "processor_class", "video_processor_type")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def qwen2_vl_processor_configs(config) -> tuple[dict, dict]:
    """(preprocessor_config.json, video_preprocessor_config.json) of a Qwen2.5-VL checkpoint for `config`.

    The image processor's file is transformers' own: the PIL-backed Qwen2VLImageProcessorPil serialised by
    `to_json_string` (the torchvision-backed Qwen2VLImageProcessor and Qwen2VLVideoProcessor cannot be
    constructed without torchvision, which vcr1 does not install), with the backend-neutral type name a real
    checkpoint carries (AutoImageProcessor then picks torchvision when installed, else PIL), and the real
    checkpoint's top-level min_pixels, max_pixels and processor_class keys. The video processor's file is
    written by hand from it: its keys that a video processor takes (transformers' VideosKwargs and
    QWEN2_VL_VIDEO_KEYS) under `video_processor_type` Qwen2VLVideoProcessor, plus that class's frame sampling
    keys (fps, min_frames, max_frames, do_sample_frames)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import VideosKwargs

    vision = config.vision_config
    processor = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size)
    image = json.loads(processor.to_json_string())
    image.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor",
                 min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    video_keys = {*VideosKwargs.__annotations__, *QWEN2_VL_VIDEO_KEYS}
    video = {k: v for k, v in image.items() if k in video_keys}
    video.update(video_processor_type="Qwen2VLVideoProcessor", do_sample_frames=False, fps=FPS,
                 min_frames=MIN_FRAMES, max_frames=MAX_FRAMES)
    return image, video


def write_qwen2_5_vl(out: Path, *, seed: int = 0, init: str | None = SHIPPED) -> None:
    """Write the tiny Qwen2.5-VL into the empty directory `out` as a Qwen2.5-VL checkpoint ships: config.json,
    model.safetensors and generation_config.json (`save_pretrained`), the tokenizer (`save_pretrained`, the
    chat template inside tokenizer_config.json) and chat_template.json, and the processor files."""
    from transformers import GenerationConfig

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, init=init)
    ids = tokenizer.convert_tokens_to_ids
    # A completion ends at the end of the chat turn or at <|endoftext|>, as in Qwen2.5-VL's generation config.
    model.generation_config = GenerationConfig(
        bos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"),
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    _write_json(out / "chat_template.json", {"chat_template": tokenizer.chat_template})
    image, video = qwen2_vl_processor_configs(model.config)
    _write_json(out / "preprocessor_config.json", image)
    _write_json(out / "video_preprocessor_config.json", video)


# Model family -> the function that writes the tiny model of that family into an empty directory, called as
# `write(out, seed=N, init=SHIPPED or None)`. Adding a family here makes `--family NAME` write it.
FAMILIES = {
    "qwen2_5_vl": write_qwen2_5_vl,
}


def write_checkpoint(out: Path, family: str = "qwen2_5_vl", *, seed: int = 0, init: str | None = SHIPPED,
                     force: bool = False) -> list[str]:
    """Write the tiny model of `family` as a checkpoint directory `out`; returns the names of the files written.

    The files are written into a temporary sibling folder and moved into `out` when all are written, so a
    failure leaves `out` as it was. A non-empty `out` is refused unless `force`, which replaces the files of
    the same names and leaves any other file there."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out}: not empty (--force writes into it, replacing files of the same names)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        FAMILIES[family](tmp, seed=seed, init=init)
        out.mkdir(exist_ok=True)
        names = sorted(path.name for path in tmp.iterdir())
        for name in names:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            os.replace(tmp / name, out / name)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vcr1.tiny",
        description="Write vcr1's tiny model as a Hugging Face checkpoint directory of a model family "
                    "(from_pretrained and `vcr1/train.py --model DIR` load it).")
    p.add_argument("--family", default="qwen2_5_vl", choices=sorted(FAMILIES),
                   help="model family of the checkpoint (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="directory to write; must be empty or absent")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out, replacing files of the same names")
    p.add_argument("--init", default=SHIPPED, choices=(SHIPPED, "none"),
                   help=f"{SHIPPED}: the shipped warm-start weights ({WARM_START.name}, trained with this "
                        "tokenizer); none: random weights of --seed (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights of --init none (default: %(default)s)")
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out}: a file, not a directory")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        p.error(f"--out {args.out}: not an empty directory (--force writes into it, replacing files of the "
                "same names)")
    try:
        names = write_checkpoint(args.out, args.family, seed=args.seed,
                                 init=None if args.init == "none" else args.init, force=args.force)
    except (OSError, ValueError) as e:  # an unwritable --out; a warm start built for another tokenizer
        print(f"python -m vcr1.tiny: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.family} checkpoint {args.out} ({args.init}"
          f"{f', seed {args.seed}' if args.init == 'none' else ''}): {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
