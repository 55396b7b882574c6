"""Annotation loaders: every real file (docs/paper.md §6 counts), malformed entries, JSONL, GOT-10k re-rooting."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vcr1.data.annotations import detect_format, load_annotations
from vcr1.data.sample import Sample
from vcr1.data.video import VideoError, load_video, select_tracking_frames
from vcr1.tasks import get_task
from vcr1.tasks.tracking import reroot

REAL = {  # file: (task, format, entries (docs/paper.md §6), uids of the entries skipped as malformed)
    # four Charades-STA training sentences end before they start
    "charades_sta_train.json": ("tg", "charades", 12_408, {"LEOL6#0", "IOL8Q#0", "AKKWU#0", "AKKWU#1"}),
    "charades_sta_test.json": ("tg", "charades", 3_720, set()),
    "activitynet_grounding_test.json": ("tg", "charades", 17_031, set()),
    "nextgqa_val.json": ("gqa", "nextgqa", 3_358, set()),
    "nextgqa_test.json": ("gqa", "nextgqa", 5_553, set()),
    "got10k_val_8frames.json": ("tracking", "got10k", 180, set()),
}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# ---------------------------------------------------------------- real files

@pytest.mark.parametrize("name", REAL)
def test_real_files_load_every_usable_entry(shared_data, name, tmp_path, caplog):
    task, fmt, count, bad = REAL[name]
    path = shared_data / "annotations" / name
    assert detect_format(json.loads(path.read_text()), None) == fmt
    with caplog.at_level(logging.WARNING):
        samples, skipped = load_annotations(task, path, tmp_path)
    assert (len(samples), skipped) == (count - len(bad), len(bad))
    assert len({s.uid for s in samples}) == count - len(bad) and not bad & {s.uid for s in samples}
    skips = [r.message for r in caplog.records if "skipping" in r.message]
    assert sorted(m.split("skipping sample ")[1].split(":")[0] for m in skips) == sorted(bad)
    assert all("start is after end" in m for m in skips)
    assert all(s.task == task for s in samples)
    first = samples[0]
    if task == "tg":
        raw = json.loads(path.read_text())
        video_id = next(iter(raw))
        assert first.video == str(tmp_path / f"{video_id}.mp4") and first.uid == f"{video_id}#0"
        assert first.fields == {"event": raw[video_id]["sentences"][0]}
        assert first.solution == {"span": raw[video_id]["timestamps"][0]}
        assert first.duration == raw[video_id]["duration"]
    elif task == "gqa":
        raw = json.loads(path.read_text())[0]
        assert first.video == str(tmp_path / raw["video"]) and first.uid == raw["id"]
        assert first.fields == {"question": raw["question"], "options": raw["options"]}
        assert first.solution == {"answer": raw["answer"], "glue": raw["glue"]}
        letters = {o[1] for o in raw["options"]}
        assert all(s.solution["answer"][1] in letters for s in samples)
    else:
        raw = json.loads(path.read_text())[0]
        assert first.video == str(tmp_path / Path(raw["path"]).name)
        assert first.fields == {"object": raw["object"], "start": raw["gt"][0]}
        assert first.solution == {"boxes": raw["gt"]} and first.duration is None


@pytest.mark.parametrize("name,task", [(name, REAL[name][0]) for name in REAL]
                         + [("nextgqa_val.json", "mcq"), ("nextgqa_test.json", "mcq")])
def test_real_samples_never_make_rewards_raise(shared_data, name, task, tmp_path):
    """Load-time validation is the rewards' own: no sample that loaded can fail in training."""
    samples, _ = load_annotations(task, shared_data / "annotations" / name, tmp_path)
    for s in samples:
        get_task(s.task).check(s.fields, s.solution)
        for completion in ("", "<think>.</think><answer>A 1 to 2</answer><glue>[(1, 2)]</glue>"):
            get_task(s.task).rewards(completion, s.solution, True)


def test_real_nextgqa_as_plain_mcq(shared_data, tmp_path):
    samples, skipped = load_annotations("mcq", shared_data / "annotations" / "nextgqa_val.json", tmp_path, limit=50)
    assert (len(samples), skipped) == (50, 0)
    assert all(set(s.solution) == {"answer"} and s.task == "mcq" for s in samples)


# ---------------------------------------------------------------- malformed entries

