"""Object tracking (`tracking`): the boxes of an object over eight frames, from its box in the first. GOT-10k."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from vcr1 import rewards
from vcr1.data.sample import Sample
from vcr1.metrics import percent
from vcr1.prompts import DECIMALS, THINK
from vcr1.tasks.base import AnnotationFormat, Task, check_text, field_value

# The paper's prompt, verbatim (docs/paper.md §3).
_TASK = ('Track the "{object}" in the video based on its initial coordinates "{start}". The output '
         "should be a list containing eight sublists. Each sublist includes four normalized "
         "coordinates [x0, y0, x1, y1] representing the bounding box of the object at specific "
         "time intervals.")
_ANSWER = ("Provide your answer within the <answer> </answer> tags as a list of eight sublists, "
           "where each sublist contains the normalized coordinates [x0, y0, x1, y1]. For example: "
           "<answer>[[0.1, 0.5, 0.3, 0.55], [0.72, 0.25, 0.84, 0.43], ...]</answer>.")
BOXES = 8                     # boxes in an answer and in its ground truth
RECALL = (0.5, 0.7)           # R@t: % sequences whose mean IoU >= t (not in the released code)
SUCCESS = (0.5, 0.75)         # GOT-10k success rate SR@t: % frames whose IoU > t (strict)
SPLIT_FOLDERS = ("train", "val", "test")
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class Got10k(AnnotationFormat):
    """GOT-10k, 8 frames: `[{"path": "<sequence dir>", "object", "gt": [8 x [x0, y0, x1, y1]]}]`.

    The paths are absolute cluster paths, re-rooted onto media_root by `reroot`. The directory is only read
    when the video is loaded (vcr1.data.video picks its frames)."""

    name, tasks = "got10k", ("tracking",)

    def detect(self, data) -> bool:
        return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and {"gt", "path"} <= data[0].keys()

    def parse(self, i, entry, task, media_root: Path, stem: str) -> list[Sample]:
        check_text(entry["path"], "path")
        boxes = entry["gt"]
        return [Sample(task=task.name, uid=Path(entry["path"]).name, video=reroot(entry["path"], media_root),
                       fields={"object": entry["object"], "start": boxes[0]}, solution={"boxes": boxes})]


def reroot(path: str, media_root: Path) -> str:
    """Move a (cluster) sequence path under media_root: keep what follows its last split folder ("train",
    "val", "test"), or else its last component, so `/mnt/.../GOT-10k/val/GOT-10k_Val_000010` becomes
    `<media_root>/GOT-10k_Val_000010`."""
    parts = Path(path).parts
    splits = [i for i, p in enumerate(parts[:-1]) if p.lower() in SPLIT_FOLDERS]
    rel = parts[splits[-1] + 1:] if splits else parts[-1:]
    return str(media_root.joinpath(*rel))


class Tracking(Task):
    """fields {"object": str, "start": box}; solution {"boxes": 8 boxes}; boxes [x0, y0, x1, y1] normalised.
    Rewards: format (the answer must parse as 8 boxes), iou (mean box IoU over the frames)."""

    name, headline, formats = "tracking", ("AO",), (Got10k(),)

    def prompt(self, fields: dict, think: bool) -> str:
        text = _TASK.format(object=field_value(fields, "object"), start=str(field_value(fields, "start")))
        return f"{text}\n\n{THINK}\n\n{_ANSWER}" if think else f"{text}\n\n{_ANSWER}"

    def complete_fields(self, fields: dict, solution) -> dict:
        if "start" not in fields:  # the prompt's box defaults to the first ground-truth box
            return {**fields, "start": solution["boxes"][0]}
        return fields

    def check(self, fields: dict, solution) -> None:
        check_text(fields.get("object"), "object")
        if not rewards.is_box(fields.get("start")):
            raise ValueError(f"start must be [x0, y0, x1, y1] of finite numbers, got {fields.get('start')!r}")
        check_boxes(rewards.solution_value(solution, "boxes"))

    def rewards(self, completion: str, solution: dict, think: bool) -> dict[str, float]:
        fmt = rewards.matches_layout(completion, rewards.ANSWER_LAYOUT, think) and parse_boxes(completion) is not None
        return {"format": float(fmt), "iou": iou_reward(completion, rewards.solution_value(solution, "boxes"))}

    def score(self, completion: str, solution: dict) -> dict:
        truth = check_boxes(rewards.solution_value(solution, "boxes"))
        pred = parse_boxes(completion)
        ious = list(map(rewards.box_iou, pred, truth)) if pred is not None else [0.0] * BOXES
        return {"frame_ious": ious, "parsed": pred is not None}

    def aggregate(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("no items to aggregate")
        seq = [sum(it["frame_ious"]) / len(it["frame_ious"]) for it in items]
        frames = [iou for it in items for iou in it["frame_ious"]]
        out = {"AO": percent(seq), **{f"R@{t}": percent(s >= t for s in seq) for t in RECALL},
               **{f"SR@{t}": percent(iou > t for iou in frames) for t in SUCCESS}}
        return {**out, "unparseable": sum(not it["parsed"] for it in items), "n": len(items)}

    def reference_answer(self, fields: dict, solution: dict, think: bool) -> str:
        boxes = [[round(float(v), DECIMALS) for v in box] for box in solution["boxes"]]
        answer = f"<answer>{boxes}</answer>"
        return (f"<think>The {fields['object']} moves across the video.</think>" if think else "") + answer

    def blind(self, train: list[Sample], test: list[Sample]) -> dict[str, float]:
        """AO of the prompt's initial box repeated in every frame: a model follows the object only as far as
        it is above this figure."""
        tracks = [(x.fields["start"], x.solution["boxes"]) for x in test]
        return {"AO": blind_ao(tracks)} if tracks else {}

    # ---- the synthetic default's data and the tiny tokenizer's corpus
    def synthetic_item(self, rng, i: int, split: str, media: Path, size: int, fps: int):
        from vcr1.data import synthetic

        return synthetic.drifting_sequence(rng, i, split, media, size)

    def synthetic_annotations(self, items: list):
        return items

    def corpus(self, draw: dict, think: bool | None) -> str:
        """A line of the tiny tokenizer's training text: the prompt (think given) or an answer (None)."""
        if think is None:
            return f"<answer>{[draw['box']] * BOXES}</answer>"
        return self.prompt({"object": draw["object"], "start": draw["box"]}, think)


