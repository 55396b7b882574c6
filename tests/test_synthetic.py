"""The synthetic dataset: deterministic, cached, readable by the real loaders, and its ground truth exact.

Ground truth is checked against the pixels the trainer would see (load_video's frames), not against
the generator's own bookkeeping.
"""
import json
import time
from pathlib import Path

import numpy as np
import pytest

from vcr1.data.annotations import load_annotations
from vcr1.data.synthetic import COLORS, RGB, SHAPES, SPLITS, generate, shape_mask
from vcr1.data.video import load_video
from vcr1.prompts import DECIMALS
from vcr1.tasks import SYNTHETIC as SYNTHETIC_TASKS
from vcr1_testing import synthetic_tasks

N_TRAIN, N_TEST, SIZE = 4, 2, 112
CLOSE = 60  # max colour distance to a pure shape colour after H.264 / JPEG (≥ 100 between colours)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), tasks=synthetic_tasks(), seed=0, n_train=N_TRAIN,
                    n_test=N_TEST)


def samples(paths, split, task):
    p = paths[split][task]
    got, skipped = load_annotations(task, p["annotations"], p["media_root"])
    assert skipped == 0
    return got


def frames(sample):
    """load_video's frames as [T, H, W, 3] int arrays, and their times in seconds."""
    clip = load_video(sample.video)
    return clip.frames.permute(0, 2, 3, 1).numpy().astype(int), clip.timestamps


def near(img, color):
    return np.linalg.norm(img - np.array(RGB[color]), axis=-1) < CLOSE


def words(text, vocab):
    return [w for w in text.replace(".", "").split() if w in vocab]


def test_loaders_read_every_file(paths):
    for split, n in zip(SPLITS, (N_TRAIN, N_TEST)):
        for task in SYNTHETIC_TASKS:
            got = samples(paths, split, task)
            assert len(got) == n and all(s.task == task for s in got)
            for s in got:
                clip = load_video(s.video)
                assert clip.frames.shape[1:] == (3, SIZE, SIZE) and clip.frames.shape[0] % 2 == 0
                if task == "tracking":
                    assert clip.frames.shape[0] == 8 and len(s.solution["boxes"]) == 8
                else:  # the annotated duration is the file's
                    assert clip.duration == pytest.approx(s.duration)


def test_formats_mirror_real_files(paths):
    tg = json.loads(Path(paths["train"]["tg"]["annotations"]).read_text())
    entry = next(iter(tg.values()))
    assert set(entry) == {"duration", "timestamps", "sentences"}
    assert len(entry["timestamps"]) == len(entry["sentences"])
    assert all(t == round(t, 1) for t in entry["timestamps"][0]) and entry["sentences"][0].endswith(".")
    gqa = json.loads(Path(paths["train"]["gqa"]["annotations"]).read_text())[0]
    assert set(gqa) == {"id", "video", "question", "options", "duration", "glue", "type", "answer"}
    assert [o[:4] for o in gqa["options"]] == ["(A) ", "(B) ", "(C) ", "(D) ", "(E) "]
    track = json.loads(Path(paths["train"]["tracking"]["annotations"]).read_text())[0]
    assert set(track) == {"path", "object", "gt"} and track["path"].startswith("/")
    assert all(0 <= v <= 1 and v == round(v, DECIMALS) for box in track["gt"] for v in box)


def test_deterministic(paths, tmp_path):
    same = generate(tmp_path / "same", tasks=synthetic_tasks(), seed=0, n_train=N_TRAIN, n_test=N_TEST)
    other = generate(tmp_path / "other", tasks=synthetic_tasks(), seed=1, n_train=N_TRAIN, n_test=N_TEST)
    for split in SPLITS:
        for task in SYNTHETIC_TASKS:
            ann = Path(paths[split][task]["annotations"]).read_text()
            assert Path(same[split][task]["annotations"]).read_text() == ann
            assert Path(other[split][task]["annotations"]).read_text() != ann
            for a, b in zip(samples(paths, split, task), samples(same, split, task)):
                assert np.array_equal(frames(a)[0], frames(b)[0])
    a, b = samples(paths, "train", "tg")[0], samples(other, "train", "tg")[0]
    assert frames(a)[0].shape != frames(b)[0].shape or not np.array_equal(frames(a)[0], frames(b)[0])


def test_cached_unless_parameters_change(tmp_path):
    generate(tmp_path, tasks=synthetic_tasks(), n_train=1, n_test=1)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock")
    stamps = [p.stat().st_mtime_ns for p in files]
    start = time.perf_counter()
    out = generate(tmp_path, tasks=synthetic_tasks(), n_train=1, n_test=1)
    assert time.perf_counter() - start < 1
    assert [p.stat().st_mtime_ns for p in files] == stamps
    generate(tmp_path, tasks=synthetic_tasks(), n_train=1, n_test=2)  # a changed parameter regenerates
    assert len(samples(out, "test", "gqa")) == 2


def test_tg_target_visible_exactly_in_span(paths):
    for split in SPLITS:
        for s in samples(paths, split, "tg"):
            (color,) = words(s.fields["event"], COLORS)
            start, end = s.solution["span"]
            imgs, times = frames(s)
            inside = [start <= t < end for t in times]
            assert any(inside) and not all(inside)
            for img, shown in zip(imgs, inside):
                assert (near(img, color).sum() > 100) == shown, (s.uid, color, start, end)


