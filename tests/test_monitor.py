"""Monitor across a resume: each step's rows once, a torn last line dropped; a fresh run starts over."""
import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from vcr1.monitor import Monitor


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_killed_run(out):
    metrics = [{"step": s, "stage": "sft", "loss": 1 / s} for s in range(1, 6)]
    metrics.insert(4, {"step": 4, "stage": "eval", "eval/tg/mIoU": 10.0})
    torn = '{"step": 6, "stage": "s'
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics) + torn)
    (out / "samples.jsonl").write_text(json.dumps({"step": 2, "text": "a"}) + "\n"
                                       + json.dumps({"step": 4, "text": "b"}) + "\n")
    with SummaryWriter(str(out / "tensorboard")) as tb:
        for r in metrics:
            if r["stage"] == "sft":
                tb.add_scalar("sft/loss", r["loss"], r["step"])


def tensorboard_steps(out):
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(e.step, round(e.value, 3)) for e in events.Scalars("sft/loss")]


def test_resume_keeps_the_rows_up_to_the_checkpoint_then_appends(tmp_path):
    write_killed_run(tmp_path)
    monitor = Monitor(tmp_path, enabled=True, resume_step=3)
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [r["step"] for r in rows(tmp_path / "samples.jsonl")] == [2]
    monitor.log({"step": 4, "stage": "sft", "loss": 0.2})
    monitor.log_samples(4, [{"text": "c"}])
    monitor.close()
    assert [(r["step"], r["stage"]) for r in rows(tmp_path / "metrics.jsonl")] == \
        [(1, "sft"), (2, "sft"), (3, "sft"), (4, "sft")]
    assert rows(tmp_path / "samples.jsonl") == [{"step": 2, "text": "a"}, {"step": 4, "text": "c"}]
    assert not list(tmp_path.glob("*.tmp"))
    assert tensorboard_steps(tmp_path) == [(1, 1.0), (2, 0.5), (3, 0.333), (4, 0.2)]


def test_a_fresh_run_starts_over(tmp_path):
    write_killed_run(tmp_path)
    monitor = Monitor(tmp_path, enabled=True)
    monitor.log({"step": 1, "stage": "sft", "loss": 0.5})
    monitor.close()
    assert rows(tmp_path / "metrics.jsonl") == [{"step": 1, "stage": "sft", "loss": 0.5}]
    assert (tmp_path / "samples.jsonl").read_text() == ""


def test_reward_curve_marks_the_blind_answers_beside_the_held_out_bars(tmp_path):
    import numpy as np
    from matplotlib.colors import to_rgb
    from PIL import Image

    from vcr1.monitor import plot_rewards

    evals = [{"step": s, "stage": "eval", "eval/tg/mIoU": m, "eval/tracking/AO": a}
             for s, m, a in ((0, 60.0, 30.0), (4, 65.0, 32.0))]
    steps = [{"step": s, "stage": "grpo", "reward": 1.0, "reward/tg/iou": 0.5 + s / 100} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals[:1] + steps + evals[1:]))
    mark = np.array(to_rgb("C4")) * 255

    def marker_pixels(blind):
        png = tmp_path / "curve.png"
        plot_rewards(tmp_path / "metrics.jsonl", png, {"tg": ("mIoU",), "tracking": ("AO",)}, blind)
        pixels = np.asarray(Image.open(png).convert("RGB"), dtype=float)
        return int((np.abs(pixels - mark).sum(-1) < 30).sum())

    assert marker_pixels(None) == 0
    assert marker_pixels({"tg mIoU": 20.0, "tracking AO": 44.0}) > 100
