"""Video loading for Qwen2.5-VL: decode only the sampled frames, resize them where they are, patchify.

`load_video` turns a video file, a directory of frames or a list of frame images into a `Clip`
(uint8 frames already resized, on the requested device); `video_inputs` turns clips into the
tensors the model takes (`pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`).

Sampling and resizing follow docs/paper.md §2, which are qwen-vl-utils' rules with VideoChat-R1's constants:
frame count from the fps, frame indices round(linspace(0, total - 1, n)), a per-frame pixel budget
out of a per-video total, and smart_resize to multiples of 28. The resize is bicubic with
antialiasing in torch, rounded the way torchvision rounds on that device, then CLIP normalisation.

Decoding uses torchcodec: header-only ("approximate") seeking when the container states frame count
and fps, batched `get_frames_at` over the sampled indices only, NVDEC for device="cuda". A clip
that asked for NVDEC and was decoded on the CPU is logged and counted in `decode_stats`. torchcodec
is imported when the first video file is decoded: where it (or the FFmpeg libraries it loads) is
missing, the trainer still imports, and frame directories and the sampling math still work.

Every problem with the media itself (missing, truncated or undecodable file, no frames, a frame
directory with too few frames, an aspect ratio over 200) raises `VideoError`, which the trainer
catches, counts and skips.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: one LLM token covers 28 x 28 pixels of 2 frames
FRAME_FACTOR = TEMPORAL_PATCH_SIZE
MAX_RATIO = 200
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MIN_DIR_FRAMES = 7  # select_tracking_frames picks 7 distinct frames from 7 on
DECODE_CHUNK = 32  # frames decoded and resized at a time: bounds memory for long 1080p clips
FFMPEG_THREADS = min(4, os.cpu_count() or 1)  # per decoder; 0 ("auto") oversubscribes many ranks
RANGE_IN_FORMAT = {"h264", "hevc", "mjpeg"}  # decoders that report 8-bit full range as a yuvj format
EIGHT_BIT_YUV = {"yuv420p", "yuv422p", "yuv444p", "yuvj420p", "yuvj422p", "yuvj444p"}

decode_stats: collections.Counter = collections.Counter()  # "cuda_fallback": clips NVDEC did not decode


class VideoError(ValueError):
    """The media is missing, truncated, undecodable or unusable (the trainer skips the sample)."""


@dataclass
class Clip:
    """Sampled, resized frames of one video.

    frames: uint8 [T, 3, H', W'] (H', W' multiples of 28, T even) on the requested device.
    frame_indices: index of each frame in the source (a video's frames, or a directory's sorted images).
    timestamps: seconds of each frame in the source video (index / video_fps).
    sample_fps: frames per second of the clip as the model sees it (second_per_grid_t = 2 / sample_fps).
    video_fps: the source's frame rate (for image frames, the same as sample_fps).
    duration: seconds covered by the decoded span (the whole video unless start/end were given).
    """

    frames: torch.Tensor
    frame_indices: list[int]
    timestamps: list[float]
    sample_fps: float
    video_fps: float
    duration: float


# ---------------------------------------------------------------- sampling math (docs/paper.md §2)

def round_by_factor(x: float, factor: int) -> int:
    return round(x / factor) * factor


def ceil_by_factor(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def floor_by_factor(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_nframes(total_frames: int, video_fps: float, *, fps: float = 2.0, min_frames: int = 4,
                  max_frames: int = 768) -> int:
    """Number of frames to sample: fps-based, clamped, even (docs/paper.md §2)."""
    lo = ceil_by_factor(min_frames, FRAME_FACTOR)
    hi = floor_by_factor(min(max_frames, total_frames), FRAME_FACTOR)
    n = total_frames / video_fps * fps
    n = floor_by_factor(min(max(n, lo), hi, total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise VideoError(f"cannot sample {FRAME_FACTOR} frames from a video of {total_frames} frames")
    return n


def sample_indices(first: int, last: int, n: int) -> list[int]:
    """round(linspace(first, last, n)) in float32, exactly as qwen-vl-utils computes it."""
    return torch.linspace(first, last, n).round().long().tolist()


def frame_pixel_budget(n: int, *, min_pixels: int, total_pixels: int, max_pixels: int) -> float:
    """Per-frame pixel cap: an even share of the video's total, within [1.05 min_pixels, max_pixels]."""
    return max(min(max_pixels, total_pixels / n * FRAME_FACTOR), int(min_pixels * 1.05))


