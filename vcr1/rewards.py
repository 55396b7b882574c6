"""The building blocks of VideoChat-R1's rule-based rewards (docs/paper.md §4), shared by the tasks in
vcr1/tasks: answer parsers, IoUs, checks of ground-truth values, and the tag layout of the format reward.

A completion that cannot be parsed gives None (a parser) or 0 (a reward) and never raises; a malformed
*solution* raises ValueError naming what is wrong. The same checks run when annotations load (each task's
`check`), so a sample that loaded never makes a reward raise.
"""
import ast
import math
import re
from functools import cache

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
ANSWER_LAYOUT = r"<answer>.*?</answer>"


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


def parse_glue(completion: str):
    """The [(s, e), ...] list in the FIRST <glue> block when valid (the released regex, s <= e), else None."""
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


# ---------------------------------------------------------------- ground-truth checks
# What a usable solution value is: the tasks' rewards and metrics check it on every call, and their
# `check` once per sample when annotations load.

def check_span(span, what: str = "span"):
    if not (isinstance(span, (list, tuple)) and len(span) == 2):
        raise ValueError(f"bad {what} {span!r}: want [start, end]")
    if not all(map(is_number, span)):
        raise ValueError(f"bad {what} {span!r}: start and end must be finite numbers")
    if span[0] > span[1]:
        raise ValueError(f"bad {what} {span!r}: start is after end")
    return span


def check_letter(answer):
    letter = answer_letter(answer) if isinstance(answer, str) else ""
    if not letter:  # an empty ground truth would reward an empty <answer></answer>
        raise ValueError(f"bad answer {answer!r}: want an option such as '(C)'")
    return letter


def check_glue(glue):
    # An empty ground truth would pay a full IoU to an empty <glue>[]</glue>.
    if not (isinstance(glue, (list, tuple)) and glue):
        raise ValueError(f"bad glue {glue!r}: want a non-empty list [[start, end], ...]")
    for span in glue:
        check_span(span, "glue span")
    return glue


def check_option(answer, options) -> None:
    """An answer letter past the last option could never be matched: the sample can teach nothing."""
    letter = check_letter(answer)
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


# ---------------------------------------------------------------- format and total

@cache
def _layout(body: str, think: bool) -> re.Pattern:
    return re.compile((_THINK if think else "") + body, re.DOTALL)


def matches_layout(completion: str, body: str, think: bool) -> bool:
    """Whether the stripped completion is exactly `<think>...</think>` (when think) then `body`, a regex of the
    answer's tags (ANSWER_LAYOUT, or that with a <glue> block after it): the format reward's rule."""
    return _layout(body, bool(think)).fullmatch(completion.strip()) is not None


def solution_value(solution, key):
    """solution[key], or a ValueError naming what is missing."""
    if not isinstance(solution, dict) or key not in solution:
        raise ValueError(f"solution {solution!r} lacks {key!r}")
    return solution[key]


def total_reward(components: dict, weights: dict | None = None) -> float:
    """Sum of the components; weights (by component name, default 1) are optional - the paper uses none."""
    weights = weights or {}
    return float(sum(value * weights.get(name, 1.0) for name, value in components.items()))
