"""Evaluation metrics (docs/paper.md §5): hand-computed small cases, then the real annotation files with
synthetic predictions, aggregated over every item."""
import json
import random

import pytest

from vcr1.eval import score_predictions
from vcr1.metrics import blind_span_baseline
from vcr1.rewards import temporal_iou
from vcr1.tasks import blind_answers, get_task
from vcr1.tasks.tracking import blind_ao as blind_tracking_ao

BOX = [0.0, 0.0, 0.5, 0.5]
IOU_THIRD = [0.25, 0.0, 0.75, 0.5]   # IoU with BOX 1/3
IOU_06 = [0.0, 0.0, 0.5, 0.3]        # 0.15 / 0.25 = 0.6
IOU_HALF = [0.0, 0.0, 0.5, 0.25]     # exactly 0.5


def aggregate(task, items):
    return get_task(task).aggregate(items)


def score_item(task, completion, solution):
    return get_task(task).score(completion, solution)


def run(task, pairs):
    return aggregate(task, [score_item(task, completion, solution) for completion, solution in pairs])


def test_tg_hand_computed():
    gt = {"span": [10, 15]}
    metrics = run("tg", [
        ("<answer>10 to 15</answer>", gt),                                    # 1
        ("<think>first 0 to 5</think><answer>12.5 to 17.5</answer>", gt),      # last match: 1/3
        ("<think>it is 10 to 15</think><answer>unsure</answer>", gt),          # anywhere in the output: 1
        ("no idea", gt),                                                       # unparseable: 0
        ("<answer>20 to 25</answer>", gt),                                     # clipped at 0, not -1/3
    ])
    assert metrics == pytest.approx({"mIoU": 100 * (7 / 3) / 5, "R@0.3": 60.0, "R@0.5": 40.0,
                                     "R@0.7": 40.0, "unparseable": 1, "n": 5})


def test_tg_thresholds_inclusive():
    metrics = run("tg", [("<answer>10 to 20</answer>", {"span": [10, 15]})])   # IoU exactly 0.5
    assert (metrics["R@0.5"], metrics["R@0.7"]) == (100.0, 0.0)


def test_tracking_hand_computed():
    gt = {"boxes": [BOX] * 8}
    metrics = run("tracking", [
        (f"<answer>{[BOX] * 8}</answer>", gt),                               # frames 1 x8, seq 1
        (f"<answer>{[BOX] * 4 + [IOU_THIRD] * 4}</answer>", gt),             # 1 x4, 1/3 x4, seq 2/3
        (f"<answer>{[IOU_THIRD] * 4 + [IOU_06] * 4}</answer>", gt),          # 1/3 x4, 0.6 x4, seq 7/15
        ("<answer>[[0, 0, 1, 1]]</answer>", gt),                              # unparseable: 0 x8
    ])
    assert metrics == pytest.approx({
        "AO": 100 * (1 + 2 / 3 + 7 / 15) / 4, "R@0.5": 50.0, "R@0.7": 25.0,
        "SR@0.5": 100 * 16 / 32, "SR@0.75": 100 * 12 / 32, "unparseable": 1, "n": 4})


def test_tracking_recall_inclusive_success_strict():
    # R@t counts sequences with mean IoU >= t; GOT-10k's success rate counts frames with IoU > t
    metrics = run("tracking", [(f"<answer>{[IOU_HALF] * 8}</answer>", {"boxes": [BOX] * 8})])
    assert (metrics["AO"], metrics["R@0.5"], metrics["SR@0.5"]) == (50.0, 100.0, 0.0)


def test_gqa_hand_computed():
    gt = {"answer": "(C)", "glue": [[2, 4]]}
    metrics = run("gqa", [
        ("<answer>C</answer><glue>[(2, 4)]</glue>", gt),       # acc 1, IoU 1
        ("<answer>B</answer><glue>[(1, 3)]</glue>", gt),       # acc 0, IoU 1/3
        ("<answer>C</answer>", gt),                             # acc 1, no glue: unparseable
        ("nothing", gt),                                        # unparseable
    ])
    assert metrics == pytest.approx({"acc": 50.0, "mIoU": 100 * (4 / 3) / 4, "unparseable": 2, "n": 4})