def test_charades_skips_malformed_entries(tmp_path, caplog):
    data = {
        "ok": {"duration": 30.0, "timestamps": [[1.0, 5.0], [2, 9]], "sentences": ["a person sits.", "b."]},
        "not_a_dict": [1, 2],
        "no_sentences": {"duration": 3.0, "timestamps": [[0, 1]]},
        "mismatch": {"duration": 3.0, "timestamps": [[0, 1]], "sentences": ["x.", "y."]},
        "bad_items": {"duration": 30.0, "timestamps": [[0, 1, 2], [0, 1], [0, "x"]], "sentences": ["x.", 7, "z."]},
        "bad_duration": {"duration": "long", "timestamps": [[0, 1]], "sentences": ["x."]},
        "neg_duration": {"duration": -1, "timestamps": [[0, 1]], "sentences": ["x."]},
    }
    with caplog.at_level(logging.WARNING):
        samples, skipped = load_annotations("tg", write_json(tmp_path / "c.json", data), tmp_path)
    assert [s.uid for s in samples] == ["ok#0", "ok#1"]
    assert samples[1].solution == {"span": [2, 9]} and samples[1].duration == 30.0
    # not_a_dict, no_sentences, mismatch, bad_duration: whole entries; bad_items: 3 sentences; neg_duration: 1
    assert skipped == 4 + 3 + 1
    assert len([r for r in caplog.records if "skipping" in r.message]) == skipped
    assert any("missing key 'sentences'" in r.message for r in caplog.records)


def test_activitynet_video_extension_is_found(tmp_path):
    data = {vid: {"duration": 10, "timestamps": [[0, 1]], "sentences": ["x."]} for vid in ("v_a", "v_b", "v_c")}
    (tmp_path / "v_a.mkv").write_bytes(b"")
    (tmp_path / "v_b.webm").write_bytes(b"")
    samples, _ = load_annotations("tg", write_json(tmp_path / "anet.json", data), tmp_path)
    assert [Path(s.video).name for s in samples] == ["v_a.mkv", "v_b.webm", "v_c.mp4"]


def test_nextgqa_skips_malformed_entries(tmp_path):
    good = {"id": "1_0", "video": "0001/1.mp4", "question": "what?", "options": ["(A) x", "(B) y"],
            "duration": 30, "glue": [[1.0, 2.5]], "type": "TN", "answer": "(B)"}
    bad = [
        {k: v for k, v in good.items() if k != "answer"},
        {**good, "options": "(A) x"},
        {**good, "glue": [[1.0]]},
        {**good, "glue": []},
        {**good, "video": 5},
        {**good, "question": ""},
        "not an object",
    ]
    rows = [good] + [{**b, "id": f"bad{i}"} if isinstance(b, dict) else b for i, b in enumerate(bad)]
    rows.append(dict(good))  # duplicate id
    samples, skipped = load_annotations("gqa", write_json(tmp_path / "n.json", rows), tmp_path)
    assert [s.uid for s in samples] == ["1_0"] and skipped == len(bad) + 1
    assert samples[0].duration == 30.0 and isinstance(samples[0].duration, float)


def test_got10k_skips_malformed_entries(tmp_path):
    boxes = [[0.1, 0.1, 0.5, 0.5]] * 8
    rows = [
        {"path": "/mnt/x/GOT-10k/val/GOT-10k_Val_000001", "object": "cat", "gt": boxes},
        {"path": "/mnt/x/GOT-10k/val/GOT-10k_Val_000002", "object": "cat", "gt": boxes[:7]},
        {"path": "/mnt/x/GOT-10k/val/GOT-10k_Val_000003", "gt": boxes},
        {"path": "/mnt/x/GOT-10k/val/GOT-10k_Val_000004", "object": "cat", "gt": [[0.1, 0.2, 0.3]] * 8},
        {"path": "/mnt/x/GOT-10k/val/GOT-10k_Val_000005", "object": "cat", "gt": []},
        {"object": "cat", "gt": boxes},
    ]
    samples, skipped = load_annotations("tracking", write_json(tmp_path / "g.json", rows), tmp_path / "val")
    assert [s.uid for s in samples] == ["GOT-10k_Val_000001"] and skipped == 5
    assert samples[0].video == str(tmp_path / "val" / "GOT-10k_Val_000001")


# ---------------------------------------------------------------- file-level errors and options

def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_annotations("tg", tmp_path / "missing.json", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="neither JSON nor JSONL"):
        load_annotations("tg", tmp_path / "bad.json", tmp_path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError):
        load_annotations("tg", tmp_path / "bin.json", tmp_path)
    with pytest.raises(ValueError, match="cannot detect"):
        load_annotations("tg", write_json(tmp_path / "odd.json", [1, 2, 3]), tmp_path)
    charades = write_json(tmp_path / "c.json", {"v": {"duration": 3, "timestamps": [[0, 1]], "sentences": ["x"]}})
    with pytest.raises(ValueError, match="not 'gqa'"):
        load_annotations("gqa", charades, tmp_path)
    with pytest.raises(ValueError, match="JSON list"):
        load_annotations("gqa", charades, tmp_path, fmt="nextgqa")
    with pytest.raises(ValueError, match="unknown annotation format"):
        load_annotations("tg", charades, tmp_path, fmt="csv")


