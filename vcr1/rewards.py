"""VideoChat-R1 rewards (spec §4): format, temporal IoU, box IoU, answer accuracy and glue IoU.

Every component is a float in [0, 1]. A completion that cannot be parsed scores 0 for that component
and never raises; a malformed *solution* or an unknown task raises ValueError (the trainer counts and
skips the sample). What a well-formed solution is lives here only, in validate_solution, which the
annotation loader also applies, so a sample that loaded never makes a reward raise. The parsers are
public because evaluation (vcr1.metrics) reuses them.
"""
import ast
import math
import re

from vcr1.prompts import TASKS

TRACKING_BOXES = 8            # boxes in a tracking answer and its ground truth
OPTION_LETTERS = "ABCDEFG"    # the letters an answer can name; a prompt lists its options in this order

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GLUE = re.compile(r"<glue>(.*?)</glue>", re.DOTALL)
_SPAN = re.compile(r"(\d+\.?\d*) (to|and) (\d+\.?\d*)", re.IGNORECASE)
_GLUE_LIST = re.compile(
    r"^\[(\(\d+(\.\d+)?,\s*\d+(\.\d+)?\)(,\s*\(\d+(\.\d+)?,\s*\d+(\.\d+)?\))*(,)?|)\]$")
_LETTER = re.compile(f"[{OPTION_LETTERS}]")
# The released code wrote "Best answer:" "Best option:" without a comma, so Python glued them into
# one phrase that never matched; vcr1 removes each phrase on its own.
_ANSWER_PHRASES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option is", "The correct option is", "Best answer:", "Best option:")

_THINK = r"<think>.*?</think>\s*"
_BODY = {"tg": r"<answer>.*?</answer>", "tracking": r"<answer>.*?</answer>",
         "mcq": r"<answer>.*?</answer>", "gqa": r"<answer>.*?</answer>\s*<glue>.*?</glue>"}
_FORMATS = {(task, think): re.compile((_THINK if think else "") + body, re.DOTALL)
            for task, body in _BODY.items() for think in (True, False)}


def is_number(x) -> bool:
    """A finite int or float: bool is an int subclass but never a coordinate; inf/nan would turn an
    IoU into nan."""
    return type(x) in (int, float) and math.isfinite(x)


def is_box(box) -> bool:
    """[x0, y0, x1, y1] of finite numbers (a list or tuple)."""
    return isinstance(box, (list, tuple)) and len(box) == 4 and all(map(is_number, box))


# ---------------------------------------------------------------- parsers (completion side)

def parse_span(text: str):
    """(start, end) of the LAST "X to Y" / "X and Y" in text (case-insensitive), else None."""
    matches = _SPAN.findall(text)
    if not matches:
        return None
    start, _, end = matches[-1]
    return float(start), float(end)


def parse_boxes(completion: str):
    """The 8 × [x0, y0, x1, y1] list in the FIRST <answer> block (newlines removed), else None."""
    match = _ANSWER.search(completion)
    if match is None:
        return None
    try:  # literal_eval can raise almost anything (SyntaxError, MemoryError, RecursionError, ...)
        boxes = ast.literal_eval(match.group(1).replace("\n", ""))
    except Exception:
        return None
    if not (isinstance(boxes, list) and len(boxes) == TRACKING_BOXES):
        return None
    if not all(isinstance(b, list) and len(b) == 4 and all(map(is_number, b)) for b in boxes):
        return None
    return boxes


def parse_glue(completion: str):
    """The [(s, e), ...] list in the FIRST <glue> block when valid (spec regex, s <= e), else None."""
    match = _GLUE.search(completion)
    if match is None or not _GLUE_LIST.match(match.group(1)):
        return None
    try:  # the regex admits non-ASCII digits and 01-style literals, which literal_eval rejects
        intervals = ast.literal_eval(match.group(1))
    except Exception:
        return None
    # The regex already guarantees a list of 2-tuples of numbers; huge literals may still be inf.
    if not all(is_number(s) and is_number(e) and s <= e for s, e in intervals):
        return None
    return intervals


