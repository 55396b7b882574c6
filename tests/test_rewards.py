"""Rewards against docs/paper.md §4, with hand-computed values and the edge cases that broke other parsers."""
import math
import re

import pytest

from vcr1.rewards import intervals_iou, merge_intervals, parse_glue, total_reward
from vcr1.tasks import get_task
from vcr1.tasks.temporal_grounding import iou_reward as tg_iou
from vcr1.tasks.tracking import iou_reward as tracking_iou
from vcr1.tasks.video_qa import accuracy as gqa_accuracy
from vcr1.tasks.video_qa import glue_iou

BOX = [0.0, 0.0, 0.5, 0.5]
GT_BOXES = [BOX] * 8
SHIFTED = [0.25, 0.0, 0.75, 0.5]  # IoU with BOX: 0.125 / (0.25 + 0.25 - 0.125) = 1/3
# Well-formed examples of each task, for the calls below that test one part of a task's rules.
SOLUTIONS = {"tg": {"span": [1, 2]}, "tracking": {"boxes": GT_BOXES},
             "gqa": {"answer": "(A)", "glue": [[1, 2]]}, "mcq": {"answer": "(A)"}}
SEVEN_OPTIONS = [f"({c}) option" for c in "ABCDEFG"]
FIELDS = {"tg": {"event": "a shape appears"}, "tracking": {"object": "red circle", "start": BOX},
          "gqa": {"question": "q?", "options": SEVEN_OPTIONS}, "mcq": {"question": "q?", "options": SEVEN_OPTIONS}}


def score(task, completion, solution, think=True):
    return get_task(task).rewards(completion, solution, think)


def format_reward(task, completion, think=True):
    return score(get_task(task).name, completion, SOLUTIONS[task], think)["format"]


def validate_solution(task, solution, options=None):
    fields = FIELDS[get_task(task).name]
    get_task(task).check({**fields, "options": options} if options and "options" in fields else fields, solution)


def think(answer, glue=None):
    return f"<think>reasoning</think><answer>{answer}</answer>" + (f"<glue>{glue}</glue>" if glue else "")


# ------------------------------------------------------------------ format

@pytest.mark.parametrize("completion, expected", [
    ("<think>a</think><answer>1 to 2</answer>", 1.0),
    ("  \n<think>a\nb</think>\n\n <answer>\n1 to 2\n</answer>\n ", 1.0),  # DOTALL, \s*, stripped
    ("<answer>1 to 2</answer>", 0.0),                                     # think required
    ("<think>a</think>text<answer>1 to 2</answer>", 0.0),                 # only whitespace between
    ("<think>a</think><answer>1 to 2</answer> trailing", 0.0),            # full match
    ("<think>a</think><answer>1 to 2", 0.0),
    ("<think>a</think><answer></answer>", 1.0),                           # format says nothing of content
])
def test_format_tg_think(completion, expected):
    assert format_reward("tg", completion) == expected
    assert format_reward("mcq", completion) == expected


def test_format_no_think():
    assert format_reward("tg", " <answer>1 to 2</answer>\n", think=False) == 1.0
    assert format_reward("tg", "<think>a</think><answer>1 to 2</answer>", think=False) == 0.0
    assert format_reward("mcq", "<answer>B</answer>", think=False) == 1.0
    assert format_reward("gqa", "<answer>B</answer> <glue>[(1, 2)]</glue>", think=False) == 1.0
    assert format_reward("tracking", f"<answer>{GT_BOXES}</answer>", think=False) == 1.0


def test_format_tracking_needs_valid_list():
    assert format_reward("tracking", think(GT_BOXES)) == 1.0
    assert format_reward("tracking", think(GT_BOXES[:7])) == 0.0
    assert format_reward("tracking", think([["a", "b", "c", "d"]] * 8)) == 0.0


def test_format_gqa_needs_valid_glue():
    assert format_reward("gqa", think("C", "[(1.5, 3)]")) == 1.0
    assert format_reward("gqa", think("C", "[]")) == 1.0
    assert format_reward("gqa", think("C", "[(3, 1)]")) == 0.0   # start > end
    assert format_reward("gqa", think("C", "1.5 to 3")) == 0.0
    assert format_reward("gqa", think("C")) == 0.0                # glue missing


def test_unknown_task():
    with pytest.raises(ValueError):
        format_reward("vqa", "<answer>A</answer>")
    with pytest.raises(ValueError):
        score("vqa", "<answer>A</answer>", {"answer": "(A)"})