def test_limit_and_default_task(tmp_path):
    data = {f"v{i}": {"duration": 9, "timestamps": [[0, 1]] * 3, "sentences": ["a.", "b.", "c."]} for i in range(4)}
    path = write_json(tmp_path / "c.json", data)
    samples, _ = load_annotations(None, path, tmp_path, limit=5)
    assert [s.uid for s in samples] == ["v0#0", "v0#1", "v0#2", "v1#0", "v1#1"] and samples[0].task == "tg"


# ---------------------------------------------------------------- generic JSONL

def test_jsonl_formats_and_defaults(tmp_path):
    boxes = [[0.1, 0.2, 0.3, 0.4]] * 8
    rows = [
        {"task": "tg", "video": "a.mp4", "fields": {"event": "x."}, "solution": {"span": [1, 2]}, "duration": 9},
        {"task": "gqa", "video": "/abs/b.mp4", "question": "q?", "options": ["(A) x", "(B) y"],
         "solution": {"answer": "(A)", "glue": [[0, 1]]}, "uid": "mine", "start": 2, "end": 8},
        {"task": "tracking", "video": ["f0.jpg", "f1.jpg"], "object": "dog", "solution": {"boxes": boxes}},
        {"task": "mcq", "video": "c.mp4", "fields": {"question": "q?", "options": ["(A) x"]},
         "solution": {"answer": "(A)"}},
        "",
        {"video": "d.mp4", "fields": {"event": "y."}, "solution": {"span": [0, 1]}},  # task from the argument
    ]
    samples, skipped = load_annotations("tg", write_jsonl(tmp_path / "my.jsonl", rows), tmp_path)
    assert skipped == 0
    tg, gqa, track, mcq, default = samples
    assert tg == Sample("tg", "my:1", str(tmp_path / "a.mp4"), {"event": "x."}, {"span": [1, 2]}, 9.0)
    assert gqa.uid == "mine" and gqa.video == "/abs/b.mp4" and (gqa.start, gqa.end) == (2.0, 8.0)
    assert gqa.fields == {"question": "q?", "options": ["(A) x", "(B) y"]}
    assert track.video == [str(tmp_path / "f0.jpg"), str(tmp_path / "f1.jpg")]
    assert track.fields == {"object": "dog", "start": boxes[0]}
    assert mcq.solution == {"answer": "(A)"} and default.task == "tg" and default.uid == "my:6"


def test_jsonl_skips_malformed_lines(tmp_path):
    good = {"task": "tg", "video": "a.mp4", "fields": {"event": "x."}, "solution": {"span": [1, 2]}}
    rows = [
        good,
        "{broken json",
        "[1, 2]",
        {**good, "task": "caption"},
        {k: v for k, v in good.items() if k != "solution"},
        {**good, "solution": [1, 2]},
        {**good, "video": ""},
        {**good, "video": 3},
        {**good, "fields": {"event": ""}},
        {**good, "solution": {"span": [2]}},
        {"task": "tracking", "video": "x", "object": "o", "solution": {"boxes": [[0, 0, 1, 1]] * 7}},
        {"task": "gqa", "video": "x", "question": "q", "options": ["(A)"], "solution": {"answer": "(A)"}},
        {**good, "start": 5, "end": 2},
        {**good, "video": ["f0.jpg", "f1.jpg"], "start": 1},
        {**good, "start": "soon"},
    ]
    samples, skipped = load_annotations(None, write_jsonl(tmp_path / "bad.jsonl", rows), tmp_path)
    assert len(samples) == 1 and skipped == len(rows) - 1


NAN, INF = float("nan"), float("inf")
TG = {"task": "tg", "video": "a.mp4", "fields": {"event": "x."}}
MCQ = {"task": "mcq", "video": "a.mp4", "question": "q?", "options": ["(A) a", "(B) b", "(C) c", "(D) d"]}
GQA = {**MCQ, "task": "gqa", "options": ["(A) a", "(B) b"]}
TRACK = {"task": "tracking", "video": ["f0.jpg"], "object": "cat"}
BOXES = [[0.1, 0.1, 0.5, 0.5]] * 8
BAD_GROUND_TRUTH = {  # uid: (line, what the skip message says)
    "reversed span": ({**TG, "solution": {"span": [5, 2]}}, "bad tg span [5, 2]: start is after end"),
    "nan span": ({**TG, "solution": {"span": [NAN, 2]}}, "finite numbers"),
    "inf span": ({**TG, "solution": {"span": [1, INF]}}, "finite numbers"),
    "letter past options": ({**MCQ, "solution": {"answer": "(E)"}}, "option E is out of range for 4 options"),
    "gqa letter past options": ({**GQA, "solution": {"answer": "(C)", "glue": [[0, 1]]}}, "option C is out of range"),
    "no letter": ({**MCQ, "solution": {"answer": "none"}}, "bad answer 'none'"),
    "7 boxes": ({**TRACK, "solution": {"boxes": BOXES[:7]}}, "want 8 boxes, got 7 boxes"),
    "9 boxes": ({**TRACK, "solution": {"boxes": BOXES + BOXES[:1]}}, "want 8 boxes, got 9 boxes"),
    "nan box": ({**TRACK, "solution": {"boxes": BOXES[:7] + [[0, 0, NAN, 1]]}}, "bad tracking box 7"),
    "reversed glue": ({**GQA, "solution": {"answer": "(A)", "glue": [[0, 1], [6, 4]]}},
                      "bad glue span [6, 4]: start is after end"),
    "nan glue": ({**GQA, "solution": {"answer": "(A)", "glue": [[NAN, 1]]}}, "bad glue span"),
    "empty glue": ({**GQA, "solution": {"answer": "(A)", "glue": []}}, "non-empty"),
    "inf duration": ({**TG, "solution": {"span": [1, 2]}, "duration": INF}, "duration must be a finite number"),
}