def test_tg_and_gqa_backgrounds_show_the_time(paths):
    """The clock: a frame's background brightness alone tells how far into the video it is."""
    from vcr1.data.synthetic import CLOCK_LIGHT, DAWN

    for split in SPLITS:
        for s in samples(paths, split, "tg") + samples(paths, split, "gqa"):
            imgs, times = frames(s)
            greyish = (np.ptp(imgs, axis=-1) < 40) & (imgs.mean(-1) < 200)  # background, not a shape
            levels = np.array([np.median(img.mean(-1)[g]) for img, g in zip(imgs, greyish)])
            estimate = (levels - DAWN) / CLOCK_LIGHT * s.duration
            assert np.abs(estimate - np.array(times)).max() < 0.75, (s.uid, estimate, times)


def test_tracking_boxes_are_the_targets(paths):
    for split in SPLITS:
        for s in samples(paths, split, "tracking"):
            color, _ = s.fields["object"].split()
            imgs, _ = frames(s)
            for img, box in zip(imgs, s.solution["boxes"]):
                x0, y0, x1, y1 = np.array(box) * SIZE
                assert near(img, color)[int((y0 + y1) / 2), int((x0 + x1) / 2)]
                ys, xs = np.nonzero(near(img, color))  # the target's pixels span the box, no more
                span = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert np.allclose(span, [x0, y0, x1, y1], atol=1.5), (s.uid, span, box)


def test_gqa_answer_names_what_appears_in_glue(paths):
    for split in SPLITS:
        for s in samples(paths, split, "gqa"):
            letter = s.solution["answer"].strip("()")
            answer = next(o[4:] for o in s.fields["options"] if o.startswith(f"({letter})"))
            (start, end), = s.solution["glue"]
            imgs, times = frames(s)
            inside = [start <= t < end for t in times]
            assert any(inside) and not all(inside)
            # the target is what differs between neighbouring frames inside and outside the glue (the
            # clock brightens the background only a little from one frame to the next)
            k = next(k for k in range(len(inside) - 1) if inside[k] != inside[k + 1])
            shown, hidden = (imgs[k], imgs[k + 1]) if inside[k] else (imgs[k + 1], imgs[k])
            appeared = np.abs(shown - hidden).sum(-1) > 60
            ys, xs = np.nonzero(appeared)
            pixels = shown[appeared]
            color = min(COLORS, key=lambda c: np.linalg.norm(np.median(pixels, 0) - RGB[c]))
            crop = appeared[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            masks = {sh: shape_mask(sh, *crop.shape) for sh in SHAPES}
            iou = {sh: (crop & m).sum() / (crop | m).sum() for sh, m in masks.items()}
            assert words(answer, COLORS) in ([], [color]), (s.uid, answer, color)
            assert words(answer, SHAPES) in ([], [max(iou, key=iou.get)]), (s.uid, answer, iou)
            assert words(answer, COLORS + SHAPES)  # the answer names a colour, a shape or both


def test_gqa_options_are_colours_in_a_fixed_order(paths):
    for split in SPLITS:
        for s in samples(paths, split, "gqa"):
            texts = [o[4:] for o in s.fields["options"]]
            assert len(set(texts)) == 5 and set(texts) <= set(COLORS)
            assert texts == sorted(texts, key=COLORS.index), s.uid


def test_tracked_objects_drift_slowly_but_move(paths):
    for split in SPLITS:
        for s in samples(paths, split, "tracking"):
            boxes = np.array(s.solution["boxes"])
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            assert np.abs(np.diff(centres[:7], axis=0)).max() < 0.15, s.uid  # slow between picked frames
            assert np.abs(centres[6] - centres[0]).max() > 0, s.uid  # yet it moves


def test_no_fixed_span_fits_the_appearance_spans():
    """tg and glue mIoU measure temporal grounding only where an answer that ignores the video scores low:
    the best fixed span, fitted on one set of drawn spans, stays far below a model that sees them."""
    from vcr1.data.synthetic import APPEARANCE_SECONDS, appearance_span
    from vcr1.metrics import blind_span_baseline

    rng = np.random.default_rng(0)

    def drawn(n):
        return [(APPEARANCE_SECONDS, [[t / 10 for t in appearance_span(rng, APPEARANCE_SECONDS * 10)]])
                for _ in range(n)]

    items = drawn(400)
    assert all(0 <= s < e <= APPEARANCE_SECONDS for _, [[s, e]] in items)
    assert min(s for _, [[s, _]] in items) < 0.5 and max(e for _, [[_, e]] in items) > APPEARANCE_SECONDS - 0.5
    assert blind_span_baseline(items, drawn(400))["mIoU"] < 40


def test_in_process_encoder_gives_the_ffmpeg_cli_pixels(tmp_path):
    """The generator encodes in-process; its videos decode to the very frames that ffmpeg's command line
    (the encoder of the datasets before, with the same x264 settings) gives from the same source frames."""
    import shutil
    import subprocess

    import torch
    from torchcodec.decoders import VideoDecoder

    from vcr1.data.synthetic import appearance_video, encode_mp4

    if shutil.which("ffmpeg") is None:
        pytest.skip("needs the ffmpeg command line")
    frames, _, _ = appearance_video(np.random.default_rng(7), SIZE, 4, 32)
    encode_mp4(frames, 4, tmp_path / "in_process.mp4")
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{SIZE}x{SIZE}", "-r", "4", "-i", "-", "-c:v", "libx264", "-preset", "veryfast",
                    "-qp", "12", "-pix_fmt", "yuv420p", "-threads", "1", str(tmp_path / "cli.mp4")],
                   input=frames.tobytes(), check=True)
    ours, cli = (VideoDecoder(str(tmp_path / f"{name}.mp4"))[:].data for name in ("in_process", "cli"))
    assert ours.shape == (32, 3, SIZE, SIZE)
    source = torch.from_numpy(frames).permute(0, 3, 1, 2).int()
    assert (ours.int() - source).abs().float().mean() < 3  # lossy, yet close to the source
    assert ours.equal(cli)