# ------------------------------------------------------------------ temporal grounding

@pytest.mark.parametrize("completion, expected", [
    ("<answer>12.5 to 17.5</answer>", 2.5 / 7.5),
    ("<answer>10 to 15</answer>", 1.0),
    ("<answer>between 10.00 and 15.00</answer>", 1.0),
    ("<answer>10 TO 15</answer>", 1.0),                                     # case-insensitive
    ("<answer>10 And 15</answer>", 1.0),
    # LAST block, and the LAST match in it
    ("<answer>10 to 15</answer> no <answer>0 to 5, rather 12.5 to 17.5</answer>", 2.5 / 7.5),
    ("<think>10 to 15</think><answer>see above</answer>", 0.0),             # only the answer block counts
    ("<answer>15 to 10</answer>", 0.0),                                     # start > end (vcr1 fix)
    ("<answer>12 to 12</answer>", 0.0),                                     # zero-length prediction
    ("<answer>0 to 2</answer>", 0.0),                                       # disjoint: clipped, not negative
    ("<answer>10-15</answer>", 0.0),
    ("<answer>10s to 15s</answer>", 0.0),                                   # units break the pattern
    ("<answer>10  to 15</answer>", 0.0),                                    # exactly one space
    ("10 to 15", 0.0),                                                      # no answer block
    ("<answer>" + "9" * 400 + " to " + "9" * 401 + "</answer>", 0.0),       # overflows to inf, no nan
])
def test_tg_iou(completion, expected):
    assert tg_iou(completion, [10, 15]) == pytest.approx(expected)


def test_tg_union_zero_is_zero():
    # ground truth and prediction are the same instant: union 0 (the released code divided by zero)
    assert tg_iou("<answer>5 to 5</answer>", [5, 5]) == 0.0
    assert tg_iou("<answer>4 to 6</answer>", [5, 5]) == 0.0


# ------------------------------------------------------------------ tracking

def test_tracking_iou_values():
    assert tracking_iou(think(GT_BOXES), GT_BOXES) == pytest.approx(1.0)
    half = [BOX] * 4 + [SHIFTED] * 4
    assert tracking_iou(think(half), GT_BOXES) == pytest.approx((4 + 4 / 3) / 8)


def test_tracking_newlines_and_first_block():
    # a newline before indented text would make literal_eval raise IndentationError: removed first
    completion = "<answer>\n  [\n" + ",\n".join(map(str, GT_BOXES)) + "\n]\n</answer>"
    assert tracking_iou(completion, GT_BOXES) == pytest.approx(1.0)
    assert tracking_iou(think([SHIFTED] * 8) + f"<answer>{GT_BOXES}</answer>", GT_BOXES) == pytest.approx(1 / 3)


@pytest.mark.parametrize("answer", [
    str(GT_BOXES[:7]), str(GT_BOXES + [BOX]), str([[0, 0, 0.5]] * 8), str([tuple(BOX)] * 8),
    str([["0", "0", "0.5", "0.5"]] * 8), str([[None, 0, 0.5, 0.5]] * 8), str([[True, 0, 1, 1]] * 8),
    "[[x0, y0, x1, y1]] * 8", "None", "{'a': 1}", "", "[" * 5000 + "]" * 5000,
    str([[0, 0, "1e999", 1]] * 8).replace("'", ""),                         # inf coordinates
])
def test_tracking_bad_answers_score_zero(answer):
    assert tracking_iou(think(answer), GT_BOXES) == 0.0
    assert format_reward("tracking", think(answer)) == 0.0


def test_tracking_degenerate_boxes():
    point = [0.5, 0.5, 0.5, 0.5]
    assert tracking_iou(think([point] * 8), [point] * 8) == 0.0              # union 0 -> 0
    inverted = [0.5, 0.0, 0.2, 0.5]                                          # x1 < x0: never negative
    assert tracking_iou(think([inverted] * 8), GT_BOXES) == 0.0


# ------------------------------------------------------------------ grounded QA: answer