def parse_boxes(completion: str):
    """The 8 x [x0, y0, x1, y1] list in the FIRST <answer> block (newlines removed), else None."""
    match = _ANSWER_BLOCK.search(completion)
    if match is None:
        return None
    try:  # literal_eval can raise almost anything (SyntaxError, MemoryError, RecursionError, ...)
        boxes = ast.literal_eval(match.group(1).replace("\n", ""))
    except Exception:
        return None
    if not (isinstance(boxes, list) and len(boxes) == BOXES):
        return None
    if not all(isinstance(b, list) and len(b) == 4 and all(map(rewards.is_number, b)) for b in boxes):
        return None
    return boxes


def check_boxes(boxes):
    if not (isinstance(boxes, (list, tuple)) and len(boxes) == BOXES):
        count = f"{len(boxes)} boxes" if isinstance(boxes, (list, tuple)) else repr(boxes)
        raise ValueError(f"bad tracking boxes: want {BOXES} boxes, got {count}")
    for k, box in enumerate(boxes):
        if not rewards.is_box(box):
            raise ValueError(f"bad tracking box {k} {box!r}: want [x0, y0, x1, y1] of finite numbers")
    return boxes


def iou_reward(completion: str, boxes) -> float:
    """Mean box IoU over the 8 frames of the FIRST <answer> block."""
    boxes = check_boxes(boxes)
    pred = parse_boxes(completion)
    return sum(map(rewards.box_iou, pred, boxes)) / BOXES if pred is not None else 0.0


def blind_ao(tracks: list) -> float:
    """AO (percent) of the answer that repeats the initial box in every frame; tracks: (initial box, boxes)."""
    if not tracks:
        raise ValueError("blind_ao needs tracks")
    return percent(sum(rewards.box_iou(start, box) for box in boxes) / len(boxes) for start, boxes in tracks)
