"""Video pipeline: docs/paper.md §2 sampling math, decoding (real codecs, colour, bad media), patch layout
against transformers and a tiny Qwen2.5-VL, and the GPU paths (skipped without CUDA). Tests that decode
video files skip without torchcodec; the rest run without it."""
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vcr1.data import video as V
from vcr1.data.video import Clip, VideoError, load_video, video_inputs
from vcr1_testing import requires_cuda, requires_torchcodec

requires_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")
REAL_VIDEOS = ["nasa_13013.mp4", "bt709_full_range.mp4", "h264_10bits.mp4", "h265_video.mp4",
               "h265_10bits.mp4", "av1_video.mkv"]
BUDGET = dict(min_pixels=16 * 28 * 28, total_pixels=3584 * 28 * 28, max_pixels=768 * 28 * 28)


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def encoders() -> str:
    return subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def ramp(tmp_path_factory) -> Path:
    """4 s at 10 fps, 64x64, frame N has luma 16 + 5N: each frame is identifiable by its grey level.
    Short GOPs with B-frames, so that sampled frames need real seeks."""
    path = tmp_path_factory.mktemp("ramp") / "ramp.mp4"
    ffmpeg("-f", "lavfi", "-i", "nullsrc=s=64x64:r=10:d=4", "-vf", "geq=lum='16+5*N':cb=128:cr=128,format=yuv420p",
           "-c:v", "libx264", "-g", "12", "-bf", "2", "-crf", "4", str(path))
    return path


def ramp_frame(level: float) -> float:
    """Which ramp frame a decoded grey level (limited-range luma to RGB) came from."""
    return (level * 219 / 255) / 5


# ---------------------------------------------------------------- sampling math (hand-computed)

@pytest.mark.parametrize("total,video_fps,expected", [
    (300, 30, 20),        # 10 s at 2 fps
    (391, 29.97, 26),     # 13.05 s -> 26.09 -> 26
    (45, 10, 8),          # 9 frames -> floored to even
    (30, 30, 4),          # 1 s -> 2, raised to min_frames
    (5, 25, 4),           # max(0.4, 4), capped by floor2(5) = 4
    (3, 30, 2),           # fewer frames than min_frames: floor2(3)
    (100_000, 25, 768),   # capped at max_frames
])
def test_smart_nframes_hand_values(total, video_fps, expected):
    assert V.smart_nframes(total, video_fps) == expected


def test_smart_nframes_limits():
    assert V.smart_nframes(10_000, 30, max_frames=7) == 6  # max_frames floored to even
    assert V.smart_nframes(10_000, 30, min_frames=5, fps=0.01) == 6  # min_frames ceiled to even
    with pytest.raises(VideoError):
        V.smart_nframes(1, 30)


def test_sample_indices_round_half_to_even():
    assert V.sample_indices(0, 29, 4) == [0, 10, 19, 29]
    assert V.sample_indices(0, 9, 3) == [0, 4, 9]  # linspace gives 4.5: torch rounds half to even
    assert V.sample_indices(11, 29, 4) == [11, 17, 23, 29]


@pytest.mark.parametrize("n,expected", [(4, 602112), (8, 602112), (20, 3584 * 784 / 20 * 2), (768, 13171)])
def test_frame_pixel_budget(n, expected):
    assert V.frame_pixel_budget(n, **BUDGET) == pytest.approx(expected)


@pytest.mark.parametrize("hw,max_pixels,expected", [
    ((720, 1280), 602112, (560, 1008)),    # downscale: beta = sqrt(921600 / 602112)
    ((270, 480), 280985.6, (280, 476)),    # round to multiples of 28
    ((200, 200), 602112, (196, 196)),
    ((128, 128), 602112, (140, 140)),
    ((20, 30), 602112, (112, 140)),        # upscale to min_pixels
    ((14, 459), 602112, (28, 448)),        # a side rounding to 0 is kept at 28 (docs/paper.md §2, not transformers)
])
def test_smart_resize_hand_values(hw, max_pixels, expected):
    assert V.smart_resize(*hw, min_pixels=16 * 28 * 28, max_pixels=max_pixels) == expected


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(VideoError, match="aspect ratio"):
        V.smart_resize(10, 2010, min_pixels=12544, max_pixels=602112)


