"""The shipped warm start: rebuilt deterministically, loaded exactly, refused for another tokenizer."""
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vcr1.config import ConfigError, parse_config
from vcr1.model import load_model, load_tokenizer
from vcr1.tiny import WARM_START, build_tokenizer, init_file, load_warm_start, tokenizer_fingerprint
from vcr1.warm_start import STAGES, build

# The stages, shortened: a few warm-up steps on a few examples each.
SHORT = [(*stage, "--sft.steps", "3", "--sft.batch_size", "2", "--data.synthetic_train", "2",
          "--data.synthetic_test", "1", "--eval_limit", "3", "--data.video.max_frames", "8",
          "--grpo.max_completion_length", "8") for stage in STAGES]


def test_rebuild_is_bitwise_identical_and_loads_exactly(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    meta = build(first, stages=SHORT, threads=1, work=tmp_path / "run_a")
    build(second, stages=SHORT, threads=1, work=tmp_path / "run_b")
    assert first.read_bytes() == second.read_bytes()
    assert meta["recipe"] == " | ".join(" ".join(stage) for stage in SHORT)
    # the second stage started from the weights the first exported, and moved them
    stage_1 = tmp_path / "run_a" / "stage-1.safetensors"
    config = yaml.safe_load((tmp_path / "run_a" / "stage-2" / "config.yaml").read_text())
    assert config["model"]["init"] == str(stage_1)
    assert not torch.equal(load_file(str(stage_1))["lm_head.weight"], load_file(str(first))["lm_head.weight"])

    tokenizer = load_tokenizer(None)
    weights = load_file(str(first))
    model = load_model(None, tokenizer, seed=123, init=str(first))
    state = model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    random = load_model(None, tokenizer, seed=123)
    assert not torch.equal(random.lm_head.weight, model.lm_head.weight)  # the file's, not the seed's


def test_shipped_warm_start_fits_the_tokenizer_built_today():
    tokenizer = build_tokenizer()
    model = load_model(None, tokenizer)
    meta = load_warm_start(model, WARM_START, tokenizer)
    assert meta["tokenizer"] == tokenizer_fingerprint(tokenizer)
    assert "--stage sft" in meta["recipe"]


def test_another_tokenizer_is_refused():
    tokenizer = build_tokenizer()
    model = load_model(None, tokenizer)
    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="another tokenizer"):
        load_warm_start(model, WARM_START, other)


def test_config_starts_the_embedded_default_from_the_warm_start(tmp_path):
    """configs/tiny.yaml's `model.init: warm_start` names the shipped file; load_model resolves it."""
    from vcr1.preflight import check

    assert parse_config([]).model.init == "warm_start" and init_file("warm_start") == WARM_START
    assert parse_config(["--model.init", "none"]).model.init is None
    assert not check(parse_config([])).problems
    assert any("no such file" in p for p in check(parse_config(["--model.init", str(tmp_path / "x")])).problems)
    with pytest.raises(ConfigError, match="its own"):
        parse_config(["--model", str(tmp_path), "--model.init", str(WARM_START)])
    tokenizer = load_tokenizer(None)
    weights = load_file(str(WARM_START))
    state = load_model(None, tokenizer, init="warm_start").state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