def smart_resize(height: int, width: int, *, min_pixels: int, max_pixels: float,
                 factor: int = FACTOR) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels] (docs/paper.md §2).

    The downscale branch keeps at least one `factor` per side (as transformers does); docs/paper.md §2's
    floor would give 0 there only for sizes no model can take anyway.
    """
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise VideoError(f"aspect ratio of {width}x{height} exceeds {MAX_RATIO}")
    h = max(factor, round_by_factor(height, factor))
    w = max(factor, round_by_factor(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, floor_by_factor(height / beta, factor))
        w = max(factor, floor_by_factor(width / beta, factor))
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = ceil_by_factor(height * beta, factor)
        w = ceil_by_factor(width * beta, factor)
    return h, w


def select_tracking_frames(n: int) -> list[int]:
    """Indices of the frames a GOT-10k sequence of n frames contributes (docs/paper.md §2, released code).

    First, int(i * (n - 1) / 6) for i = 1..5, last: 7 frames. The frame-factor rule then repeats
    the last one, so the model sees 8 frames, one per ground-truth box.
    """
    step = (n - 1) / 6
    return [0] + [int(i * step) for i in range(1, 6)] + [n - 1]


# ---------------------------------------------------------------- resize and patchify

def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of uint8 [T, 3, H, W] frames, rounded as torchvision does.

    torchvision (behind transformers' processors and qwen-vl-utils) resizes uint8 natively on the
    CPU and in float32 then clamps and rounds on the GPU; both are reproduced here.
    """
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames  # bicubic at scale 1 is the identity
    if frames.device.type == "cpu":
        return F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True)
    out = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 255).round_().to(torch.uint8)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 CLIP-normalised along dim 1 (channels), rescale folded into mean/std as
    transformers does."""
    shape = (1, 3) + (1,) * (x.dim() - 2)
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=x.device).view(shape) * 255.0
    std = torch.tensor(OPENAI_CLIP_STD, device=x.device).view(shape) * 255.0
    return x.to(torch.float32, copy=True).sub_(mean).div_(std)


def patchify(frames: torch.Tensor) -> torch.Tensor:
    """[T, C, H, W] -> [T/2 * H/14 * W/14, C * 2 * 14 * 14] in Qwen2-VL's patch order.

    Rows run over (t, h-block, w-block, h-in-block, w-in-block), each row (C, t, 14, 14), which is
    what the vision tower's Conv3d patch embedding and its 2x2 merger expect.
    """
    if pad := -frames.shape[0] % TEMPORAL_PATCH_SIZE:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // TEMPORAL_PATCH_SIZE, h // PATCH_SIZE, w // PATCH_SIZE
    x = frames.reshape(gt, TEMPORAL_PATCH_SIZE, c, gh // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE,
                       gw // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE)


def grid_thw(frames: torch.Tensor) -> tuple[int, int, int]:
    t, _, h, w = frames.shape
    return -(-t // TEMPORAL_PATCH_SIZE), h // PATCH_SIZE, w // PATCH_SIZE


def num_video_tokens(grid_thw: torch.Tensor | Sequence) -> int | list[int]:
    """LLM tokens of a video, t*h*w / 4: an int for one (t, h, w), a list for an [n, 3] grid."""
    tokens = torch.as_tensor(grid_thw, dtype=torch.int64).prod(dim=-1) // (MERGE_SIZE * MERGE_SIZE)
    return tokens.tolist()


def video_inputs(clips: Sequence[Clip]) -> dict[str, torch.Tensor]:
    """The model's video inputs for clips, concatenated in order, on the clips' device."""
    if not clips:
        raise ValueError("video_inputs needs at least one clip")
    device = clips[0].frames.device
    # Patchify the uint8 frames, then normalise rows viewed as (3, 2*14*14): a quarter of the bytes moved.
    pixels = torch.cat([normalize(patchify(c.frames).unflatten(1, (3, -1))).flatten(1) for c in clips])
    grids = torch.tensor([grid_thw(c.frames) for c in clips], dtype=torch.int64, device=device)
    seconds = torch.tensor([TEMPORAL_PATCH_SIZE / c.sample_fps for c in clips], dtype=torch.float32,
                           device=device)
    return {"pixel_values_videos": pixels, "video_grid_thw": grids, "second_per_grid_ts": seconds}


# ---------------------------------------------------------------- decoding

def _report_fallback(path: Path, reason: str) -> None:
    decode_stats["cuda_fallback"] += 1
    count = decode_stats["cuda_fallback"]
    if count & (count - 1) == 0:  # log the 1st, 2nd, 4th, 8th... so a whole dataset cannot flood the log
        logger.warning("NVDEC did not decode %s (%s): decoded on the CPU (%d clips so far)", path, reason, count)


def _color_safe_transforms(meta) -> list:
    """No transform where torchcodec's fast CPU colour conversion is right for the stream; else a
    full-frame crop, which routes the conversion through its slower but correct filtergraph.

    The fast path (swscale, taken when widths are multiples of 32) ignores a frame's colour range,
    so full range comes out right only when the pixel format itself says so ("yuvj"), as the
    H.264, HEVC and MJPEG decoders report 8-bit full range. VP9, AV1 and 10-bit streams can be
    full range in a plain format (10-bit full-range HEVC: (208, 38, 4) for (199, 49, 20)).
    """
    if meta.codec in RANGE_IN_FORMAT and meta.pixel_format in EIGHT_BIT_YUV:
        return []
    if meta.rotation or not meta.height or not meta.width:
        return []  # a crop sized from pre-rotation metadata could cut a rotated frame
    from torchcodec.transforms import CenterCrop
    return [CenterCrop((meta.height, meta.width))]


def _decoders():
    """torchcodec.decoders, imported on first use. A missing torchcodec, or FFmpeg libraries it cannot
    load, is the machine's problem rather than the video's, so it raises ImportError (never VideoError,
    which the trainer would count as bad media and skip)."""
    try:
        from torchcodec import decoders
    except (ImportError, OSError, RuntimeError) as e:  # torchcodec raises RuntimeError when FFmpeg won't load
        raise ImportError(f"decoding video files needs torchcodec and FFmpeg's shared libraries: {e}") from e
    return decoders


def _cuda_backend():
    """The faster CUDA backend ("beta", since renamed "nvdec" and made the default) where offered."""
    set_backend = getattr(_decoders(), "set_cuda_backend", None)
    return set_backend("beta") if set_backend else contextlib.nullcontext()


def _open_decoder(path: Path, device: torch.device):
    """A decoder (torchcodec's VideoDecoder) for `path` on `device`, falling back (reported) to the CPU
    when NVDEC cannot open it."""
    if not path.is_file():
        raise VideoError(f"no such video file: {path}")
    decoders = _decoders()
    try:
        meta = decoders.VideoDecoder(str(path), seek_mode="approximate").metadata  # header only
    except (RuntimeError, ValueError) as e:
        raise VideoError(f"cannot open video {path}: {e}") from e
    # Approximate seeking maps index -> time from the header; without a stated count and fps, scan.
    exact = meta.num_frames_from_header is None or meta.average_fps_from_header is None
    seek_mode = "exact" if exact else "approximate"
    if device.type == "cuda":
        try:
            with _cuda_backend():
                return decoders.VideoDecoder(str(path), seek_mode=seek_mode, device=str(device))
        except (RuntimeError, ValueError) as e:
            _report_fallback(path, f"{type(e).__name__}: {e}".splitlines()[0])
    try:
        return decoders.VideoDecoder(str(path), seek_mode=seek_mode, num_ffmpeg_threads=FFMPEG_THREADS,
                                     transforms=_color_safe_transforms(meta))
    except (RuntimeError, ValueError) as e:
        raise VideoError(f"cannot open video {path}: {e}") from e


def _frame_window(total: int, video_fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """First and last frame index of [start, end] seconds (qwen-vl-utils' video_start/video_end)."""
    if start is None and end is None:
        return 0, total - 1
    duration = total / video_fps
    first = 0 if start is None else math.ceil(min(max(start, 0.0), duration) * video_fps)
    last = total - 1 if end is None else min(math.floor(min(max(end, 0.0), duration) * video_fps), total - 1)
    if first >= last:
        raise VideoError(f"window [{start}, {end}] s holds no frames of a {duration:.2f} s video")
    return first, last


def _decode_resized(decoder, indices: list[int], device: torch.device, min_pixels: int,
                    max_pixels: float, path: Path) -> torch.Tensor:
    """Decode `indices` in chunks, resizing each chunk on `device` as soon as it is decoded."""
    out, size = [], None
    for i in range(0, len(indices), DECODE_CHUNK):
        try:
            batch = decoder.get_frames_at(indices[i:i + DECODE_CHUNK]).data
        except (RuntimeError, ValueError, IndexError) as e:
            raise VideoError(f"cannot decode frames of {path}: {e}") from e
        batch = batch.to(device, non_blocking=True)
        if size is None:
            size = smart_resize(*batch.shape[-2:], min_pixels=min_pixels, max_pixels=max_pixels)
        out.append(resize_frames(batch, size))
    return torch.cat(out)


def _load_video_file(path: Path, *, fps, min_frames, max_frames, min_pixels, total_pixels, max_pixels,
                     device, start, end) -> Clip:
    decoder = _open_decoder(path, device)
    meta = decoder.metadata
    total, video_fps = meta.num_frames, meta.average_fps
    if not total or not video_fps:
        raise VideoError(f"{path} has no video frames")
    first, last = _frame_window(total, video_fps, start, end)
    span = last - first + 1
    n = smart_nframes(span, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
    indices = sample_indices(first, last, n)
    budget = frame_pixel_budget(n, min_pixels=min_pixels, total_pixels=total_pixels, max_pixels=max_pixels)
    frames = _decode_resized(decoder, indices, device, min_pixels, budget, path)
    if device.type == "cuda" and decoder.cpu_fallback:
        _report_fallback(path, str(decoder.cpu_fallback))
    return Clip(frames=frames, frame_indices=indices, timestamps=[i / video_fps for i in indices],
                sample_fps=n / span * video_fps, video_fps=video_fps, duration=span / video_fps)


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _read_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise VideoError(f"cannot read frame {path}: {e}") from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _load_frames(paths: list[Path], indices: list[int], *, fps, min_pixels, total_pixels, max_pixels,
                 device) -> Clip:
    """Image frames as a video at `fps`: padded to an even count with the last, sized by the first."""
    if not paths:
        raise VideoError("empty frame list")
    if pad := -len(paths) % FRAME_FACTOR:
        paths, indices = paths + paths[-1:] * pad, indices + indices[-1:] * pad
    images = [_read_image(p) for p in paths]
    budget = frame_pixel_budget(len(images), min_pixels=min_pixels, total_pixels=total_pixels,
                                max_pixels=max_pixels)
    size = smart_resize(*images[0].shape[-2:], min_pixels=min_pixels, max_pixels=budget)
    # A frame of another size goes straight to the first frame's target size (one resampling, not two).
    frames = torch.cat([resize_frames(img[None].to(device), size) for img in images])
    return Clip(frames=frames, frame_indices=indices, timestamps=[i / fps for i in range(len(paths))],
                sample_fps=fps, video_fps=fps, duration=len(paths) / fps)


def _frame_dir(path: Path) -> tuple[list[Path], list[int]]:
    try:
        frames = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    except OSError as e:
        raise VideoError(f"cannot list frames of {path}: {e}") from e
    if len(frames) < MIN_DIR_FRAMES:
        raise VideoError(f"{path} holds {len(frames)} frames, fewer than {MIN_DIR_FRAMES}")
    indices = select_tracking_frames(len(frames))
    return [frames[i] for i in indices], indices


def load_video(source: str | os.PathLike | Sequence[str | os.PathLike], *, fps: float = 2.0,
               min_frames: int = 4, max_frames: int = 768, min_pixels: int = 16 * 28 * 28,
               total_pixels: int = 3584 * 28 * 28, max_pixels: int = 768 * 28 * 28,
               device: str | torch.device = "cpu", start: float | None = None,
               end: float | None = None) -> Clip:
    """Decode, sample and resize one video (docs/paper.md §2) onto `device`.

    source: a video file; a directory of numbered frames (a GOT-10k sequence: the
    select_tracking_frames picks are used); or a list of frame images, used as given.
    Image frames are a video at `fps`. start/end (seconds) restrict a video file to a window.
    Raises VideoError for unusable media.
    """
    device = torch.device(device)
    budget = dict(min_pixels=min_pixels, total_pixels=total_pixels, max_pixels=max_pixels)
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_dir():
        return _load_video_file(Path(source), fps=fps, min_frames=min_frames, max_frames=max_frames,
                                device=device, start=start, end=end, **budget)
    if start is not None or end is not None:
        raise VideoError(f"start/end apply to video files, not to image frames ({source})")
    if isinstance(source, (str, os.PathLike)):
        paths, indices = _frame_dir(Path(source))
    else:
        paths, indices = [Path(p) for p in source], list(range(len(source)))
    return _load_frames(paths, indices, fps=fps, device=device, **budget)