def test_smart_resize_matches_transformers():
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    # From 15 px: below, transformers rounds a side to 0 where docs/paper.md §2 (qwen-vl-utils) keeps 28.
    for h in range(15, 2200, 67):
        for w in range(15, 2200, 89):
            if max(h, w) / min(h, w) > 200:
                continue
            for n in (4, 16, 64, 256):
                budget = V.frame_pixel_budget(n, **BUDGET)
                ours = V.smart_resize(h, w, min_pixels=BUDGET["min_pixels"], max_pixels=budget)
                theirs = pil.smart_resize(h, w, factor=28, min_pixels=BUDGET["min_pixels"], max_pixels=budget)
                assert ours == theirs, (h, w, n)


def test_select_tracking_frames():
    assert V.select_tracking_frames(100) == [0, 16, 33, 49, 66, 82, 99]
    assert V.select_tracking_frames(7) == [0, 1, 2, 3, 4, 5, 6]
    assert V.select_tracking_frames(13) == [0, 2, 4, 6, 8, 10, 12]


# ---------------------------------------------------------------- patch layout and model inputs

def clip_of(frames: torch.Tensor, sample_fps: float = 2.0) -> Clip:
    t = frames.shape[0]
    return Clip(frames=frames, frame_indices=list(range(t)), timestamps=[i / sample_fps for i in range(t)],
                sample_fps=sample_fps, video_fps=sample_fps, duration=t / sample_fps)


def test_layout_matches_vision_tower_positions():
    """Each row must hold the 2x14x14 block at the (t, h, w) the vision tower's rotary positions assign it."""
    vision_utils = pytest.importorskip("transformers.vision_utils")
    frames = torch.randint(0, 256, (6, 3, 56, 84), dtype=torch.uint8)
    inputs = video_inputs([clip_of(frames)])
    grid = inputs["video_grid_thw"]
    assert grid.tolist() == [[3, 4, 6]]
    pos = vision_utils.get_vision_position_ids(grid, 2, include_temporal=True)
    norm = V.normalize(frames)
    expected = torch.stack([norm[2 * t:2 * t + 2, :, 14 * h:14 * h + 14, 14 * w:14 * w + 14].transpose(0, 1)
                            for t, h, w in pos.tolist()]).reshape(len(pos), -1)
    torch.testing.assert_close(inputs["pixel_values_videos"], expected, rtol=0, atol=0)


