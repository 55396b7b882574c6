"""The typed config: paper defaults, the recipes in configs/, YAML + CLI precedence, clear errors before any work."""
import subprocess
import sys

import pytest
import torch
import yaml

from vcr1.config import DEFAULT_CONFIG, LEAVES, ConfigError, TrainConfig, parse_config, read_config_file, to_dict
from vcr1.preflight import check
from vcr1.train import CHOICES
from vcr1_testing import REPO

TINY = REPO / "configs" / "tiny.yaml"
PAPER = REPO / "configs" / "videochat_r1_7b.yaml"

# What the no-argument run resolved to before the recipes moved to configs/ (vcr1/config.py's TINY_PRESET, on the
# paper's defaults): the spec of the default run. model.init then held the shipped file's path; tiny.yaml names it
# `warm_start`, which resolves to the same file.
OLD_TINY_PRESET = {
    "model.dtype": "fp32", "model.gradient_checkpointing": False,
    "data.think": False, "data.interleave_tasks": True, "data.video.max_frames": 16,
    "data.video.total_pixels": 16 * 112 * 112, "data.video.max_pixels": 112 * 112, "data.video.min_pixels": 56 * 56,
    "data.synthetic_train": 96, "data.reshuffle": False, "data.synthetic_test": 192,
    "grpo.num_generations": 8, "grpo.max_completion_length": 200, "grpo.temperature": 0.4,
    "grpo.scale_rewards": "batch",
    "sft.steps": 0, "sft.lr": 2e-3, "sft.batch_size": 8,
    "optim.lr": 1e-4, "optim.scheduler": "constant",
    "engine.zero_stage": 0, "engine.offload": False,
    "prompts_per_step": 6, "max_steps": 120, "epochs": 100, "save_every": 60, "eval_limit": 3 * 192,
    "eval_batch_size": 48, "eval_before_after": True, "samples_every": 10,
}


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "qwen"
    d.mkdir()
    return str(d)


