"""The typed config: paper defaults, YAML + CLI precedence, clear errors before any work."""
import subprocess
import sys

import pytest
import torch
import yaml

from vcr1.config import LEAVES, TINY_PRESET, ConfigError, parse_config, to_dict
from vcr1_testing import REPO


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "qwen"
    d.mkdir()
    return str(d)


def test_real_runs_default_to_the_paper(model_dir):
    cfg = parse_config(["--model", model_dir])
    g, o = cfg.grpo, cfg.optim
    assert (g.num_generations, g.beta, g.temperature, g.top_k, g.top_p) == (8, 0.04, 1.0, 50, 1.0)
    assert (g.max_completion_length, g.num_iterations, g.loss_type, g.scale_rewards) == (1024, 1, "grpo", "group")
    assert (o.lr, o.weight_decay, o.max_grad_norm, o.scheduler, o.warmup_steps) == (1e-6, 0.0, 1.0, "linear", 0)
    assert (cfg.engine.zero_stage, cfg.engine.offload, cfg.model.dtype, cfg.model.gradient_checkpointing) == \
        (3, True, "bf16", True)
    v = cfg.data.video
    assert (v.fps, v.min_frames, v.max_frames, v.total_pixels, v.min_pixels, v.max_pixels) == \
        (2.0, 4, 768, 3584 * 28 * 28, 16 * 28 * 28, 768 * 28 * 28)
    assert cfg.sft.steps == 0 and cfg.prompts_per_step == 1 and cfg.data.think


def test_embedded_default_applies_the_tiny_preset():
    cfg = parse_config([])
    flat = {k: v for k, v in _flat(to_dict(cfg)).items()}
    for key, value in TINY_PRESET.items():
        assert flat[key] == value, key


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and prefix + k not in LEAVES:
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def test_yaml_then_cli_precedence(tmp_path, model_dir):
    y = tmp_path / "c.yaml"
    y.write_text(f"model: {model_dir}\ngrpo:\n  beta: 0.1\n  loss_type: dapo\noptim.lr: 2.0e-6\n")
    cfg = parse_config(["--config", str(y), "--grpo.beta", "0.2"])
    assert cfg.model.path == model_dir and cfg.grpo.loss_type == "dapo" and cfg.optim.lr == 2e-6
    assert cfg.grpo.beta == 0.2  # the flag beats the file


def test_datasets_from_yaml_and_inline(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text("{}")
    y = tmp_path / "data.yaml"
    y.write_text(f"datasets:\n  - {{task: gqa, annotations: {ann}, media_root: /v, limit: 5}}\n")
    cfg = parse_config(["--data", str(y), f"tg:{ann}:/videos"])
    assert [(d["task"], d["media_root"], d["limit"]) for d in cfg.data.datasets] == [("gqa", "/v", 5),
                                                                                    ("tg", "/videos", None)]


@pytest.mark.parametrize("argv,message", [
    (["--grpo.bta", "0"], "unknown option --grpo.bta (did you mean --grpo.beta"),
    (["--grpo.loss_type", "ppo"], "not one of grpo, bnpo, dr_grpo, dapo"),
    (["--optim.lr", "fast"], "'fast' is not a valid float"),
    (["--grpo.num_generations", "1"], "num_generations must be >= 2"),
    (["--model", "/no/such/dir"], "no such directory"),
    (["--data", "tg:/no/such.json:/v"], "does not exist"),
    (["--data", "tg:only-two"], "is not task:annotations:media_root"),
    (["--engine.zero_stage", "4"], "not one of 0, 1, 2, 3"),
])
def test_bad_options_are_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=None) as e:
        parse_config(argv)
    assert message in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="these values run on a CUDA machine")
@pytest.mark.parametrize("argv,message", [
    (["--model.dtype", "fp16"], "fp16 needs a CUDA GPU"),
    (["--data.video.decode_device", "cuda"], "decode_device cuda needs a CUDA GPU"),
    (["--model.attn", "flash_attention_2", "--model.dtype", "bf16"], "flash_attention_2 needs"),
    (["--model.attn", "eager"], "'eager' is not one of sdpa, flash_attention_2"),
])
def test_values_this_machine_cannot_run_are_refused_at_start(argv, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError) as e:
        parse_config(argv)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="loss_backend triton needs a CUDA GPU"):
        parse_config(["--engine.loss_backend", "triton"])


def test_saved_config_reruns_the_same_run(tmp_path, model_dir):
    """The resolved config.yaml a run writes, given back with --config, rebuilds the identical config."""
    ann = tmp_path / "a.json"
    ann.write_text("{}")
    cfg = parse_config(["--model", model_dir, "--grpo.delta", "1.5", "--grpo.reward_weights", "{iou: 2.0}",
                        "--data", f"tg:{ann}:/v"])
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(cfg)))
    assert parse_config(["--config", str(saved)]) == cfg


def test_help_lists_every_option_with_its_default():
    out = subprocess.run([sys.executable, str(REPO / "vcr1/train.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for key in LEAVES:
        assert f"--{key}" in text
    assert "(default: 0.04)" in text and "(default: 1e-06)" in text


def test_cli_config_error_exits_before_work(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "vcr1/train.py"), "--grpo.temprature", "1",
                          "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown option --grpo.temprature" in out.stderr
    assert not (tmp_path / "o").exists()