def test_layout_matches_pil_image_processor(tmp_path):
    """Two identical frames give exactly the PIL image processor's patches of that image (no resize)."""
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    image = torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8)
    proc = pil.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    ref = proc(images=Image.fromarray(image.permute(1, 2, 0).numpy()), return_tensors="pt")
    ours = video_inputs([clip_of(torch.stack([image, image]))])
    assert ours["video_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    torch.testing.assert_close(ours["pixel_values_videos"], ref["pixel_values"].float(), rtol=0, atol=1e-5)


def test_resize_close_to_pil_image_processor(tmp_path):
    """End to end with a resize: same target grid as transformers; pixels within bicubic-kernel differences."""
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    y, x = np.mgrid[0:300, 0:500]
    rgb = np.stack([127 + 120 * np.sin(x / 37), 127 + 120 * np.cos(y / 23), (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    budget = dict(min_pixels=16 * 28 * 28, total_pixels=10**9, max_pixels=100 * 28 * 28)
    clip = load_video([tmp_path / "a.png", tmp_path / "a.png"], **budget)
    proc = pil.Qwen2VLImageProcessorPil(min_pixels=budget["min_pixels"], max_pixels=budget["max_pixels"])
    ref = proc(images=Image.fromarray(rgb), return_tensors="pt")
    ours = video_inputs([clip])
    assert ours["video_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    diff = (ours["pixel_values_videos"] - ref["pixel_values"].float()).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.5  # normalised units; 1 grey level is about 0.015


def test_resize_rounds_like_the_float_path():
    """On smooth content the CPU uint8 kernel and the GPU float path (clamp, round) agree within one
    level. (At hard edges they differ more: the uint8 kernel clamps between its two passes.)"""
    y, x = np.mgrid[0:90, 0:160]
    smooth = np.stack([127 + 120 * np.sin(x / 7), 127 + 120 * np.cos(y / 5), 40 + x + y / 2]).astype(np.uint8)
    frames = torch.from_numpy(smooth)[None].repeat(2, 1, 1, 1)
    native = V.resize_frames(frames, (56, 112))
    floated = torch.nn.functional.interpolate(frames.float(), size=(56, 112), mode="bicubic", antialias=True)
    floated = floated.clamp(0, 255).round().to(torch.uint8)
    assert native.dtype == torch.uint8 and (native.int() - floated.int()).abs().max() <= 1
    assert V.resize_frames(frames, (90, 160)) is frames


def test_video_inputs_packs_clips_in_order():
    a = clip_of(torch.randint(0, 256, (4, 3, 28, 56), dtype=torch.uint8), sample_fps=4.0)
    b = clip_of(torch.randint(0, 256, (3, 3, 56, 28), dtype=torch.uint8), sample_fps=1.25)  # odd: last repeated
    inputs = video_inputs([a, b])
    assert inputs["video_grid_thw"].tolist() == [[2, 2, 4], [2, 4, 2]]
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([0.5, 1.6])
    assert inputs["pixel_values_videos"].shape == (16 + 16, 3 * 2 * 14 * 14)
    assert inputs["pixel_values_videos"].dtype == torch.float32
    torch.testing.assert_close(inputs["pixel_values_videos"][:16], video_inputs([a])["pixel_values_videos"])
    padded = clip_of(torch.cat([b.frames, b.frames[-1:]]), sample_fps=1.25)
    torch.testing.assert_close(inputs["pixel_values_videos"][16:], video_inputs([padded])["pixel_values_videos"])
    assert V.num_video_tokens(inputs["video_grid_thw"]) == [4, 4]
    assert V.num_video_tokens((5, 26, 46)) == 1495
    with pytest.raises(ValueError):
        video_inputs([])


def tiny_qwen25_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    vision = dict(depth=2, hidden_size=32, num_heads=2, out_hidden_size=64, intermediate_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                  tokens_per_second=2)
    text = dict(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0})
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=120, video_token_id=121,
                              vision_start_token_id=122, vision_end_token_id=123)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@requires_torchcodec
@requires_ffmpeg
def test_tiny_qwen25_vl_runs_on_video_inputs(ramp, tmp_path):
    """Two packed clips of different sizes through a random Qwen2.5-VL: the vision tower yields exactly
    num_video_tokens per clip, and the LLM accepts prompts expanded by that count."""
    model = tiny_qwen25_vl()
    frames = [Image.fromarray(np.full((90, 120, 3), 40 * i, np.uint8)) for i in range(3)]
    for i, f in enumerate(frames):
        f.save(tmp_path / f"{i}.jpg")
    clips = [load_video(ramp), load_video([tmp_path / f"{i}.jpg" for i in range(3)])]
    inputs = video_inputs(clips)
    tokens = V.num_video_tokens(inputs["video_grid_thw"])
    with torch.no_grad():
        features = model.model.visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
    assert features.pooler_output.shape == (sum(tokens), 64)
    ids = [5]
    for n in tokens:
        ids += [122] + [121] * n + [123]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), **inputs)
    assert out.logits.shape == (1, len(ids), 128) and torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match="do not match"):
        with torch.no_grad():
            model(input_ids=torch.tensor([ids[:-2] + [123]]), **inputs)


# ---------------------------------------------------------------- decoding