@pytest.mark.parametrize("answer, expected", [
    ("C", 1.0), ("(C) lay on floor", 1.0), ("The answer is C", 1.0), ("The best answer is C.", 1.0),
    ("The correct option is (C)", 1.0),
    ("Best answer: C", 1.0),   # the released glued phrase list kept "Best answer:" and read "B"
    ("Best option: C", 1.0),
    ("c", 0.0), ("B", 0.0), ("A cat, so C", 0.0),                             # first capital A-G wins
    ("the baby lays down on the floor near the end of the video", 0.0),     # > 10 words, no capital
    ("i think that the right option here is clearly option C for sure", 1.0),
    ("", 0.0), ("  ", 0.0),                                                  # empty answers never pay
])
def test_gqa_accuracy(answer, expected):
    assert gqa_accuracy(think(answer), "(C)") == expected


def test_gqa_accuracy_first_block_and_missing():
    assert gqa_accuracy("<answer>A</answer><answer>C</answer>", "(C)") == 0.0
    assert gqa_accuracy("C", "(C)") == 0.0
    assert gqa_accuracy("<answer>\nC\n</answer>", "(C)") == 1.0


# ------------------------------------------------------------------ grounded QA: glue

@pytest.mark.parametrize("glue, gt, expected", [
    ("[(1, 3)]", [[2, 4]], 1 / 3),
    ("[(1, 3),]", [[2, 4]], 1 / 3),                    # trailing comma allowed
    ("[(1,3),(5.5, 7)]", [[2, 4]], 1 / 4.5),           # len 2 + 1.5, gt 2, inter 1
    ("[(0, 2), (4, 6)]", [[1, 5]], 2 / 6),
    ("[(0, 2), (1, 3)]", [[2, 5], [4, 6]], 1 / 6),     # both sides merged; unmerged would give 1/8
    ("[(0, 1), (1, 2)]", [[0, 2]], 1.0),               # touching intervals merge
    ("[(2, 2)]", [[2, 2]], 1.0),
    ("[]", [[1, 2]], 0.0),
    ("[(3, 1)]", [[0, 5]], 0.0),                       # start > end: invalid
    ("[ (1, 3)]", [[1, 3]], 0.0),                      # the regex allows no space after "["
    ("[(-1, 3)]", [[0, 3]], 0.0),
    ("[[1, 3]]", [[1, 3]], 0.0),                       # lists, not tuples
    ("[(1, 2, 3)]", [[1, 3]], 0.0),
    ("[(1, 3)(4, 5)]", [[1, 3]], 0.0),
    ("1 to 3", [[1, 3]], 0.0),
    ("[(\u0661, 3)]", [[1, 3]], 0.0),                  # matches \d, but literal_eval raises
    ("[(01, 3)]", [[1, 3]], 0.0),                      # literal_eval raises on leading zeros
    ("[(0, 1" + "0" * 400 + ".0)]", [[1, 3]], 0.0),    # inf would make the IoU nan
])
def test_glue_iou(glue, gt, expected):
    assert glue_iou(think("C", glue), gt) == pytest.approx(expected)


def test_glue_first_block_and_missing():
    assert glue_iou("<glue>[(1, 3)]</glue><glue>[(2, 4)]</glue>", [[2, 4]]) == pytest.approx(1 / 3)
    assert glue_iou(think("C"), [[2, 4]]) == 0.0
    assert parse_glue("<glue>[]</glue>") == []


def test_interval_helpers():
    assert merge_intervals([(5, 6), (0, 2), (1, 3)]) == [[0, 3], [5, 6]]
    assert intervals_iou([(0, 10)], [(2, 4), (6, 8)]) == pytest.approx(0.4)
    assert intervals_iou([], []) == 1.0                # union 0 -> 1.0 (as released)


# ------------------------------------------------------------------ score / total

def test_score_keys_and_values():
    assert score("tg", think("12.5 to 17.5"), {"span": [10, 15]}) == pytest.approx(
        {"format": 1.0, "iou": 1 / 3})
    assert score("tracking", think(GT_BOXES), {"boxes": GT_BOXES}) == pytest.approx(
        {"format": 1.0, "iou": 1.0})
    assert score("gqa", think("(C)", "[(1, 3)]"), {"answer": "(C)", "glue": [[2, 4]]}) == pytest.approx(
        {"format": 1.0, "accuracy": 1.0, "iou": 1 / 3})
    assert score("mcq", "<answer>B</answer>", {"answer": "(B)"}, think=False) == {
        "format": 1.0, "accuracy": 1.0}
    assert score("gqa", "<answer>C</answer><glue>[(2, 4)]</glue>", {"answer": "(C)", "glue": [[2, 4]]},
                 think=True) == {"format": 0.0, "accuracy": 1.0, "iou": 1.0}


