"""Synthetic dataset of the embedded default: real encoded videos of coloured shapes, exact ground truth.

Three kinds of example, each written in a real dataset's format (docs/paper.md §6), so the trainer reads
them through the same loaders and decoder as real data; a task's `synthetic_item` (vcr1/tasks) picks one:
- `appearing_shape`: an H.264 mp4 in which a shape appears at s and disappears at e (a Charades-STA entry);
- `drifting_sequence`: a GOT-10k-style folder of numbered JPEG frames with one moving target (8-frame entry);
- `colour_question`: an H.264 mp4 and a 5-option question on the colour of the shape that appears (NExT-GQA).
Difficulty is set for a 1.4M-parameter model to learn in minutes on a CPU: tracked objects drift slowly
(the start box is a fair first guess, every frame's box still differs), a question's options are listed
in a fixed order (the order of COLORS), so the right letter follows from the colour the video shows and
not from reading and matching the options' text, and tg/gqa videos all last APPEARANCE_SECONDS with
large shapes. Their spans are short and anywhere in the video, so a right span must come from the video,
and their backgrounds brighten steadily (a clock in every patch: see CLOCK_LIGHT).
Everything follows from the seed: the same seed gives the same annotations and pixel-identical frames.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from vcr1.data.video import select_tracking_frames
from vcr1.prompts import DECIMALS

COLORS = ("red", "green", "blue", "yellow", "white", "purple")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Saturated colours far from the dark backgrounds and from each other, so they survive yuv420p and JPEG.
RGB = {
    "red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "white": (245, 245, 245), "purple": (170, 60, 220),
}
SPLITS = ("train", "test")
VERSION = 6  # bump when the generated content changes, so that cached datasets are regenerated
APPEARANCE_SECONDS = 8  # length of every tg and gqa video
# The target's time on screen, in seconds, anywhere in the video, so that no one span fits most answers:
# the best answer that ignores the video scores ~30 mIoU (with spans up to 60% of the video, ~50).
SPAN_SECONDS = (1.0, 3.0)
# tg/gqa backgrounds start this dark and brighten steadily by CLOCK_LIGHT over the video, so every patch
# of a frame shows how far into the video it is: a 1.4M-parameter model does not learn in minutes to read
# absolute time from rotary positions alone (it learns one span for every video), a large one does.
DAWN, CLOCK_LIGHT = 25, 120
TRACK_SPEED = (0.002, 0.008)  # a tracked object's speed range, as a fraction of its free range per frame


def shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """Boolean h × w mask of `shape` touching all four sides of its box (so the box is its bbox)."""
    y = (np.arange(h)[:, None] + 0.5) / h * 2 - 1  # pixel centres in (-1, 1)
    x = (np.arange(w)[None, :] + 0.5) / w * 2 - 1
    slack = 1 / min(h, w)  # lets the tips of the triangle and diamond reach the box's edge pixels
    if shape == "circle":
        m = x**2 + y**2 <= 1
    elif shape == "square":
        m = np.ones((h, w), bool)
    elif shape == "triangle":  # apex up
        m = np.abs(x) <= (y + 1) / 2 + slack
    elif shape == "diamond":
        m = np.abs(x) + np.abs(y) <= 1 + slack
    elif shape == "cross":
        m = (np.abs(x) <= 1 / 3) | (np.abs(y) <= 1 / 3)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.broadcast_to(m, (h, w))


def _draw(img: np.ndarray, obj: tuple[str, str], x: int, y: int, side: int) -> np.ndarray:
    """Draws obj = (colour, shape) in place with its box's top-left corner at (x, y); returns its mask."""
    mask = shape_mask(obj[1], side, side)
    img[y:y + side, x:x + side][mask] = RGB[obj[0]]
    return mask