@requires_torchcodec
@requires_ffmpeg
def test_sampled_frames_are_the_right_frames(ramp):
    clip = load_video(ramp)
    assert clip.frame_indices == V.sample_indices(0, 39, 8)  # 4 s at 2 fps
    assert clip.frames.shape == (8, 3, 112, 112) and clip.frames.dtype == torch.uint8
    assert clip.video_fps == 10 and clip.sample_fps == pytest.approx(2.0) and clip.duration == pytest.approx(4.0)
    assert clip.timestamps == pytest.approx([i / 10 for i in clip.frame_indices])
    levels = clip.frames.float().mean(dim=(1, 2, 3)).tolist()
    assert [ramp_frame(v) for v in levels] == pytest.approx(clip.frame_indices, abs=0.4)


@requires_torchcodec
@requires_ffmpeg
def test_window_restricts_sampling(ramp):
    clip = load_video(ramp, start=1.05, end=2.95)  # frames ceil(10.5) = 11 .. floor(29.5) = 29
    assert clip.frame_indices == [11, 17, 23, 29]
    assert clip.duration == pytest.approx(1.9) and clip.sample_fps == pytest.approx(4 / 19 * 10)
    levels = clip.frames.float().mean(dim=(1, 2, 3)).tolist()
    assert [ramp_frame(v) for v in levels] == pytest.approx(clip.frame_indices, abs=0.4)
    with pytest.raises(VideoError, match="window"):
        load_video(ramp, start=3.0, end=2.0)


@requires_torchcodec
@pytest.mark.parametrize("name", REAL_VIDEOS)
def test_real_videos_decode_like_ffmpeg(shared_data, name):
    """Each real codec decodes on CPU, and sampled frames equal ffmpeg's rgb24 of the same frame index."""
    from torchcodec.decoders import VideoDecoder
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs the ffmpeg CLI")
    path = shared_data / "videos" / name
    clip = load_video(path)
    t, c, h, w = clip.frames.shape
    assert t % 2 == 0 and c == 3 and h % 28 == 0 and w % 28 == 0 and clip.frames.dtype == torch.uint8
    assert h * w <= V.frame_pixel_budget(t, **BUDGET)
    meta = VideoDecoder(str(path)).metadata
    for k in (0, t // 2, t - 1):
        index = clip.frame_indices[k]
        raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", f"0:{meta.stream_index}",
                              "-vf", f"select=eq(n\\,{index})", "-vsync", "0", "-frames:v", "1",
                              "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
        ref = torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(meta.height, meta.width, 3).copy())
        ref = V.resize_frames(ref.permute(2, 0, 1)[None], (h, w))[0]
        diff = (ref.int() - clip.frames[k].int()).abs().float()
        assert diff.mean() < 0.5 and diff.max() <= 8, (name, index)


COLOR_CASES = {  # pixel format, encoder, range, container
    "h264_8bit_limited": ("yuv420p", "libx264", "limited", "mp4"),
    "h264_8bit_full": ("yuvj420p", "libx264", "full", "mp4"),
    "h264_10bit_limited": ("yuv420p10le", "libx264", "limited", "mp4"),
    "hevc_8bit_full": ("yuv420p", "libx265", "full", "mp4"),
    "hevc_10bit_full": ("yuv420p10le", "libx265", "full", "mp4"),
    "vp9_8bit_full": ("yuv420p", "libvpx-vp9", "full", "webm"),
}


@requires_torchcodec
@requires_ffmpeg
@pytest.mark.parametrize("case", COLOR_CASES)
def test_color_range_and_bit_depth(tmp_path, case):
    """A flat (200, 50, 20) encoded BT.709 in each range and depth decodes back to that colour.
    64 px wide: at widths that are multiples of 32, torchcodec's fast path ignores a full range that
    the pixel format does not state (10-bit full-range HEVC gave 208, 38, 4)."""
    fmt, codec, rng, container = COLOR_CASES[case]
    if codec not in encoders():
        pytest.skip(f"ffmpeg lacks {codec}")
    path = tmp_path / f"{case}.{container}"
    ffmpeg("-f", "lavfi", "-i", "color=c=0xC83214:s=64x48:r=10:d=1",
           "-vf", f"scale=out_color_matrix=bt709:out_range={rng},format={fmt}", "-c:v", codec,
           "-x265-params", "log-level=error", "-color_range", "pc" if rng == "full" else "tv",
           "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709", str(path))
    clip = load_video(path)
    mean = clip.frames.float().mean(dim=(0, 2, 3)).tolist()
    assert mean == pytest.approx([200, 50, 20], abs=6), mean


