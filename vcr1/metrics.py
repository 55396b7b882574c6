"""Evaluation metrics of VideoChat-R1 (spec §5), in percent as in the paper.

score_item() turns one completion into raw per-item values; aggregate() reduces ALL items of a run.
(The released eval scripts reset their metric lists inside the per-item loop and so reported the last
item only.) The parsers are those of vcr1.rewards; a malformed solution raises ValueError.
"""
import json

from vcr1 import rewards
from vcr1.prompts import TASKS

# The metric each task is reported by first (the before/after table and plot); spec §5.
HEADLINE = {"tg": ("mIoU",), "tracking": ("AO",), "gqa": ("acc", "mIoU"), "mcq": ("acc",)}
TG_THRESHOLDS = (0.3, 0.5, 0.7)
TRACK_RECALL = (0.5, 0.7)       # % sequences whose mean IoU >= threshold (not in the released code)
TRACK_SUCCESS = (0.5, 0.75)     # GOT-10k success rate: % frames whose IoU > threshold (strict)


def score_item(task: str, completion: str, solution: dict) -> dict:
    """Raw values of one item: tg {iou}; tracking {frame_ious}; gqa {acc, iou}; mcq {acc}; all {parsed}."""
    rewards.validate_solution(task, solution)
    if task == "tg":
        # Eval takes the last "X to Y" anywhere in the output. The released fallback to the answer
        # block can never fire: a match inside the block is a match in the whole output.
        pred = rewards.parse_span(completion)
        return {"iou": rewards.temporal_iou(pred, solution["span"]) if pred is not None else 0.0,
                "parsed": pred is not None}
    if task == "tracking":
        pred = rewards.parse_boxes(completion)
        unread = [0.0] * rewards.TRACKING_BOXES
        ious = list(map(rewards.box_iou, pred, solution["boxes"])) if pred is not None else unread
        return {"frame_ious": ious, "parsed": pred is not None}
    acc = rewards.gqa_accuracy(completion, solution["answer"])
    parsed = rewards.parse_letter(completion) != ""
    if task == "mcq":
        return {"acc": acc, "parsed": parsed}
    # A gqa output counts as unparseable when its letter or its glue list cannot be read.
    return {"acc": acc, "iou": rewards.glue_iou(completion, solution["glue"]),
            "parsed": parsed and rewards.parse_glue(completion) is not None}


def _percent(values) -> float:
    return 100.0 * sum(values) / len(values)


def aggregate(task: str, items: list) -> dict:
    """Paper metrics (percent) over all items, plus `unparseable` and `n` (counts)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not items:
        raise ValueError("no items to aggregate")
    out = {}
    if task == "tg":
        ious = [it["iou"] for it in items]
        out["mIoU"] = _percent(ious)
        for t in TG_THRESHOLDS:
            out[f"R@{t}"] = _percent([iou >= t for iou in ious])
    elif task == "tracking":
        seq = [sum(it["frame_ious"]) / len(it["frame_ious"]) for it in items]
        frames = [iou for it in items for iou in it["frame_ious"]]
        out["AO"] = _percent(seq)
        for t in TRACK_RECALL:
            out[f"R@{t}"] = _percent([s >= t for s in seq])
        for t in TRACK_SUCCESS:
            out[f"SR@{t}"] = _percent([iou > t for iou in frames])
    else:
        out["acc"] = _percent([it["acc"] for it in items])
        if task == "gqa":
            out["mIoU"] = _percent([it["iou"] for it in items])
    out["unparseable"] = sum(not it["parsed"] for it in items)
    out["n"] = len(items)
    return out


def blind_span_baseline(train: list, test: list, grid: int = 20) -> dict:
    """mIoU (percent) on `test` of the best answer that ignores the video: the one span
    [a·duration, b·duration], a < b on a 1/grid lattice of [0, 1], that scores best on `train`.

    Items are (duration, ground-truth intervals): tg's one span or glue's list, scored by glue's IoU of
    merged intervals (for one interval, tg's temporal IoU). A model's temporal mIoU shows that it reads
    time from the video only as far as it is above this figure.
    """
    def miou(a, b, items):
        return _percent([rewards.intervals_iou([[a * d, b * d]], spans) for d, spans in items])

    if not train or not test:
        raise ValueError("blind_span_baseline needs train and test items")
    lattice = [(i / grid, j / grid) for i in range(grid) for j in range(i + 1, grid + 1)]
    a, b = max(lattice, key=lambda ab: miou(*ab, train))
    return {"start": a, "end": b, "mIoU": miou(a, b, test)}


def blind_tracking_ao(test: list) -> float:
    """AO (percent) on `test` of the answer that never looks at the video: the prompt's initial box in all the
    frames. Items are (initial box, ground-truth boxes). A model's tracking AO shows that it follows the
    object only as far as it is above this figure."""
    if not test:
        raise ValueError("blind_tracking_ao needs test items")
    return _percent([sum(rewards.box_iou(start, box) for box in boxes) / len(boxes) for start, boxes in test])


def blind_answers(train: list, test: list) -> dict[str, float]:
    """What the blind answers score on the headline metrics "tg mIoU" and "gqa mIoU" (blind_span_baseline,
    fitted on `train`; for a task with samples in both lists) and "tracking AO" (blind_tracking_ao; for
    tracking samples in `test`). Items are vcr1.data.annotations.Sample (task, duration, fields, solution)."""
    def spans(samples, task):
        return [(x.duration, [x.solution["span"]] if task == "tg" else x.solution["glue"])
                for x in samples if x.task == task and x.duration]

    out = {}
    for task in ("tg", "gqa"):
        fit, scored = spans(train, task), spans(test, task)
        if fit and scored:
            out[f"{task} mIoU"] = blind_span_baseline(fit, scored)["mIoU"]
    tracks = [(x.fields["start"], x.solution["boxes"]) for x in test if x.task == "tracking"]
    if tracks:
        out["tracking AO"] = blind_tracking_ao(tracks)
    return out


def score_predictions(task: str, path) -> dict:
    """Metrics of a JSONL file of {"completion": str, "solution": {...}} lines.

    Lines that are not such objects, or whose solution is malformed, are skipped and counted in
    `malformed`; blank lines are ignored.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    items, malformed = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("completion"), str):
                    raise ValueError("want {'completion': str, 'solution': {...}}")
                items.append(score_item(task, record["completion"], record.get("solution")))
            except ValueError:  # json.JSONDecodeError is a ValueError
                malformed += 1
    return {**aggregate(task, items), "malformed": malformed}