def answer_letter(text: str) -> str:
    """Option letter of an answer text: the answer phrases removed, the first capital A-G, or "".

    The released rule "more than 10 words and no capital A-G -> none" is implied: no capital -> none.
    """
    text = text.strip()
    for phrase in _ANSWER_PHRASES:
        text = text.replace(phrase, "")
    match = _LETTER.search(text)
    return match.group(0) if match else ""


def parse_letter(completion: str) -> str:
    """Option letter in the FIRST <answer> block, "" when there is none."""
    match = _ANSWER.search(completion)
    return answer_letter(match.group(1)) if match else ""


# ---------------------------------------------------------------- ground-truth validation
# One home for what a usable solution is: the rewards and metrics check it on every call, and the
# annotation loader (vcr1.data.annotations) checks it once per sample, so a sample that loaded never
# makes a reward raise.

def _gt_span(span, what: str = "tg span"):
    if not (isinstance(span, (list, tuple)) and len(span) == 2):
        raise ValueError(f"bad {what} {span!r}: want [start, end]")
    if not all(map(is_number, span)):
        raise ValueError(f"bad {what} {span!r}: start and end must be finite numbers")
    if span[0] > span[1]:
        raise ValueError(f"bad {what} {span!r}: start is after end")
    return span


def _gt_boxes(boxes):
    if not (isinstance(boxes, (list, tuple)) and len(boxes) == TRACKING_BOXES):
        count = f"{len(boxes)} boxes" if isinstance(boxes, (list, tuple)) else repr(boxes)
        raise ValueError(f"bad tracking boxes: want {TRACKING_BOXES} boxes, got {count}")
    for k, box in enumerate(boxes):
        if not is_box(box):
            raise ValueError(f"bad tracking box {k} {box!r}: want [x0, y0, x1, y1] of finite numbers")
    return boxes


def _gt_letter(answer):
    letter = answer_letter(answer) if isinstance(answer, str) else ""
    if not letter:  # an empty ground truth would reward an empty <answer></answer>
        raise ValueError(f"bad answer {answer!r}: want an option such as '(C)'")
    return letter


def _gt_glue(glue):
    # An empty ground truth would pay a full IoU to an empty <glue>[]</glue>.
    if not (isinstance(glue, (list, tuple)) and glue):
        raise ValueError(f"bad glue {glue!r}: want a non-empty list [[start, end], ...]")
    for span in glue:
        _gt_span(span, "glue span")
    return glue


def _gt_option(answer, options) -> None:
    """An answer letter past the last option could never be matched: the sample can teach nothing."""
    letter = _gt_letter(answer)
    if OPTION_LETTERS.index(letter) >= len(options):
        raise ValueError(f"bad answer {answer!r}: option {letter} is out of range for {len(options)} options")


# ---------------------------------------------------------------- IoUs

def temporal_iou(pred, gt) -> float:
    """IoU of two [start, end] spans; union = max end - min start. vcr1: start > end or union <= 0 -> 0."""
    (s, e), (gs, ge) = pred, gt
    union = max(e, ge) - min(s, gs)
    if s > e or union <= 0:
        return 0.0
    return max(0.0, min(e, ge) - max(s, gs)) / union