def test_jsonl_skips_and_counts_bad_ground_truth(tmp_path, caplog):
    """Each rule of a task's `check` (and the options' letter range) applies at load time."""
    good = {"zero-length span": {**TG, "solution": {"span": [3, 3]}},
            "last option": {**MCQ, "solution": {"answer": "(D)"}},
            "gqa last option": {**GQA, "solution": {"answer": "The answer is (B)", "glue": [[0, 1], [1, 2]]}},
            "boxes": {**TRACK, "solution": {"boxes": BOXES}}}
    rows = [{**row, "uid": uid} for uid, row in good.items()]
    rows += [{**row, "uid": uid} for uid, (row, _) in BAD_GROUND_TRUTH.items()]
    with caplog.at_level(logging.WARNING):
        samples, skipped = load_annotations(None, write_jsonl(tmp_path / "gt.jsonl", rows), tmp_path)
    assert [s.uid for s in samples] == list(good) and skipped == len(BAD_GROUND_TRUTH)
    messages = [r.message for r in caplog.records if "skipping" in r.message]
    for uid, (_, reason) in BAD_GROUND_TRUTH.items():
        assert any(f"skipping sample {uid}: " in m and reason in m for m in messages), (uid, reason, messages)


def test_single_line_jsonl_is_detected(tmp_path):
    row = {"task": "tg", "video": "a.mp4", "fields": {"event": "x."}, "solution": {"span": [1, 2]}}
    samples, skipped = load_annotations(None, write_jsonl(tmp_path / "one.jsonl", [row]), tmp_path)
    assert len(samples) == 1 and skipped == 0


# ---------------------------------------------------------------- GOT-10k re-rooting, end to end

@pytest.mark.parametrize("path,expected", [
    ("/mnt/petrelfs/share/videointern/GOT/OpenDataLab___GOT-10k/raw/GOT-10k/val/GOT-10k_Val_000010",
     "GOT-10k_Val_000010"),
    ("GOT-10k/train/GOT-10k_Train_008002", "GOT-10k_Train_008002"),
    ("/data/GOT-10k/val/", "val"),             # a path that ends in the split folder keeps it
    ("/somewhere/sequences/seq_7", "seq_7"),   # no split folder: the last component
    ("/d/train/nested/seq_1", "nested/seq_1"),
])
def test_reroot(path, expected, tmp_path):
    assert reroot(path, tmp_path) == str(tmp_path / expected)


def test_got10k_sample_loads_its_eight_frames(tmp_path):
    """A sample re-rooted onto a sequence directory decodes to the docs/paper.md §2 frame selection; a sequence
    missing here fails only at load time, with VideoError."""
    seq = tmp_path / "val" / "GOT-10k_Val_000001"
    seq.mkdir(parents=True)
    for i in range(30):
        Image.fromarray(np.full((48, 64, 3), 8 * i, np.uint8)).save(seq / f"{i + 1:08d}.jpg", quality=95)
    boxes = [[0.1, 0.1, 0.5, 0.5]] * 8
    rows = [{"path": f"/cluster/GOT-10k/val/GOT-10k_Val_00000{k}", "object": "cat", "gt": boxes} for k in (1, 2)]
    samples, _ = load_annotations("tracking", write_json(tmp_path / "g.json", rows), tmp_path / "val")
    clip = load_video(samples[0].video)
    assert clip.frame_indices == select_tracking_frames(30) + [29] and clip.frames.shape[0] == 8
    levels = clip.frames.float().mean(dim=(1, 2, 3)).tolist()
    assert levels == pytest.approx([8 * i for i in clip.frame_indices], abs=2)
    with pytest.raises(VideoError):
        load_video(samples[1].video)