def _background(rng: np.random.Generator, size: int, level: float | None = None) -> np.ndarray:
    """A dark, slightly tinted gradient: textured enough to look like a scene, far from every shape colour.
    Its mean brightness is `level`, or drawn in 25-70."""
    base = (rng.uniform(25, 70) if level is None else level) + rng.uniform(-10, 10, 3)
    gy, gx = rng.uniform(-15, 15, 2)
    ramp = np.linspace(-1, 1, size)
    img = base + gy * ramp[:, None, None] + gx * ramp[None, :, None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _objects(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n (colour, shape) pairs, no colour or shape shared, so the target's colour alone identifies it."""
    colors = rng.choice(len(COLORS), n, replace=False)
    shapes = rng.choice(len(SHAPES), n, replace=False)
    return [(COLORS[c], SHAPES[s]) for c, s in zip(colors, shapes)]


def appearance_span(rng: np.random.Generator, tenths: int) -> tuple[int, int]:
    """Start and end, in tenths of a second, of a target's time on screen in a video of `tenths`:
    SPAN_SECONDS long, anywhere in the video."""
    length = int(rng.integers(round(SPAN_SECONDS[0] * 10), round(SPAN_SECONDS[1] * 10) + 1))
    start = int(rng.integers(0, tenths - length + 1))
    return start, start + length


def appearance_video(rng: np.random.Generator, size: int, fps: int, n: int):
    """n frames of a static background on which one large shape is visible in [s, e).

    s and e are multiples of 0.1 s, and the shape is drawn in frame k iff s <= k / fps < e (checked in
    integer tenths), so the annotated span is exact. Returns frames, shape, (s, e).
    """
    (target,) = _objects(rng, 1)
    s10, e10 = appearance_span(rng, n * 10 // fps)
    rng.choice(4, 1, replace=False)  # the retired 2 × 2 distractor layout's draw, kept so that videos stay the same
    still = _background(rng, size, level=DAWN)
    side = int(rng.integers(int(0.45 * size), int(0.7 * size) + 1))
    x, y = (int(v) for v in rng.integers(size - side + 1, size=2))
    shown = still.copy()
    covered = np.zeros((size, size), bool)  # the shape's pixels, which the clock leaves alone
    covered[y:y + side, x:x + side] = _draw(shown, target, x, y, side)
    k10 = np.arange(n) * 10
    visible = (k10 >= s10 * fps) & (k10 < e10 * fps)
    frames = np.where(visible[:, None, None, None], shown, still).astype(np.int16)
    background = ~(visible[:, None, None] & covered)
    light = np.rint(CLOCK_LIGHT * np.arange(n) / n).astype(np.int16)  # at time t: CLOCK_LIGHT · t / duration
    frames += (background * light[:, None, None])[..., None]
    return np.clip(frames, 0, 255).astype(np.uint8), target, (s10 / 10, e10 / 10)


def encode_mp4(frames: np.ndarray, fps: int, path: Path) -> None:
    """H.264 mp4 of uint8 (n, h, w, 3) frames, encoded in-process (an ffmpeg process per video is slow). One
    encoder thread and a constant quantiser, not rate control, so the bytes are the same on every run and
    machine (docs/experiments.md)."""
    import torch
    from torchcodec.encoders import VideoEncoder

    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = VideoEncoder(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), frame_rate=fps)
    encoder.to_file(str(path), codec="libx264", pixel_format="yuv420p", preset="veryfast",
                    extra_options={"threads": 1, "qp": 12})


def appearing_shape(rng, i, split, media, size, fps):
    """A video in which one shape appears for 1-3 s, and its Charades-STA entry (video id, entry)."""
    n = APPEARANCE_SECONDS * fps
    frames, (color, shape), span = appearance_video(rng, size, fps, n)
    vid = f"{split}{i:04d}"
    encode_mp4(frames, fps, media / f"{vid}.mp4")
    template = ("the {} appears.", "a {} shows up.", "a {} appears on the screen.")[rng.integers(3)]
    sentence = template.format(f"{color} {shape}")
    return vid, {"duration": round(n / fps, 3), "timestamps": [list(span)], "sentences": [sentence]}


def colour_question(rng, i, split, media, size, fps):
    """A video in which one shape appears for a while, and its NExT-GQA entry: which colour is it?"""
    duration = APPEARANCE_SECONDS  # whole seconds, like NExT-GQA's
    # The target alone: the question asks what the only shape of the video looks like.
    frames, (color, _), span = appearance_video(rng, size, fps, duration * fps)
    # Colour, not shape: a model this size learns to see a colour in a few hundred steps, a shape in thousands.
    question = "what colour is the shape that appears for a while"
    wrong = set(rng.choice([c for c in COLORS if c != color], 4, replace=False))
    options = [c for c in COLORS if c == color or c in wrong]  # in COLORS' fixed order
    letter = "ABCDE"[options.index(color)]

    vid = f"{split}{i:04d}"
    video = f"{i // 16:04d}/{vid}.mp4"  # NExT-GQA nests videos in numbered folders
    encode_mp4(frames, fps, media / video)
    return {
        "id": f"{vid}_0", "video": video, "question": question,
        "options": [f"({'ABCDE'[j]}) {o}" for j, o in enumerate(options)],
        "duration": duration, "glue": [list(span)], "type": "DO", "answer": f"({letter})",
    }


def _reflect(u: np.ndarray) -> np.ndarray:
    """Folds positions onto [0, 1] as a ball bouncing between two walls."""
    u = np.mod(u, 2)
    return np.where(u > 1, 2 - u, u)


def drifting_sequence(rng, i, split, media, size):
    """A GOT-10k-style folder of 20-60 JPEG frames, a target and a distractor drifting, and its 8-frame entry."""
    n = int(rng.integers(20, 61))
    name = f"GOT-10k_{split.capitalize()}_{i + 1:06d}"
    seq = media / name
    seq.mkdir(parents=True)

    objs = _objects(rng, 2)  # target, distractor; the target is drawn last, on top
    t = np.arange(n)
    paths = []
    for _ in objs:  # a smooth bouncing path per object, its size changing linearly
        side = np.rint(np.linspace(*rng.uniform(0.2, 0.32, 2) * size, n)).astype(int)
        speed = rng.uniform(*TRACK_SPEED, 2) * rng.choice([-1, 1], 2)
        u = _reflect(rng.uniform(0, 1, 2)[None, :] + speed[None, :] * t[:, None])
        paths.append((np.rint(u * (size - side)[:, None]).astype(int), side))

    background = _background(rng, size)
    boxes = []
    for k in range(n):
        img = background.copy()
        for obj, (xy, side) in zip(objs[::-1], paths[::-1]):
            mask = _draw(img, obj, *xy[k], side[k])
        ys, xs = np.nonzero(mask)  # the target's mask: its box is exact by construction
        x, y = xy[k]
        boxes.append([(x + xs.min()) / size, (y + ys.min()) / size,
                      (x + xs.max() + 1) / size, (y + ys.max() + 1) / size])
        Image.fromarray(img).save(seq / f"{k + 1:08d}.jpg", quality=95, subsampling=0)

    # docs/paper.md §2's frames: first, five middle ones, last; Qwen's even-frame rule repeats the last one, so
    # the model sees 8 frames and the 8th box is the 7th's.
    picks = select_tracking_frames(n) + [n - 1]
    # At the answers' precision, so that the prompt's start box reads exactly as the answer's first box.
    gt = [[round(v, DECIMALS) for v in boxes[k]] for k in picks]
    return {"path": f"/synthetic/GOT-10k/{split}/{name}", "object": f"{objs[0][0]} {objs[0][1]}", "gt": gt}


def _item(task, split, media, size, fps, stream, i):
    rng = np.random.default_rng([*stream, i])  # each item independent of the others
    return task.synthetic_item(rng, i, split, media, size, fps)


def generate(out_dir, *, tasks, seed: int = 0, n_train: int = 32, n_test: int = 12, size: int = 112,
             video_fps: int = 4, force: bool = False) -> dict:
    """Writes (or finds already written) the dataset under out_dir.

    tasks: Task objects with `synthetic_item` and `synthetic_annotations` (vcr1.tasks.SYNTHETIC's); the k-th
    task's examples are drawn from the seed and k, so a task keeps its examples only at the same position.
    Returns {split: {task name: {"annotations": path, "media_root": path}}} for splits train/test. A manifest
    of the parameters makes a second call with the same ones return at once.
    """
    names = [task.name for task in tasks]
    if size % 2 or size < 3 * 28:
        raise ValueError(f"size must be even (yuv420p) and >= 84 (shapes >= 20 px), got {size}")
    if int(video_fps) != video_fps or video_fps < 1:
        raise ValueError(f"video_fps must be a positive integer, got {video_fps}")
    out = Path(out_dir)
    params = {"version": VERSION, "tasks": names, "seed": seed, "n_train": n_train, "n_test": n_test, "size": size,
              "video_fps": int(video_fps)}
    paths = {split: {task: {"annotations": str(out / split / f"{task}.json"),
                            "media_root": str(out / split / task)} for task in names} for split in SPLITS}
    manifest = out / "manifest.json"

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several ranks may call this at once: one writes, the rest wait
        if (not force and manifest.exists() and json.loads(manifest.read_text()) == params
                and all(Path(p["annotations"]).exists() for s in paths.values() for p in s.values())):
            return paths
        manifest.unlink(missing_ok=True)  # written last: its presence means a complete dataset

        for s, split in enumerate(SPLITS):
            count = n_train if split == "train" else n_test
            for t, task in enumerate(tasks):
                media = Path(paths[split][task.name]["media_root"])
                shutil.rmtree(media, ignore_errors=True)  # stale frames would change a sequence's length
                media.mkdir(parents=True)

                make = partial(_item, task, split, media, size, int(video_fps), [seed, s, t])
                # Items are independent, so threads (the encoder runs outside the GIL) give the same files faster.
                with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                    entries = list(pool.map(make, range(count)))
                data = task.synthetic_annotations(entries)
                Path(paths[split][task.name]["annotations"]).write_text(json.dumps(data, indent=1) + "\n")
        manifest.write_text(json.dumps(params, indent=1) + "\n")
    return paths