def box_iou(a, b) -> float:
    """IoU of two [x0, y0, x1, y1] boxes; a union <= 0 (degenerate boxes) gives 0."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def merge_intervals(intervals) -> list:
    """Sorted union of [start, end] intervals; overlapping or touching ones are merged."""
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def intervals_iou(pred, gt) -> float:
    """IoU of two sets of intervals, each merged first; an empty union gives 1.0 (as released)."""
    a, b = merge_intervals(pred), merge_intervals(gt)
    # Within each merged list the intervals are disjoint, so pairwise overlaps sum to the intersection.
    inter = sum(max(0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)
    union = sum(e - s for s, e in a) + sum(e - s for s, e in b) - inter
    return 1.0 if union == 0 else inter / union


# ---------------------------------------------------------------- reward components

def format_reward(task: str, completion: str, think: bool = True) -> float:
    """1.0 when the stripped completion fully matches the task's tag layout (and, for tracking and
    gqa, its first answer/glue block parses), else 0.0. No-think drops the <think> part."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not _FORMATS[task, bool(think)].fullmatch(completion.strip()):
        return 0.0
    if task == "tracking":
        return float(parse_boxes(completion) is not None)
    if task == "gqa":
        return float(parse_glue(completion) is not None)
    return 1.0


def tg_iou(completion: str, span) -> float:
    """Temporal IoU of the last "X to Y" in the LAST <answer> block against span = [start, end]."""
    span = _gt_span(span)
    blocks = _ANSWER.findall(completion)
    pred = parse_span(blocks[-1]) if blocks else None
    return temporal_iou(pred, span) if pred is not None else 0.0


def tracking_iou(completion: str, boxes) -> float:
    """Mean box IoU over the 8 frames of the FIRST <answer> block."""
    boxes = _gt_boxes(boxes)
    pred = parse_boxes(completion)
    return sum(map(box_iou, pred, boxes)) / TRACKING_BOXES if pred is not None else 0.0


def gqa_accuracy(completion: str, answer) -> float:
    """1.0 when the option letter of the FIRST <answer> block equals the ground truth's ("(C)" -> C)."""
    return float(parse_letter(completion) == _gt_letter(answer))


def glue_iou(completion: str, glue) -> float:
    """IoU of the FIRST valid <glue> interval list against the ground-truth intervals."""
    glue = _gt_glue(glue)
    pred = parse_glue(completion)
    return intervals_iou(pred, glue) if pred is not None else 0.0


def _get(solution, key):
    if not isinstance(solution, dict) or key not in solution:
        raise ValueError(f"solution {solution!r} lacks {key!r}")
    return solution[key]


_SOLUTION_CHECKS = {"tg": {"span": _gt_span}, "tracking": {"boxes": _gt_boxes},
                    "gqa": {"answer": _gt_letter, "glue": _gt_glue}, "mcq": {"answer": _gt_letter}}


def validate_solution(task: str, solution, options=None) -> None:
    """Raise ValueError naming what is wrong unless solution is well formed for task (see score).

    options: the sample's option list (gqa/mcq); given, the answer's letter must be in its range.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    for key, check in _SOLUTION_CHECKS[task].items():
        check(_get(solution, key))
    if options is not None and "answer" in _SOLUTION_CHECKS[task]:
        _gt_option(solution["answer"], options)


def score(task: str, completion: str, solution: dict, think: bool = True) -> dict:
    """Reward components of one completion: tg/tracking {format, iou}; gqa {format, accuracy, iou};
    mcq {format, accuracy}."""
    fmt = format_reward(task, completion, think)  # raises ValueError for an unknown task
    if task == "tg":
        return {"format": fmt, "iou": tg_iou(completion, _get(solution, "span"))}
    if task == "tracking":
        return {"format": fmt, "iou": tracking_iou(completion, _get(solution, "boxes"))}
    accuracy = gqa_accuracy(completion, _get(solution, "answer"))
    if task == "mcq":
        return {"format": fmt, "accuracy": accuracy}
    return {"format": fmt, "accuracy": accuracy, "iou": glue_iou(completion, _get(solution, "glue"))}


def total_reward(components: dict, weights: dict | None = None) -> float:
    """Sum of the components; weights (by component name, default 1) are optional - the paper uses none."""
    weights = weights or {}
    return float(sum(value * weights.get(name, 1.0) for name, value in components.items()))