@requires_torchcodec
@requires_ffmpeg
def test_common_h264_keeps_the_fast_color_path(ramp):
    from torchcodec.decoders import VideoDecoder
    assert V._color_safe_transforms(VideoDecoder(str(ramp)).metadata) == []


def jpeg_dir(root: Path, n: int, name=lambda i: f"{i + 1:08d}.jpg") -> Path:
    """n flat frames, frame i at grey level 10 i."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((60, 80, 3), 10 * i, np.uint8)).save(root / name(i), quality=95)
    (root / "groundtruth.txt").write_text("not a frame\n")
    return root


@pytest.mark.parametrize("name", [lambda i: f"{i + 1:08d}.jpg", lambda i: f"{i + 1}.jpg"])
def test_frame_directory_uses_tracking_frames(tmp_path, name):
    clip = load_video(jpeg_dir(tmp_path / "seq", 20, name))
    expected = V.select_tracking_frames(20) + [19]  # padded to 8 with the last
    assert clip.frame_indices == expected
    assert clip.frames.shape[0] == 8 and clip.sample_fps == 2.0
    assert clip.timestamps == [i / 2 for i in range(8)] and clip.duration == 4.0
    levels = clip.frames.float().mean(dim=(1, 2, 3)).tolist()
    assert levels == pytest.approx([10 * i for i in expected], abs=2)


def test_frame_list_resized_to_first_frame_size(tmp_path):
    sizes = [(60, 80), (120, 160), (61, 79)]
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((h, w, 3), 50 * i, np.uint8)).save(paths[-1])
    clip = load_video([str(p) for p in paths])
    first = V.smart_resize(60, 80, min_pixels=BUDGET["min_pixels"], max_pixels=V.frame_pixel_budget(4, **BUDGET))
    assert clip.frames.shape == (4, 3, *first)
    assert clip.frame_indices == [0, 1, 2, 2]
    assert clip.frames.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([0, 50, 100, 100], abs=1)


@requires_torchcodec
@requires_ffmpeg
def test_bad_media_raises_video_error(tmp_path, ramp):
    data = ramp.read_bytes()
    faststart = tmp_path / "faststart.mp4"  # index first, so a truncated file still opens
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(ramp), "-c", "copy", "-movflags", "+faststart",
                    str(faststart)], check=True)
    cases = {
        "missing": tmp_path / "nope.mp4",
        "truncated_index": tmp_path / "a.mp4",
        "truncated_data": tmp_path / "b.mp4",
        "garbage": tmp_path / "c.mp4",
        "empty": tmp_path / "d.mp4",
        "no_frames": tmp_path / "e.mp4",
        "one_frame": tmp_path / "f.mp4",
        "audio_only": tmp_path / "g.m4a",
        "missing_dir": tmp_path / "GOT-10k_Val_000001",
        "short_dir": jpeg_dir(tmp_path / "short", 3),
    }
    cases["truncated_index"].write_bytes(data[: len(data) // 2])
    cases["truncated_data"].write_bytes(faststart.read_bytes()[: len(data) // 2])
    cases["garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    cases["empty"].write_bytes(b"")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x64:r=10:d=1", "-frames:v", "0", "-c:v", "libx264",
           str(cases["no_frames"]))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x64:r=10:d=1", "-frames:v", "1", "-c:v", "libx264",
           str(cases["one_frame"]))
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", "-c:a", "aac", str(cases["audio_only"]))
    for name, source in cases.items():
        with pytest.raises(VideoError):
            load_video(source)
            pytest.fail(f"{name} loaded")


def test_bad_frames_raise_video_error(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((2, 500, 3), np.uint8)).save(tmp_path / "thin.png")
    for source in ([tmp_path / "bad.jpg"], [tmp_path / "missing.jpg"], [tmp_path / "thin.png"], []):
        with pytest.raises(VideoError):
            load_video(source)
    with pytest.raises(VideoError, match="start/end"):
        load_video([tmp_path / "thin.png"], start=1.0)
    assert issubclass(VideoError, ValueError)


# ---------------------------------------------------------------- GPU (skipped without CUDA)

@requires_torchcodec
@requires_cuda
@requires_ffmpeg
def test_nvdec_matches_cpu(shared_data, ramp):
    """device="cuda": frames come back on the GPU and close to the CPU decode; any fallback is counted."""
    for path in [ramp] + [shared_data / "videos" / n for n in REAL_VIDEOS]:
        before = V.decode_stats["cuda_fallback"]
        gpu = load_video(path, device="cuda")
        cpu = load_video(path)
        assert gpu.frames.device.type == "cuda" and gpu.frame_indices == cpu.frame_indices
        assert gpu.frames.shape == cpu.frames.shape
        diff = (gpu.frames.cpu().int() - cpu.frames.int()).abs().float()
        assert diff.mean() < 3, (path.name, diff.mean().item(), V.decode_stats["cuda_fallback"] - before)
        torch.testing.assert_close(video_inputs([gpu])["video_grid_thw"].cpu(), video_inputs([cpu])["video_grid_thw"])


@requires_torchcodec
@requires_cuda
def test_gpu_preprocessing_matches_transformers_video_processor(shared_data):
    """Our clip's frames through Qwen2VLVideoProcessor (no sampling, no resize) equal video_inputs."""
    vp = pytest.importorskip("transformers.models.qwen2_vl.video_processing_qwen2_vl",
                             reason="transformers' video processor needs torchvision")
    clip = load_video(shared_data / "videos" / "nasa_13013.mp4", device="cuda")
    h, w = clip.frames.shape[-2:]
    proc = vp.Qwen2VLVideoProcessor(size={"shortest_edge": h * w, "longest_edge": h * w})
    ref = proc(videos=[clip.frames.cpu()], do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="pt")
    ours = video_inputs([clip])
    assert ours["video_grid_thw"].cpu().tolist() == ref["video_grid_thw"].tolist()
    torch.testing.assert_close(ours["pixel_values_videos"].cpu(), ref["pixel_values_videos"], rtol=0, atol=1e-5)
    assert ours["second_per_grid_ts"].tolist() == pytest.approx([2 / clip.sample_fps])
    assert math.isclose(clip.sample_fps, 26 / 390 * clip.video_fps)