def test_real_runs_default_to_the_paper(model_dir, tmp_path):
    """The paper's recipe, and the dataclass defaults under it (a recipe file that sets nothing)."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing: the paper's defaults\n")
    for argv in (["--config", str(PAPER), "--model", model_dir], ["--config", str(empty), "--model", model_dir]):
        _assert_paper(parse_config(argv))
    cfg = parse_config(["--config", str(PAPER), "--model", model_dir])
    assert cfg.stage == "grpo" and cfg.epochs == 1 and cfg.max_steps is None and cfg.model.init is None
    assert cfg.model.path == model_dir and cfg.optim.warmup_steps == 0 and cfg.engine.offload
    assert [d["task"] for d in cfg.data.datasets] == [d["task"] for d in cfg.data.eval_datasets] == \
        ["tg", "tracking", "gqa"]
    assert parse_config(["--config", str(PAPER)]).model.path == "/models/Qwen2.5-VL-7B-Instruct"


def _assert_paper(cfg):
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


def test_no_argument_config_is_tiny_yaml():
    assert DEFAULT_CONFIG == TINY.resolve() and TINY.is_file()
    assert parse_config([]) == parse_config(["--config", str(TINY)]) == read_config_file(TINY)
    assert parse_config([]) != TrainConfig()  # the file is applied: not the paper's defaults


def test_tiny_yaml_gives_what_the_old_preset_gave():
    from vcr1.tiny import WARM_START, init_file

    flat, paper = _flat(to_dict(parse_config([]))), _flat(to_dict(TrainConfig()))
    expected = {**paper, **OLD_TINY_PRESET, "model.init": "warm_start"}  # every other key: the paper's default
    assert flat == expected
    assert init_file(flat["model.init"]) == WARM_START


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
    (["--engine.loss_backend", "cuda"], "not one of auto, triton, torch"),
    (["--optim.lr", "fast"], "'fast' is not a valid float"),
    (["--grpo.num_generations", "1"], "num_generations must be >= 2"),
    (["--data", "tg:only-two"], "is not task:annotations:media_root"),
    (["--engine.zero_stage", "4"], "not one of 0, 1, 2, 3"),
])
def test_bad_options_are_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=None) as e:
        parse_config(argv, choices=CHOICES)
    assert message in str(e.value)


@pytest.mark.parametrize("argv,message", [
    (["--config", str(PAPER), "--model", "/no/such/dir"], "--model /no/such/dir: no such directory"),
    (["--data", "tg:/no/such.json:/v"], "annotation file /no/such.json does not exist"),
    (["--grpo.loss_type", "ppo"], "--grpo.loss_type: 'ppo' is not one of grpo, bnpo, dr_grpo, dapo"),
    (["--model.init", "/no/such.safetensors"], "--model.init /no/such.safetensors: no such file"),
])
def test_what_needs_files_or_other_modules_is_checked_at_start(argv, message):
    """Parsing looks at no file and no other module (config.py is a leaf): the start-up checks do."""
    assert any(message in p for p in check(parse_config(argv)).problems)


def test_config_is_a_leaf_module():
    code = "import sys, vcr1.config; print(sorted(m for m in sys.modules if m.startswith('vcr1')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["['vcr1',", "'vcr1.config']"], out.stdout + out.stderr


def test_model_over_the_tiny_recipe_is_an_error(model_dir, tmp_path):
    """--model DIR without --config would run a 7B model with the tiny recipe's settings: refused, with the fix."""
    for argv in (["--model", model_dir], ["--config", str(TINY), "--model.path", model_dir]):
        with pytest.raises(ConfigError) as e:
            parse_config(argv)
        assert "--config configs/videochat_r1_7b.yaml" in str(e.value) and "tiny" in str(e.value)
    out = subprocess.run([sys.executable, str(REPO / "vcr1/train.py"), "--model", model_dir,
                          "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "configs/videochat_r1_7b.yaml" in out.stderr and not (tmp_path / "o").exists()
    # the tiny recipe with another init, or a real checkpoint with a recipe of its own, are fine
    assert parse_config(["--model", model_dir, "--model.init", "none"]).model.path == model_dir


@pytest.mark.skipif(torch.cuda.is_available(), reason="these values run on a CUDA machine")
@pytest.mark.parametrize("argv,message", [
    (["--model.dtype", "fp16"], "fp16 needs a CUDA GPU"),
    (["--data.video.decode_device", "cuda"], "decode_device cuda needs a CUDA GPU"),
    (["--model.attn", "flash_attention_2", "--model.dtype", "bf16"], "flash_attention_2 needs"),
])
def test_values_this_machine_cannot_run_are_refused_at_start(argv, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    problems = check(parse_config(argv)).problems
    assert len(problems) == 1 and message in problems[0] and "\n" not in problems[0]
    assert any("loss_backend triton needs a CUDA GPU" in p
               for p in check(parse_config(["--engine.loss_backend", "triton"])).problems)
    with pytest.raises(ConfigError, match="'eager' is not one of sdpa, flash_attention_2"):
        parse_config(["--model.attn", "eager"])


def test_saved_config_reruns_the_same_run(tmp_path, model_dir):
    """The resolved config.yaml a run writes, given back with --config, rebuilds the identical config."""
    ann = tmp_path / "a.json"
    ann.write_text("{}")
    for recipe in (["--config", str(PAPER), "--model", model_dir], []):
        cfg = parse_config([*recipe, "--grpo.delta", "1.5", "--grpo.reward_weights", "{iou: 2.0}",
                            "--data", f"tg:{ann}:/v"])
        saved = tmp_path / "config.yaml"
        saved.write_text(yaml.safe_dump(to_dict(cfg)))
        assert parse_config(["--config", str(saved)]) == cfg


def _help(*argv) -> str:
    out = subprocess.run([sys.executable, str(REPO / "vcr1/train.py"), *argv, "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return " ".join(out.stdout.split())


def test_help_lists_every_option_with_the_value_the_run_would_use():
    """--help's defaults are the recipe's: tiny.yaml without --config, else the --config given with --help."""
    text = _help()
    for key in LEAVES:
        assert f"--{key}" in text
    assert "--dry_run" in text and "with configs/tiny.yaml applied" in text
    assert "sampling temperature (default: 0.4)" in text and "GRPO learning rate (AdamW) (default: 0.0001)" in text
    assert "(default: warm_start)" in text and "loss aggregation {grpo, bnpo, dr_grpo, dapo} (default: grpo)" in text
    assert "{auto, triton, torch} (default: auto)" in text
    text = _help("--config", "configs/videochat_r1_7b.yaml")
    assert "with configs/videochat_r1_7b.yaml applied" in text
    assert "sampling temperature (default: 1.0)" in text and "GRPO learning rate (AdamW) (default: 1e-06)" in text
    assert "(default: /models/Qwen2.5-VL-7B-Instruct)" in text


def test_cli_config_error_exits_before_work(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "vcr1/train.py"), "--grpo.temprature", "1",
                          "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown option --grpo.temprature" in out.stderr
    assert not (tmp_path / "o").exists()
