"""`python -m vcr1.tiny --family qwen2_5_vl --out DIR`: the tiny model as a Hugging Face checkpoint directory.
transformers' own classes load it with the weights written, vcr1 loads it as the tiny default and trains
on it, and the command refuses what it should."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from vcr1 import tiny
from vcr1.data.video import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Clip, video_inputs
from vcr1.distributed import standalone_env
from vcr1.model import load_model, load_tokenizer, stop_ids
from vcr1_testing import REPO

FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json"}
TEXTS = ["Give the start and end time of the red circle in seconds.", "<answer>12.5 - 30.25</answer>",
         "  spaces, digits 0123 and\nnew lines\r\n", "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
         "Which colour?<|im_end|>\n<|im_start|>assistant\n"]
MESSAGES = [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}, {"type": "text", "text": "Which one?"}]}]


def env():
    return standalone_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """The command as a user runs it: the shipped warm start (the default --init)."""
    out = tmp_path_factory.mktemp("tiny") / "qwen2_5_vl"
    run = subprocess.run([sys.executable, "-m", "vcr1.tiny", "--family", "qwen2_5_vl", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=env())
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"wrote qwen2_5_vl checkpoint {out}" in run.stdout and "model.safetensors" in run.stdout
    return out


def assert_equal_weights(loaded: dict, expected: dict):
    assert loaded.keys() == expected.keys()
    unequal = [k for k in expected if not torch.equal(loaded[k], expected[k])]
    assert not unequal, unequal[:5]


def test_the_directory_is_a_qwen2_5_vl_checkpoint(warm):
    assert FILES <= {p.name for p in warm.iterdir()}, FILES - {p.name for p in warm.iterdir()}
    assert [p.name for p in warm.parent.iterdir()] == [warm.name]  # no temporary folder left beside it
    config = json.loads((warm / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["model_type"] == "qwen2_5_vl" and config["dtype"] == "float32"
    assert AutoConfig.from_pretrained(warm).model_type == "qwen2_5_vl"


def test_transformers_loads_the_shipped_warm_start(warm):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(warm)
    assert next(model.parameters()).dtype == torch.float32
    assert_equal_weights(model.state_dict(), load_file(tiny.WARM_START))


def test_random_weights_are_those_of_the_seed(tmp_path, tokenizer):
    """--init none --seed N: vcr1's tiny default's random weights of seed N. --force writes into a non-empty
    directory, leaving its other files."""
    out = tmp_path / "random"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert tiny.main(["--out", str(out), "--init", "none", "--seed", "3", "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and FILES <= {p.name for p in out.iterdir()}
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).state_dict()
    expected = load_model(None, tokenizer, seed=3).state_dict()
    assert_equal_weights(loaded, expected)
    other = load_model(None, tokenizer, seed=0).state_dict()
    assert not all(torch.equal(expected[k], other[k]) for k in expected)


def test_transformers_loads_the_same_tokenizer(warm, tokenizer):
    loaded = AutoTokenizer.from_pretrained(warm)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids and loaded.decode(ids) == text
    for name in tiny.SPECIAL_TOKENS:
        assert loaded.convert_tokens_to_ids(name) == tokenizer.convert_tokens_to_ids(name)
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for generation_prompt in (True, False):
        assert loaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt) == \
            tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
    # The template as Qwen2.5-VL checkpoints carry it: in tokenizer_config.json and in chat_template.json.
    assert json.loads((warm / "tokenizer_config.json").read_text())["chat_template"] == tiny.CHAT_TEMPLATE
    assert json.loads((warm / "chat_template.json").read_text()) == {"chat_template": tiny.CHAT_TEMPLATE}


def test_vcr1_loads_it_as_the_tiny_default(warm, tokenizer):
    """`--model DIR` gives the model and tokenizer of the tiny default with the warm start: same logits, same
    stop tokens (the generation config's eos ids are the end of the turn and <|endoftext|>)."""
    ours_tokenizer = load_tokenizer(str(warm))
    ours = load_model(str(warm), ours_tokenizer).eval()
    ref = load_model(None, tokenizer, init=tiny.SHIPPED).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[0]}], tokenize=False,
                                           add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt + TEXTS[1])["input_ids"]])
    assert ours_tokenizer(prompt + TEXTS[1])["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
    eos = json.loads((warm / "generation_config.json").read_text())["eos_token_id"]
    ends = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert eos == ends and stop_ids(ours) == stop_ids(ours, ours_tokenizer) == stop_ids(ref, tokenizer) == sorted(ends)


def test_processor_files(warm):
    """preprocessor_config.json and video_preprocessor_config.json carry Qwen2.5-VL's processor settings at the
    tiny recipe's frame sizes; transformers' image processor loaded from them cuts a frame into vcr1's patches."""
    image = json.loads((warm / "preprocessor_config.json").read_text())
    video = json.loads((warm / "video_preprocessor_config.json").read_text())
    assert image["image_processor_type"] == "Qwen2VLImageProcessor"
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor" and "image_processor_type" not in video
    for config in (image, video):
        assert (config["patch_size"], config["temporal_patch_size"], config["merge_size"]) == (14, 2, 2)
        assert config["image_mean"] == list(OPENAI_CLIP_MEAN) and config["image_std"] == list(OPENAI_CLIP_STD)
        assert (config["min_pixels"], config["max_pixels"]) == (56 * 56, 112 * 112)
        assert config["size"] == {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
        assert config["processor_class"] == "Qwen2_5_VLProcessor" and config["do_normalize"] and config["do_rescale"]
    assert (video["min_frames"], video["max_frames"], video["fps"]) == (4, 16, 2.0)

    processor = AutoImageProcessor.from_pretrained(warm)  # the PIL backend without torchvision
    frame = torch.randint(0, 256, (3, 112, 84), dtype=torch.uint8)
    ref = processor(images=Image.fromarray(frame.permute(1, 2, 0).numpy()), return_tensors="pt")
    clip = Clip(frames=torch.stack([frame, frame]), frame_indices=[0, 1], timestamps=[0.0, 0.5], sample_fps=2.0,
                video_fps=2.0, duration=1.0)
    ours = video_inputs([clip])
    assert ours["video_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    torch.testing.assert_close(ours["pixel_values_videos"], ref["pixel_values"].float(), rtol=0, atol=1e-5)


def test_transformers_processor_loads_where_torchvision_is_installed(warm):
    """With torchvision, AutoProcessor gives Qwen2.5-VL's processor, whose video processor (from the hand-written
    video_preprocessor_config.json) turns frames into exactly vcr1's video inputs."""
    pytest.importorskip("torchvision", reason="transformers' video processors need torchvision")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(warm)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    video = processor.video_processor
    assert type(video).__name__ == "Qwen2VLVideoProcessor"
    assert (video.patch_size, video.temporal_patch_size, video.merge_size) == (14, 2, 2)
    assert (video.size.shortest_edge, video.size.longest_edge) == (56 * 56, 112 * 112)
    frames = torch.randint(0, 256, (4, 3, 112, 84), dtype=torch.uint8)
    ref = video(videos=[frames], return_tensors="pt")
    clip = Clip(frames=frames, frame_indices=list(range(4)), timestamps=[i / 2 for i in range(4)], sample_fps=2.0,
                video_fps=2.0, duration=2.0)
    ours = video_inputs([clip])
    assert ours["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist()
    torch.testing.assert_close(ours["pixel_values_videos"], ref["pixel_values_videos"], rtol=0, atol=1e-5)


def test_the_processor_sizes_are_the_tiny_recipes():
    video = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["data"]["video"]
    assert (video["min_pixels"], video["max_pixels"], video["max_frames"]) == \
        (tiny.MIN_PIXELS, tiny.MAX_PIXELS, tiny.MAX_FRAMES)


def test_a_non_empty_out_is_refused_without_force(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    run = subprocess.run([sys.executable, "-m", "vcr1.tiny", "--out", str(out)], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env=env())
    assert run.returncode == 2 and "not an empty directory" in run.stderr and "--force" in run.stderr, run.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_an_unknown_family_is_refused_with_the_supported_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tiny.main(["--family", "llava", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--family" in err and "llava" in err
    assert all(family in err for family in tiny.FAMILIES) and not (tmp_path / "o").exists()


def test_a_short_training_run_on_it(warm, tmp_path):
    """`vcr1/train.py --config RECIPE --model DIR`, the recipe being the tiny one without its model.init (which
    names the tiny model's own weights, refused with --model), made small: one GRPO step, and its checkpoint
    loads in transformers with the processor files beside it."""
    recipe = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    del recipe["model"]["init"]
    recipe["model"]["path"] = str(warm)
    recipe["data"].update(synthetic_train=4, synthetic_test=2)
    recipe["grpo"].update(num_generations=2, max_completion_length=12)
    recipe.update(max_steps=1, eval_before_after=False, prompts_per_step=2)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, str(REPO / "vcr1" / "train.py"), "--config", str(tmp_path / "recipe.yaml"),
                          "--model", str(warm), "--max_steps", "1", "--output_dir", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"vcr1: {warm} |" in run.stdout + run.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["grpo"] and {"loss", "reward", "kl"} <= rows[0].keys()
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == "step-000001"
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json"):
        assert (ckpt / name).read_text() == (warm / name).read_text(), name
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
    assert trained.config.model_type == "qwen2_5_vl"
