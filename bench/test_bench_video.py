"""Video decode + sample + preprocess throughput (`pytest bench/ --benchmark-only`).

One case = load_video (decode the docs/paper.md §2 samples, resize on the device) + video_inputs (normalise,
patchify), for a 30 fps H.264 clip made with FFmpeg (testsrc2, x264 veryfast, default GOP), at
360p / 720p / 1080p and 30 s / 120 s, on the CPU and with NVDEC. "naive" is the usual alternative:
decode every frame, then keep the sampled ones. Clips are cached in $TMPDIR/vcr1_bench_clips.

By default a small set runs: on a machine without CUDA the 30 s 360p clip on the CPU (under a minute),
the CUDA cases skipped; with CUDA the 30 s 360p and 1080p clips on both (1080p is docs/gpu_validation.md's target
row). VCR1_BENCH_FULL=1 runs every clip. Without torchcodec (GPU images may lack it) the module skips.
Results go to bench/results/video_<device>.json.
"""
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

from vcr1.data import video as V
from vcr1_testing import BENCH_RESULTS, torchcodec_missing

if torchcodec_missing():
    pytest.skip(torchcodec_missing(), allow_module_level=True)

import torchcodec  # noqa: E402  (after the skip above)
from torchcodec.decoders import VideoDecoder  # noqa: E402

HOST = "cuda" if torch.cuda.is_available() else "cpu"
CLIPS = Path(tempfile.gettempdir()) / "vcr1_bench_clips"
SIZES = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}
SECONDS = (30, 120)
FPS = 30
FULL = os.environ.get("VCR1_BENCH_FULL") == "1"
# The default set: encoding and decoding 120 s of 1080p alone takes minutes.
SMALL_CASES = {("360p", 30), ("1080p", 30)} if HOST == "cuda" else {("360p", 30)}
ROWS: list[dict] = []


def make_clip(size: str, seconds: int) -> Path:
    path = CLIPS / f"testsrc2_{size}_{seconds}s.mp4"
    if not path.exists():
        CLIPS.mkdir(parents=True, exist_ok=True)
        w, h = SIZES[size]
        tmp = path.with_suffix(f".{os.getpid()}.tmp.mp4")  # renamed when done: concurrent runs share the cache
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=s={w}x{h}:r={FPS}:d={seconds}",
                        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(tmp)], check=True)
        tmp.rename(path)
    return path


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def pipeline(path: Path, device: str) -> int:
    clip = V.load_video(path, device=device)
    V.video_inputs([clip])
    sync(device)
    return clip.frames.shape[0]


def naive(path: Path, device: str) -> int:
    """Decode every frame in order, keep the sampled ones, then the same resize and preprocessing."""
    decoder = VideoDecoder(str(path), device=device, num_ffmpeg_threads=V.FFMPEG_THREADS)
    total, fps = decoder.metadata.num_frames, decoder.metadata.average_fps
    n = V.smart_nframes(total, fps)
    wanted = V.sample_indices(0, total - 1, n)
    budget = V.frame_pixel_budget(n, min_pixels=16 * 28 * 28, total_pixels=3584 * 28 * 28, max_pixels=768 * 28 * 28)
    kept = []
    for start in range(0, total, V.DECODE_CHUNK):
        chunk = decoder.get_frames_in_range(start, min(start + V.DECODE_CHUNK, total)).data
        keep = [i - start for i in wanted if start <= i < start + len(chunk)]
        kept.append(chunk[keep])
    frames = torch.cat(kept)
    size = V.smart_resize(*frames.shape[-2:], min_pixels=16 * 28 * 28, max_pixels=budget)
    clip = V.Clip(frames=V.resize_frames(frames, size), frame_indices=wanted, timestamps=[i / fps for i in wanted],
                  sample_fps=n / total * fps, video_fps=fps, duration=total / fps)
    V.video_inputs([clip])
    sync(device)
    return n


def skip_reason(device: str, size: str, seconds: int) -> str | None:
    if device == "cuda" and HOST != "cuda":
        return "needs a CUDA GPU"
    if not FULL and (size, seconds) not in SMALL_CASES:
        return f"the default set is {sorted(SMALL_CASES)} (VCR1_BENCH_FULL=1 runs all)"
    return None


@pytest.mark.parametrize("method", ["sampled", "naive"])
@pytest.mark.parametrize("seconds", SECONDS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_video_throughput(benchmark, device, size, seconds, method):
    if reason := skip_reason(device, size, seconds):
        pytest.skip(reason)
    path = make_clip(size, seconds)
    fn = pipeline if method == "sampled" else naive
    rounds = 3 if seconds <= 30 else 2
    warmup = 1 if device == "cuda" else 0  # CUDA context and NVDEC decoder creation
    frames = benchmark.pedantic(fn, args=(path, device), rounds=rounds, iterations=1, warmup_rounds=warmup)
    if benchmark.stats is None:  # --benchmark-disable: nothing measured
        return
    mean = benchmark.stats.stats.mean
    row = dict(device=device, size=size, seconds=seconds, method=method, frames=frames, mean_s=mean,
               min_s=benchmark.stats.stats.min, rounds=rounds, frames_per_s=frames / mean, clips_per_s=1 / mean,
               video_seconds_per_s=seconds / mean)
    benchmark.extra_info.update(row)
    ROWS.append(row)


def versions() -> dict:
    ffmpeg = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"torch": torch.__version__, "torchcodec": torchcodec.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "ffmpeg": ffmpeg}


def speedups() -> dict:
    """CUDA over CPU, and sampled over naive, for each clip measured both ways."""
    by = {(r["device"], r["size"], r["seconds"], r["method"]): r["mean_s"] for r in ROWS}
    out = {}
    for (device, size, seconds, method), mean in by.items():
        if device == "cuda" and method == "sampled" and ("cpu", size, seconds, "sampled") in by:
            out[f"cuda_vs_cpu_{size}_{seconds}s"] = by[("cpu", size, seconds, "sampled")] / mean
        if method == "sampled" and (device, size, seconds, "naive") in by:
            out[f"sampled_vs_naive_{device}_{size}_{seconds}s"] = by[(device, size, seconds, "naive")] / mean
    return out


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if not ROWS:
        return
    device = torch.cuda.get_device_name() if HOST == "cuda" else f"{platform.processor() or 'cpu'} x{os.cpu_count()}"
    result = {"device": HOST, "device_name": device, "versions": versions(), "ffmpeg_threads": V.FFMPEG_THREADS,
              "clip": f"testsrc2 H.264 yuv420p {FPS} fps, x264 veryfast, default GOP",
              "cases": ROWS, "speedups": speedups(), "cuda_fallbacks": V.decode_stats["cuda_fallback"]}
    BENCH_RESULTS.mkdir(parents=True, exist_ok=True)
    (BENCH_RESULTS / f"video_{HOST}.json").write_text(json.dumps(result, indent=2) + "\n")