def test_mcq_hand_computed():
    gt = {"answer": "(B)"}
    metrics = run("mcq", [("<answer>(B)</answer>", gt), ("<answer>A</answer>", gt), ("<answer></answer>", gt)])
    assert metrics == pytest.approx({"acc": 100 / 3, "unparseable": 1, "n": 3})


def test_errors():
    with pytest.raises(ValueError):
        aggregate("tg", [])
    with pytest.raises(ValueError):
        score_item("tg", "<answer>1 to 2</answer>", {"span": [2, 1]})
    with pytest.raises(ValueError):
        score_item("vqa", "<answer>A</answer>", {"answer": "(A)"})


def test_score_predictions_skips_malformed_lines(tmp_path):
    good = [{"completion": "<answer>10 to 15</answer>", "solution": {"span": [10, 15]}},
            {"completion": "<answer>12.5 to 17.5</answer>", "solution": {"span": [10, 15]}}]
    lines = [json.dumps(good[0]), "not json", json.dumps({"completion": 5, "solution": {"span": [1, 2]}}),
             json.dumps({"completion": "x", "solution": {"span": [5, 1]}}), "[]", "", json.dumps(good[1])]
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    metrics = score_predictions("tg", path)
    assert metrics == pytest.approx({"mIoU": 100 * (4 / 3) / 2, "R@0.3": 100.0, "R@0.5": 50.0, "R@0.7": 50.0,
                                     "unparseable": 0, "n": 2, "malformed": 4})


# ------------------------------------------------------------------ real annotation files

def load(shared_data, name):
    return json.loads((shared_data / "annotations" / name).read_text(encoding="utf-8"))


def test_charades_real(shared_data):
    spans = [ts for ann in load(shared_data, "charades_sta_test.json").values() for ts in ann["timestamps"]]
    assert len(spans) == 3720
    exact = run("tg", [(f"<think>.</think><answer>{s} to {e}</answer>", {"span": [s, e]}) for s, e in spans])
    assert exact == {"mIoU": 100.0, "R@0.3": 100.0, "R@0.5": 100.0, "R@0.7": 100.0, "unparseable": 0, "n": 3720}
    # shifted by half the span: IoU (len/2) / (1.5 len) = 1/3 for every query
    shifted = run("tg", [(f"<answer>{s + (e - s) / 2} to {e + (e - s) / 2}</answer>", {"span": [s, e]})
                         for s, e in spans])
    assert shifted["mIoU"] == pytest.approx(100 / 3)
    assert (shifted["R@0.3"], shifted["R@0.5"]) == (100.0, 0.0)
    # every other query unanswered: all items count, not just the last one
    half = run("tg", [(f"<answer>{s} to {e}</answer>" if i % 2 == 0 else "", {"span": [s, e]})
                      for i, (s, e) in enumerate(spans)])
    assert (half["mIoU"], half["R@0.7"], half["unparseable"]) == (50.0, 50.0, 1860)


def test_got10k_real(shared_data):
    seqs = load(shared_data, "got10k_val_8frames.json")
    assert len(seqs) == 180
    exact = run("tracking", [(f"<answer>{s['gt']}</answer>", {"boxes": s["gt"]}) for s in seqs])
    assert exact == pytest.approx({"AO": 100.0, "R@0.5": 100.0, "R@0.7": 100.0, "SR@0.5": 100.0,
                                   "SR@0.75": 100.0, "unparseable": 0, "n": 180})
    third = run("tracking", [(f"<answer>{s['gt']}</answer>" if i % 3 == 0 else "", {"boxes": s["gt"]})
                             for i, s in enumerate(seqs)])
    assert third == pytest.approx({"AO": 100 / 3, "R@0.5": 100 / 3, "R@0.7": 100 / 3, "SR@0.5": 100 / 3,
                                   "SR@0.75": 100 / 3, "unparseable": 120, "n": 180})


