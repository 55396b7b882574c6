"""Annotation loaders: the real VideoChat-R1 files (spec §6) and a generic JSONL format.

Every format becomes a list of `Sample`s. `load_annotations` detects the format from the content
(or takes `fmt`), skips malformed entries with one warning each (returning how many it skipped),
and raises a clear error only when the file itself is missing or not JSON.

Formats:
- "charades" (Charades-STA, and ActivityNet Captions in the same layout):
  `{video_id: {"duration", "timestamps": [[s, e], ...], "sentences": [...]}}`, one sample per
  sentence; video `<media_root>/<video_id>` + the first of .mp4/.mkv/.webm that exists (.mp4 if none).
- "nextgqa": `[{"id", "video": "<dir>/<id>.mp4", "question", "options", "duration", "glue", "answer"}]`,
  video `<media_root>/<video>`.
- "got10k" (8-frame tracking): `[{"path": "<sequence dir>", "object", "gt": [8 x [x0, y0, x1, y1]]}]`.
  The paths are absolute cluster paths; they are re-rooted onto `media_root` by keeping what follows
  the last split folder ("train"/"val"/"test") of the path, or else its last component, so
  `/mnt/.../GOT-10k/val/GOT-10k_Val_000010` becomes `<media_root>/GOT-10k_Val_000010`: point
  media_root at the folder that holds the sequence folders. The directory is only read when the
  video is loaded (`load_video` picks its frames and raises VideoError if it is missing).
- "jsonl" (generic, for new data without code): one JSON object per line,
      {"task": "tg" | "tracking" | "gqa" | "mcq",
       "video": "relative/or/absolute.mp4" | ["frame0.jpg", ...],
       "fields": {...prompt fields...},          # or the prompt fields at top level
       "solution": {...},
       "uid": "...", "duration": s, "start": s, "end": s}     # optional
  Relative video paths are joined to media_root. Fields and solution per task:
      tg:       fields {"event": str}                          solution {"span": [s, e]}
      tracking: fields {"object": str, "start": [4 numbers]}   solution {"boxes": [8 x [x0, y0, x1, y1]]}
                ("start" defaults to the first box)
      gqa:      fields {"question": str, "options": [str]}     solution {"answer": "(C)", "glue": [[s, e], ...]}
      mcq:      fields {"question": str, "options": [str]}     solution {"answer": "(B)"}
  A solution must pass the rewards' check (vcr1.rewards.validate_solution): finite numbers, spans with
  start <= end, exactly 8 boxes, a non-empty glue list, an answer letter among the options.
  uid defaults to "<file stem>:<line number>"; a line's "task" overrides the `task` argument.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from vcr1.prompts import TASKS
from vcr1.rewards import is_box, is_number, validate_solution

logger = logging.getLogger(__name__)

FORMATS = ("charades", "nextgqa", "got10k", "jsonl")
FORMAT_TASKS = {"charades": ("tg",), "nextgqa": ("gqa", "mcq"), "got10k": ("tracking",), "jsonl": TASKS}
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")
SPLIT_FOLDERS = ("train", "val", "test")
JSONL_KEYS = {"task", "video", "fields", "solution", "uid", "duration", "start", "end"}


@dataclass
class Sample:
    """One training or evaluation example.

    video: a file path, a frame directory (GOT-10k) or a list of frame paths.
    fields: what the prompt builder fills in; solution: what the rewards compare against.
    start/end: a window of the video in seconds, for formats that need clipping.
    """

    task: str
    uid: str
    video: str | list[str]
    fields: dict
    solution: dict
    duration: float | None = None
    start: float | None = None
    end: float | None = None


# ---------------------------------------------------------------- validation

def _check_str(x, what: str) -> None:
    if not isinstance(x, str) or not x.strip():
        raise ValueError(f"{what} must be a non-empty string, got {x!r}")


def _check_seconds(x, what: str) -> None:
    if x is not None and not is_number(x):
        raise ValueError(f"{what} must be a finite number of seconds, got {x!r}")


def validate(sample: Sample) -> Sample:
    """Raise ValueError naming what is wrong with `sample`; return it unchanged when it is usable.

    The solution is checked by the rewards' own rule (vcr1.rewards.validate_solution, with the
    sample's options), so a sample that loads never makes a reward raise.
    """
    f = sample.fields
    if sample.task not in TASKS:
        raise ValueError(f"unknown task {sample.task!r} (expected one of {TASKS})")
    video = sample.video
    is_path = isinstance(video, str) and video
    is_frames = isinstance(video, list) and video and all(isinstance(v, str) and v for v in video)
    if not (is_path or is_frames):
        raise ValueError(f"video must be a path or a list of frame paths, got {sample.video!r}")
    options = None
    if sample.task == "tg":
        _check_str(f.get("event"), "event")
    elif sample.task == "tracking":
        _check_str(f.get("object"), "object")
        if not is_box(f.get("start")):
            raise ValueError(f"start must be [x0, y0, x1, y1] of finite numbers, got {f.get('start')!r}")
    else:
        _check_str(f.get("question"), "question")
        options = f.get("options")
        if not (isinstance(options, list) and options and all(isinstance(o, str) for o in options)):
            raise ValueError(f"options must be a non-empty list of strings, got {options!r}")
    validate_solution(sample.task, sample.solution, options)
    for name in ("duration", "start", "end"):
        _check_seconds(getattr(sample, name), name)
    if sample.duration is not None and sample.duration <= 0:
        raise ValueError(f"duration must be positive, got {sample.duration!r}")
    if sample.start is not None or sample.end is not None:
        if is_frames:
            raise ValueError("start/end apply to video files, not to frame lists")
        if sample.start is not None and sample.end is not None and sample.start >= sample.end:
            raise ValueError(f"start {sample.start} is not before end {sample.end}")
    return sample


# ---------------------------------------------------------------- formats
# Each parser turns one raw entry into its samples, raising KeyError/TypeError/ValueError when the
# entry is malformed; load_annotations then skips that entry.

def _seconds(x) -> float | None:
    return None if x is None else float(x)


def _video_file(media_root: Path, video_id: str) -> str:
    """`<media_root>/<video_id>` with the first existing video suffix, .mp4 if none exists."""
    for suffix in VIDEO_SUFFIXES:
        path = media_root / f"{video_id}{suffix}"
        if path.is_file():
            return str(path)
    return str(media_root / f"{video_id}{VIDEO_SUFFIXES[0]}")


def reroot(path: str, media_root: Path) -> str:
    """Move a (cluster) sequence path under media_root: keep what follows its last split folder."""
    parts = Path(path).parts
    splits = [i for i, p in enumerate(parts[:-1]) if p.lower() in SPLIT_FOLDERS]
    rel = parts[splits[-1] + 1:] if splits else parts[-1:]
    return str(media_root.joinpath(*rel))


def _charades(video_id: str, entry: dict, task: str, media_root: Path, stem: str) -> list[Sample]:
    sentences, spans = entry["sentences"], entry["timestamps"]
    if not (isinstance(sentences, list) and isinstance(spans, list) and len(sentences) == len(spans)):
        raise ValueError("'sentences' and 'timestamps' must be lists of the same length")
    video = _video_file(media_root, video_id)
    return [Sample(task=task, uid=f"{video_id}#{k}", video=video, fields={"event": sentence},
                   solution={"span": span}, duration=_seconds(entry.get("duration")))
            for k, (sentence, span) in enumerate(zip(sentences, spans))]


def _nextgqa(i: int, entry: dict, task: str, media_root: Path, stem: str) -> list[Sample]:
    solution = {"answer": entry["answer"]}
    if task == "gqa":
        solution["glue"] = entry["glue"]
    _check_str(entry["video"], "video")
    return [Sample(task=task, uid=str(entry["id"]), video=str(media_root / entry["video"]),
                   fields={"question": entry["question"], "options": entry["options"]},
                   solution=solution, duration=_seconds(entry.get("duration")))]


def _got10k(i: int, entry: dict, task: str, media_root: Path, stem: str) -> list[Sample]:
    _check_str(entry["path"], "path")
    boxes = entry["gt"]
    return [Sample(task=task, uid=Path(entry["path"]).name, video=reroot(entry["path"], media_root),
                   fields={"object": entry["object"], "start": boxes[0]}, solution={"boxes": boxes})]


def _jsonl(n: int, line: str, task: str | None, media_root: Path, stem: str) -> list[Sample]:
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("a line must be a JSON object")
    fields = dict(entry.get("fields") or {k: v for k, v in entry.items() if k not in JSONL_KEYS})
    solution = entry["solution"]
    if not isinstance(solution, dict):
        raise ValueError("solution must be an object")
    line_task = entry.get("task", task)
    if line_task == "tracking" and "start" not in fields:
        fields["start"] = solution["boxes"][0]
    return [Sample(task=line_task, uid=str(entry.get("uid", f"{stem}:{n}")),
                   video=_join_video(entry["video"], media_root), fields=fields, solution=solution,
                   duration=_seconds(entry.get("duration")), start=_seconds(entry.get("start")),
                   end=_seconds(entry.get("end")))]


def _join_video(video, media_root: Path):
    """Paths relative to media_root (absolute ones stay); anything else is left for validate()."""
    if isinstance(video, list):
        return [_join_video(v, media_root) for v in video]
    return str(media_root / video) if isinstance(video, str) and video else video


PARSERS = {"charades": _charades, "nextgqa": _nextgqa, "got10k": _got10k, "jsonl": _jsonl}


# ---------------------------------------------------------------- loading

def _read(path: Path) -> tuple[object, list[str] | None]:
    """(parsed JSON, None) for a JSON file, (None, lines) for a JSONL one."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read annotation file {path}: {e}") from e
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        lines = text.splitlines()
        first = next((line for line in lines if line.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:
            raise ValueError(f"{path} is neither JSON nor JSONL: {e}") from e
        return None, lines


def detect_format(data, lines: list[str] | None) -> str:
    if lines is not None or isinstance(data, dict) and "solution" in data:
        return "jsonl"
    if isinstance(data, dict) and data:
        first = next(iter(data.values()))
        if isinstance(first, dict) and "sentences" in first:
            return "charades"
    if isinstance(data, list) and data and isinstance(data[0], dict):
        if "gt" in data[0] and "path" in data[0]:
            return "got10k"
        if "question" in data[0] and "options" in data[0]:
            return "nextgqa"
    raise ValueError("cannot detect the annotation format: pass fmt= one of " + ", ".join(FORMATS))


def _rows(fmt: str, data, lines: list[str] | None, path: Path):
    """(key, raw entry) pairs of a file; a file of the wrong shape altogether is an error."""
    if fmt == "jsonl":
        lines = lines if lines is not None else [json.dumps(data)]
        return ((n, line) for n, line in enumerate(lines, start=1) if line.strip())
    if fmt == "charades":
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a Charades/ActivityNet file is a JSON object of videos")
        return iter(data.items())
    if not isinstance(data, list):
        raise ValueError(f"{path}: a {fmt} file is a JSON list")
    return enumerate(data)


def _describe(fmt: str, key, raw) -> str:
    if fmt == "jsonl":
        return f"line {key}"
    if fmt == "charades":
        return f"video {key}"
    name = raw.get("id", raw.get("path")) if isinstance(raw, dict) else None
    return f"entry {key}" + (f" ({name})" if name is not None else "")


def load_annotations(task: str | None, path: str | Path, media_root: str | Path, *, fmt: str | None = None,
                     limit: int | None = None) -> tuple[list[Sample], int]:
    """Samples of an annotation file and the number of malformed entries skipped.

    task: "tg", "tracking", "gqa" or "mcq" (for JSONL, the default for lines without one; None
    takes the format's own task). media_root: the folder the file's video paths are relative to.
    """
    path, media_root = Path(path), Path(media_root)
    data, lines = _read(path)
    fmt = fmt or detect_format(data, lines)
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r} (expected one of {FORMATS})")
    if task is not None and task not in FORMAT_TASKS[fmt]:
        raise ValueError(f"format {fmt!r} holds {'/'.join(FORMAT_TASKS[fmt])} samples, not {task!r}")
    if task is None and fmt != "jsonl":
        task = FORMAT_TASKS[fmt][0]
    samples, skipped, seen = [], 0, set()
    for key, raw in _rows(fmt, data, lines, path):
        if limit is not None and len(samples) >= limit:
            break
        try:
            built = PARSERS[fmt](key, raw, task, media_root, path.stem)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            skipped += _skip(path, _describe(fmt, key, raw), e)
            continue
        for sample in built[:None if limit is None else limit - len(samples)]:
            try:
                validate(sample)
                if sample.uid in seen:
                    raise ValueError(f"duplicate uid {sample.uid!r}")
            except ValueError as e:
                skipped += _skip(path, f"sample {sample.uid}", e)
                continue
            seen.add(sample.uid)
            samples.append(sample)
    return samples, skipped


def _skip(path: Path, what: str, error: Exception) -> int:
    reason = f"missing key {error}" if isinstance(error, KeyError) else str(error)
    logger.warning("%s: skipping %s: %s", path, what, reason)
    return 1
