"""Model plumbing: vcr1's mRoPE positions, the LM-head wrapper, and module names that run as a script."""
import importlib.util
import sys

import pytest
import torch
from transformers import Qwen2_5_VLConfig

from conftest import REPO
from vcr1.model import LMHead, install_lm_head, mrope_positions

V = 9  # the video pad id in these cases


def _config(tokens_per_second=2):
    return Qwen2_5_VLConfig(video_token_id=V, vision_config={"spatial_merge_size": 2,
                                                            "tokens_per_second": tokens_per_second})


def test_text_and_video_positions_by_hand():
    # 2 text tokens, one video of grid (t=2, h=4, w=4) → 2×2×2 merged tokens, then 2 text tokens.
    ids = torch.tensor([1, 2] + [V] * 8 + [3, 4])
    pos = mrope_positions(ids, torch.tensor([[2, 4, 4]]), [1.0], _config())
    # t advances by second_per_grid_t · tokens_per_second = 2 per temporal patch
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 4, 4, 4, 4, 5, 6]
    assert pos[1].tolist() == [0, 1, 2, 2, 3, 3, 2, 2, 3, 3, 5, 6]
    assert pos[2].tolist() == [0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 5, 6]


def test_fractional_intervals_are_floored_after_scaling():
    # sample fps 8 → second_per_grid_t 0.25 → t = floor(i · 0.5): 0, 0, 1, 1
    ids = torch.tensor([V] * 4)
    pos = mrope_positions(ids, torch.tensor([[4, 2, 2]]), [0.25], _config())
    assert pos[0].tolist() == [0, 0, 1, 1]


def test_two_videos_and_mismatches():
    ids = torch.tensor([1] + [V] * 1 + [2] + [V] * 1)
    pos = mrope_positions(ids, torch.tensor([[1, 2, 2], [1, 2, 2]]), [1.0, 1.0], _config())
    assert pos.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    with pytest.raises(ValueError):
        mrope_positions(ids, torch.tensor([[1, 2, 2]]), [1.0], _config())
    with pytest.raises(ValueError):
        mrope_positions(torch.tensor([V] * 3), torch.tensor([[1, 4, 4]]), [1.0], _config())


def test_lm_head_wrapper_shares_the_weight_and_computes_logits():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 6, bias=False)

    toy = Toy()
    weight = toy.lm_head.weight
    install_lm_head(toy)
    assert isinstance(toy.lm_head, LMHead) and toy.lm_head.weight is weight
    h = torch.randn(3, 4)
    assert torch.equal(toy.lm_head(h), h @ weight.T)
    assert toy.lm_head(h, fn=lambda x, w, scale: (x @ w.T) * scale, scale=2.0).equal(2 * (h @ weight.T))
    assert list(toy.state_dict()) == ["lm_head.weight"]  # checkpoints keep HF's key


def test_no_module_in_vcr1_shadows_another():
    """`torchrun vcr1/train.py` puts vcr1/ first on sys.path: its modules must not hide stdlib/installed ones."""
    names = [p.stem for p in (REPO / "vcr1").glob("*.py") if p.stem != "__init__"]
    names += [p.name for p in (REPO / "vcr1").iterdir() if (p / "__init__.py").exists()]
    for name in names:
        assert name not in sys.stdlib_module_names, name
        spec = importlib.util.find_spec(name) if name not in sys.modules else sys.modules[name].__spec__
        assert spec is None or str(REPO / "vcr1") in str(spec.origin), f"{name} shadows {spec.origin}"