def test_nextgqa_real(shared_data, tmp_path):
    items = load(shared_data, "nextgqa_test.json")
    assert len(items) == 5553

    def line(item, letter):
        # 69 ground-truth spans start below 0 (-0.1, -0.0, ...), which the glue regex cannot express:
        # the prediction starts them at 0.0 instead
        glue = [(max(0.0, s), e) for s, e in item["glue"]]
        return json.dumps({"completion": f"<think>.</think><answer>{letter}</answer><glue>{glue}</glue>",
                           "solution": {"answer": item["answer"], "glue": item["glue"]}})

    def expected_iou(glue):
        if all(s >= 0 for s, _ in glue):
            return 1.0
        assert all(e1 < s2 for (_, e1), (s2, _) in zip(glue, glue[1:]))  # disjoint: lengths add up
        return sum(e - max(0.0, s) for s, e in glue) / sum(e - s for s, e in glue)  # prediction inside gt

    assert sum(expected_iou(it["glue"]) < 1 for it in items) == 36  # the other 33 start at -0.0
    path = tmp_path / "gqa.jsonl"
    path.write_text("".join(line(it, it["answer"]) + "\n" for it in items), encoding="utf-8")
    assert score_predictions("gqa", path) == pytest.approx(
        {"acc": 100.0, "mIoU": 100 * sum(expected_iou(it["glue"]) for it in items) / 5553,
         "unparseable": 0, "n": 5553, "malformed": 0})
    # a wrong letter on every item: accuracy 0, glue still perfect
    wrong = {"(A)": "B", "(B)": "C", "(C)": "D", "(D)": "E", "(E)": "A"}
    path.write_text("".join(line(it, wrong[it["answer"]]) + "\n" for it in items), encoding="utf-8")
    assert score_predictions("gqa", path)["acc"] == 0.0
    assert score_predictions("mcq", path) == pytest.approx({"acc": 0.0, "unparseable": 0, "n": 5553, "malformed": 0})


def test_blind_span_baseline_fits_on_train_and_scores_test():
    # Every training span is the second half of its video: the fit is [0.5, 1.0]; it scores 100 on the same
    # layout and 0 on videos whose span is the first 40%.
    train = [(d, [[d / 2, d]]) for d in (6.0, 9.0, 14.0)]
    assert blind_span_baseline(train, train) == {"start": 0.5, "end": 1.0, "mIoU": 100.0}
    assert blind_span_baseline(train, [(10.0, [[0.0, 4.0]])])["mIoU"] == 0.0
    with pytest.raises(ValueError):
        blind_span_baseline([], train)


def test_blind_span_baseline_is_the_best_constant_answer():
    rng = random.Random(0)
    items = []
    for _ in range(40):
        d = rng.uniform(5, 20)
        s = rng.uniform(0, d - 1)
        items.append((d, [[s, rng.uniform(s + 0.5, d)]]))
    train, test = items[:25], items[25:]
    got = blind_span_baseline(train, test, grid=10)

    def miou(a, b, part):  # independent: tg's temporal IoU, one span per item
        return 100 * sum(temporal_iou([a * d, b * d], spans[0]) for d, spans in part) / len(part)

    lattice = [(i / 10, j / 10) for i in range(10) for j in range(i + 1, 11)]
    assert miou(got["start"], got["end"], train) == pytest.approx(max(miou(a, b, train) for a, b in lattice))
    assert got["mIoU"] == pytest.approx(miou(got["start"], got["end"], test))


def test_blind_tracking_ao_repeats_the_initial_box():
    # The initial box against frames it matches, overlaps by a third and misses: per track, the mean of its
    # frames' IoUs; AO, the mean over tracks.
    tracks = [(BOX, [BOX, IOU_THIRD, [0.6, 0.6, 0.9, 0.9]]), (IOU_THIRD, [IOU_THIRD, IOU_THIRD])]
    assert blind_tracking_ao(tracks) == pytest.approx(100 * ((1 + 1 / 3 + 0) / 3 + 1) / 2)
    with pytest.raises(ValueError):
        blind_tracking_ao([])


def test_blind_answers_cover_each_task_with_samples():
    from vcr1.data.sample import Sample

    def sample(task, **kw):
        return Sample(task=task, uid="u", video="v.mp4", **kw)

    tg = [sample("tg", duration=10.0, fields={"event": "e"}, solution={"span": [5.0, 10.0]})]
    track = [sample("tracking", fields={"object": "o", "start": BOX}, solution={"boxes": [BOX, IOU_THIRD]})]
    got = blind_answers(tg + track, tg + track)
    assert got == pytest.approx({"tg mIoU": 100.0, "tracking AO": 100 * (1 + 1 / 3) / 2})
    assert blind_answers(tg, track) == {"tracking AO": got["tracking AO"]}  # tg needs train and test samples
