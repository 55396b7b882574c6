"""Model plumbing: vcr1's mRoPE positions and the LM-head wrapper."""
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2_5_VLConfig

from vcr1.model import LMHead, answer_positions, install_lm_head, mrope_positions, prompt_positions, stop_ids

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


def test_transformers_5_continues_elsewhere_after_a_video():
    """docs/design.md's mRoPE decision: transformers 5.x `get_rope_index` does not follow the release rule.
    Same case as above, worked by hand for its rule: the text after the video restarts at the block's
    start (2) + max(H, W) (2) = 4, where the release rule (vcr1's) gives 5."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    start_id = 7  # a text token before the video, as <|vision_start|> is
    ids = torch.tensor([[1, start_id] + [V] * 8 + [3, 4]])
    model = Qwen2_5_VLModel.__new__(Qwen2_5_VLModel)  # get_rope_index reads only the config
    torch.nn.Module.__init__(model)
    model.config = _config()
    model.config.vision_start_token_id = start_id
    pos, _ = model.get_rope_index(ids, mm_token_type_ids=(ids == V).int() * 2, video_grid_thw=torch.tensor([[2, 4, 4]]),
                                  second_per_grid_ts=torch.tensor([1.0]), attention_mask=torch.ones_like(ids))
    assert pos[:, 0, -2:].tolist() == [[4, 5]] * 3
    assert mrope_positions(ids[0], torch.tensor([[2, 4, 4]]), [1.0], _config())[:, -2:].tolist() == [[5, 6]] * 3


def test_prompt_positions_prefer_given_ones_and_answers_continue_at_max_plus_one():
    ids = torch.tensor([[1, 2] + [V] * 8 + [3, 4]])
    inputs = {"input_ids": ids, "video_grid_thw": torch.tensor([[2, 4, 4]]), "second_per_grid_ts": [1.0]}
    assert prompt_positions(inputs, _config())[:, -1].tolist() == [6, 6, 6]  # the hand-worked case above
    given = torch.arange(36).reshape(3, 1, 12)
    assert torch.equal(prompt_positions({**inputs, "position_ids": given}, _config()), given.reshape(3, 12))
    # After a prompt whose largest position is 35 (on any row), the answer runs 36, 37, 38 on all rows.
    assert answer_positions(given.reshape(3, 12), 3).tolist() == [[36, 37, 38]] * 3


def test_stop_ids_unite_tokenizer_generation_and_text_configs():
    tokenizer = SimpleNamespace(eos_token_id=7, unk_token_id=None,
                                convert_tokens_to_ids=lambda token: {"<|endoftext|>": 8, "<|im_end|>": 9}[token])
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[6, 5]),
                            config=SimpleNamespace(text_config=SimpleNamespace(eos_token_id=6)))
    assert stop_ids(model, tokenizer) == [5, 6, 7, 8, 9]  # 9: the end of the chat turn
    assert stop_ids(model) == [5, 6]
    bare = SimpleNamespace(generation_config=None, config=SimpleNamespace(text_config=SimpleNamespace()))
    with pytest.raises(ValueError, match="no stop token"):
        stop_ids(bare)


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