@pytest.mark.parametrize("task, solution", [
    ("tg", {"span": [15, 10]}), ("tg", {"span": "10 to 15"}), ("tg", {"span": [1, math.nan]}),
    ("tg", {}), ("tg", None), ("tracking", {"boxes": GT_BOXES[:7]}),
    ("tracking", {"boxes": [["0", 0, 1, 1]] * 8}), ("gqa", {"answer": "(C)", "glue": [[3, 1]]}),
    ("gqa", {"answer": "", "glue": [[1, 3]]}), ("gqa", {"answer": "(C)"}), ("mcq", {"answer": "none"}),
    ("gqa", {"answer": "(C)", "glue": []}),    # an empty ground truth would pay IoU 1 to <glue>[]</glue>
    ("gqa", {"answer": "(C)", "glue": [[1, math.inf]]}), ("tracking", {"boxes": [[0, 0, 1, math.nan]] * 8}),
    ("tracking", {"boxes": GT_BOXES + [BOX]}), ("tg", {"span": [True, 2]}),
])
def test_malformed_solution_raises(task, solution):
    with pytest.raises(ValueError):
        score(task, think("C"), solution)
    with pytest.raises(ValueError):
        validate_solution(task, solution)


@pytest.mark.parametrize("task, solution, message", [
    ("tg", {"span": [15, 10]}, "bad tg span [15, 10]: start is after end"),
    ("tg", {"span": [1, math.nan]}, "bad tg span [1, nan]: start and end must be finite numbers"),
    ("tg", {"span": [1, 2, 3]}, "bad tg span [1, 2, 3]: want [start, end]"),
    ("tracking", {"boxes": GT_BOXES[:7]}, "want 8 boxes, got 7 boxes"),
    ("tracking", {"boxes": GT_BOXES[:2] + [[0, 0, 1]] + GT_BOXES[3:]}, "bad tracking box 2 [0, 0, 1]"),
    ("gqa", {"answer": "(C)", "glue": [[1, 2], [4, 3]]}, "bad glue span [4, 3]: start is after end"),
    ("gqa", {"answer": "(C)", "glue": []}, "want a non-empty list"),
    ("mcq", {"answer": "none"}, "bad answer 'none'"),
    ("mcq", {}, "lacks 'answer'"),
])
def test_malformed_solution_message_names_the_problem(task, solution, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_solution(task, solution)


def test_answer_letter_must_name_an_option():
    options = ["(A) a", "(B) b", "(C) c", "(D) d"]
    validate_solution("mcq", {"answer": "(D)"}, options)
    validate_solution("gqa", {"answer": "The answer is D", "glue": [[1, 2]]}, options)
    validate_solution("mcq", {"answer": "(E)"})          # in range of seven options
    for task, solution in [("mcq", {"answer": "(E)"}), ("gqa", {"answer": "(G)", "glue": [[1, 2]]})]:
        with pytest.raises(ValueError, match="out of range for 4 options"):
            validate_solution(task, solution, options)
    validate_solution("tg", {"span": [1, 2]}, options)   # options matter to lettered answers only


NASTY = ["", "<answer>", "</answer><answer>", "<answer></answer>", "<think></think><answer></answer><glue></glue>",
         "<answer>" + "[" * 10000 + "</answer>", "<glue>[(1e309, 2)]</glue>", "<answer>\x00\ud800</answer>",
         "<answer>1 to 2 to 3 and 4</answer><glue>[(,)]</glue>", "<answer>__import__('os')</answer>"]


@pytest.mark.parametrize("completion", NASTY)
@pytest.mark.parametrize("think_mode", [True, False])
def test_bad_completions_never_raise(completion, think_mode):
    solutions = {"tg": {"span": [1, 2]}, "tracking": {"boxes": GT_BOXES},
                 "gqa": {"answer": "(A)", "glue": [[1, 2]]}, "mcq": {"answer": "(A)"}}
    for task, solution in solutions.items():
        components = score(task, completion, solution, think=think_mode)
        assert all(0.0 <= v <= 1.0 for v in components.values()), (task, components)
        if "accuracy" in components:
            assert components["accuracy"] == 0.0


def test_total_reward():
    assert total_reward({"format": 1.0, "iou": 0.5}) == 1.5
    assert total_reward({"format": 1.0, "accuracy": 1.0, "iou": 0.25}, {"iou": 2.0, "format": 0.5}) == 2.0
