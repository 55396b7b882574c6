"""Temporal grounding (`tg`): find the time span of a described event. Charades-STA / ActivityNet data."""
from __future__ import annotations

import re
from pathlib import Path

from vcr1 import metrics, rewards
from vcr1.data.sample import Sample
from vcr1.metrics import percent
from vcr1.prompts import DECIMALS, THINK, then
from vcr1.tasks.base import AnnotationFormat, Task, check_text, field_value

# The paper's prompt, verbatim (docs/paper.md §3).
_TASK = ('To accurately pinpoint the event "{event}" in the video, determine the precise time period '
         "of the event.")
_ANSWER = ('Provide the start and end times (in seconds, precise to two decimal places) in the format '
           '"start time to end time" within the <answer> </answer> tags. For example: "12.54 to 17.83".')
THRESHOLDS = (0.3, 0.5, 0.7)  # R@t: % of queries whose IoU >= t
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")


class Charades(AnnotationFormat):
    """Charades-STA / ActivityNet Captions: `{video_id: {"duration", "timestamps": [[s, e], ...], "sentences":
    [...]}}`, one sample per sentence; video `<media_root>/<video_id>` + the first of VIDEO_SUFFIXES that
    exists (.mp4 if none)."""

    name, tasks, container = "charades", ("tg",), dict

    def detect(self, data) -> bool:
        first = next(iter(data.values()), None) if isinstance(data, dict) else None
        return isinstance(first, dict) and "sentences" in first

    def parse(self, video_id, entry, task, media_root: Path, stem: str) -> list[Sample]:
        sentences, spans = entry["sentences"], entry["timestamps"]
        if not (isinstance(sentences, list) and isinstance(spans, list) and len(sentences) == len(spans)):
            raise ValueError("'sentences' and 'timestamps' must be lists of the same length")
        video = _video_file(media_root, video_id)
        duration = entry.get("duration")
        return [Sample(task=task.name, uid=f"{video_id}#{k}", video=video, fields={"event": sentence},
                       solution={"span": span}, duration=None if duration is None else float(duration))
                for k, (sentence, span) in enumerate(zip(sentences, spans))]

    def describe(self, key, entry) -> str:
        return f"video {key}"


def _video_file(media_root: Path, video_id: str) -> str:
    for suffix in VIDEO_SUFFIXES:
        path = media_root / f"{video_id}{suffix}"
        if path.is_file():
            return str(path)
    return str(media_root / f"{video_id}{VIDEO_SUFFIXES[0]}")


class TemporalGrounding(Task):
    """fields {"event": str}; solution {"span": [start, end]} in seconds. Rewards: format, iou."""

    name, headline, formats = "tg", ("mIoU",), (Charades(),)

    def prompt(self, fields: dict, think: bool) -> str:
        event = str(field_value(fields, "event")).strip().lower()
        if event.endswith("."):
            event = event[:-1]
        text = _TASK.format(event=event)
        return f"{text}\n\n{THINK}\n\n{then(_ANSWER)}" if think else f"{text}\n\n{_ANSWER}"

    def check(self, fields: dict, solution) -> None:
        check_text(fields.get("event"), "event")
        rewards.check_span(rewards.solution_value(solution, "span"), "tg span")

    def rewards(self, completion: str, solution: dict, think: bool) -> dict[str, float]:
        fmt = float(rewards.matches_layout(completion, rewards.ANSWER_LAYOUT, think))
        return {"format": fmt, "iou": iou_reward(completion, rewards.solution_value(solution, "span"))}

    def score(self, completion: str, solution: dict) -> dict:
        # Evaluation takes the last "X to Y" anywhere in the output. The released fallback to the answer
        # block can never fire: a match inside the block is a match in the whole output.
        span = rewards.check_span(rewards.solution_value(solution, "span"), "tg span")
        pred = rewards.parse_span(completion)
        return {"iou": rewards.temporal_iou(pred, span) if pred is not None else 0.0, "parsed": pred is not None}

    def aggregate(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("no items to aggregate")
        ious = [it["iou"] for it in items]
        out = {"mIoU": percent(ious), **{f"R@{t}": percent(iou >= t for iou in ious) for t in THRESHOLDS}}
        return {**out, "unparseable": sum(not it["parsed"] for it in items), "n": len(items)}

    def reference_answer(self, fields: dict, solution: dict, think: bool) -> str:
        s, e = (f"{v:.{DECIMALS}f}" for v in solution["span"])
        answer = f"<answer>{s} to {e}</answer>"
        return (f"<think>The event happens from {s} to {e}.</think>" if think else "") + answer

    def blind(self, train: list[Sample], test: list[Sample]) -> dict[str, float]:
        fit, scored = ([(x.duration, [x.solution["span"]]) for x in xs if x.duration] for xs in (train, test))
        return {"mIoU": metrics.blind_span_baseline(fit, scored)["mIoU"]} if fit and scored else {}

    # ---- the synthetic default's data and the tiny tokenizer's corpus
    def synthetic_item(self, rng, i: int, split: str, media: Path, size: int, fps: int):
        from vcr1.data import synthetic

        return synthetic.appearing_shape(rng, i, split, media, size, fps)

    def synthetic_annotations(self, items: list):
        return dict(items)

    def corpus(self, draw: dict, think: bool | None) -> str:
        """A line of the tiny tokenizer's training text: the prompt (think given) or an answer (None)."""
        obj, (s, e) = draw["object"], draw["span"]
        if think is None:
            return f"<think>The {obj} is seen from {s:.2f} to {e:.2f}.</think> <answer>{s:.2f} to {e:.2f}</answer>"
        return self.prompt({"event": f"The {obj} appears."}, think)


def iou_reward(completion: str, span) -> float:
    """Temporal IoU of the last "X to Y" in the LAST <answer> block against span = [start, end]."""
    span = rewards.check_span(span, "tg span")
    blocks = _ANSWER_BLOCK.findall(completion)
    pred = rewards.parse_span(blocks[-1]) if blocks else None
    return rewards.temporal_iou(pred, span) if pred is not None else 0.0

