"""Annotation loading: every format becomes a list of `Sample`s of one task.

`load_annotations` detects the format from the content (or takes `fmt`), skips malformed entries with one
warning each (returning how many it skipped), and raises a clear error only when the file itself is missing,
not JSON, or of no known format. The real datasets' formats belong to their tasks (`Task.formats` in
vcr1/tasks: charades, nextgqa, got10k); the generic JSONL format below reads any task:

- "jsonl" (for new data without code): one JSON object per line,
      {"task": "<task name or module:Class>",
       "video": "relative/or/absolute.mp4" | ["frame0.jpg", ...],
       "fields": {...prompt fields...},          # or the prompt fields at top level
       "solution": {...},
       "uid": "...", "duration": s, "start": s, "end": s}     # optional
  Relative video paths are joined to media_root; a line's "task" overrides the `task` argument; uid
  defaults to "<file stem>:<line number>". What fields and solution a task takes is in its class's
  docstring (vcr1/tasks); its `check` decides whether an example is usable.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from vcr1.data.sample import Sample
from vcr1.rewards import is_number
from vcr1.tasks import Task, annotation_formats, get_task

logger = logging.getLogger(__name__)

JSONL = "jsonl"
JSONL_KEYS = {"task", "video", "fields", "solution", "uid", "duration", "start", "end"}


# ---------------------------------------------------------------- validation

def _check_seconds(x, what: str) -> None:
    if x is not None and not is_number(x):
        raise ValueError(f"{what} must be a finite number of seconds, got {x!r}")


def validate(sample: Sample) -> Sample:
    """Raise ValueError naming what is wrong with `sample`; return it unchanged when it is usable.

    The fields and solution are checked by the task's own `check`, which holds the same rules its rewards
    apply, so a sample that loads never makes a reward raise.
    """
    try:
        task = get_task(sample.task)
    except ValueError as e:
        raise ValueError(str(e)) from None
    video = sample.video
    is_path = isinstance(video, str) and video
    is_frames = isinstance(video, list) and video and all(isinstance(v, str) and v for v in video)
    if not (is_path or is_frames):
        raise ValueError(f"video must be a path or a list of frame paths, got {sample.video!r}")
    task.check(sample.fields, sample.solution)
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


# ---------------------------------------------------------------- the generic JSONL format

def _seconds(x) -> float | None:
    return None if x is None else float(x)


def _jsonl(n: int, line: str, task: Task | None, media_root: Path, stem: str) -> list[Sample]:
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("a line must be a JSON object")
    fields = dict(entry.get("fields") or {k: v for k, v in entry.items() if k not in JSONL_KEYS})
    solution = entry["solution"]
    if not isinstance(solution, dict):
        raise ValueError("solution must be an object")
    if "task" in entry:
        task = get_task(entry["task"])
    if task is None:
        raise ValueError("the line names no task and the dataset gives none")
    fields = task.complete_fields(fields, solution)
    return [Sample(task=task.name, uid=str(entry.get("uid", f"{stem}:{n}")),
                   video=_join_video(entry["video"], media_root), fields=fields, solution=solution,
                   duration=_seconds(entry.get("duration")), start=_seconds(entry.get("start")),
                   end=_seconds(entry.get("end")))]


def _join_video(video, media_root: Path):
    """Paths relative to media_root (absolute ones stay); anything else is left for validate()."""
    if isinstance(video, list):
        return [_join_video(v, media_root) for v in video]
    return str(media_root / video) if isinstance(video, str) and video else video



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
        return JSONL
    for name, fmt in annotation_formats().items():
        if fmt.detect(data):
            return name
    raise ValueError("cannot detect the annotation format: pass fmt= one of " + ", ".join(format_names()))


def format_names() -> list[str]:
    return [*annotation_formats(), JSONL]


def _rows(fmt: str, data, lines: list[str] | None, path: Path):
    """(key, raw entry) pairs of a file; a file of the wrong shape altogether is an error."""
    if fmt == JSONL:
        lines = lines if lines is not None else [json.dumps(data)]
        return ((n, line) for n, line in enumerate(lines, start=1) if line.strip())
    container = annotation_formats()[fmt].container
    if not isinstance(data, container):
        raise ValueError(f"{path}: a {fmt} file is a JSON {'object' if container is dict else 'list'}")
    return iter(data.items()) if container is dict else enumerate(data)


def load_annotations(task: str | Task | None, path: str | Path, media_root: str | Path, *, fmt: str | None = None,
                     limit: int | None = None) -> tuple[list[Sample], int]:
    """Samples of an annotation file and the number of malformed entries skipped.

    task: a task name or module:Class (vcr1.tasks.get_task); for JSONL, the default for lines without one;
    None takes the format's own first task. media_root: the folder the file's video paths are relative to.
    """
    path, media_root = Path(path), Path(media_root)
    task = None if task is None else get_task(task)
    data, lines = _read(path)
    fmt = fmt or detect_format(data, lines)
    if fmt not in format_names():
        raise ValueError(f"unknown annotation format {fmt!r} (expected one of {', '.join(format_names())})")
    reader = None if fmt == JSONL else annotation_formats()[fmt]
    if reader is not None:
        if task is not None and fmt not in {f.name for f in task.formats}:
            raise ValueError(f"format {fmt!r} holds {'/'.join(reader.tasks)} samples, not {task.name!r}")
        task = task or get_task(reader.tasks[0])
    samples, skipped, seen = [], 0, set()
    for key, raw in _rows(fmt, data, lines, path):
        if limit is not None and len(samples) >= limit:
            break
        try:
            built = (_jsonl if reader is None else reader.parse)(key, raw, task, media_root, path.stem)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            what = f"line {key}" if reader is None else reader.describe(key, raw)
            skipped += _skip(path, what, e)
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