# ---------------------------------------------------------------- without torchcodec

# Runs in a fresh interpreter where `import torchcodec` fails, as on a GPU image without it.
WITHOUT_TORCHCODEC = """
import sys
sys.modules["torchcodec"] = None  # every import of torchcodec now raises ImportError
from pathlib import Path
import numpy as np
from PIL import Image
import pytest
import vcr1.train  # the trainer imports without it
from vcr1.data.video import load_video
frames = Path(sys.argv[1])
frames.mkdir()
for i in range(8):
    Image.fromarray(np.full((56, 56, 3), 20 * i, np.uint8)).save(frames / f"{i + 1:08d}.jpg")
assert load_video(frames).frames.shape[0] == 8  # frame directories decode with PIL alone
(frames / "clip.mp4").write_bytes(b"not decoded")
try:
    load_video(frames / "clip.mp4")
    raise SystemExit("load_video decoded a file without torchcodec")
except ImportError as e:  # the machine's problem, never a VideoError the trainer would skip as bad media
    assert "torchcodec" in str(e), e
sys.exit(pytest.main([sys.argv[2], "-q", "-rs", "-p", "no:cacheprovider", "-k", "not without_torchcodec"]))
"""


def test_without_torchcodec_the_trainer_imports_and_the_video_tests_skip(tmp_path):
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCHCODEC, str(tmp_path / "frames"), __file__],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tail = run.stdout.splitlines()[-1]
    assert " passed" in tail and " skipped" in tail and "failed" not in tail, tail
    assert "needs torchcodec" in run.stdout  # the skips say why
