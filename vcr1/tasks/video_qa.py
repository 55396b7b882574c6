"""Video question answering on NExT-GQA: grounded (`gqa`: the option and the time spans it rests on) and plain
multiple choice (`mcq`: the option only)."""
from __future__ import annotations

from pathlib import Path

from vcr1 import metrics, rewards
from vcr1.data.sample import Sample
from vcr1.prompts import THINK, then
from vcr1.tasks.base import AnnotationFormat, Task, check_text, field_value

# The paper's prompts, verbatim (docs/paper.md §3).
_TASK = ('Answer the question: "{question}" according to the content of the video. Select the answer '
         "from :{options}.")
_ANSWER = ("Provide your answer within the <answer> </answer> tags, output the corresponding letter of "
           "the option.")
_GLUE = (" At the same time, in the <glue> </glue> tags, present the precise time period in seconds of the "
         "video clips on which you base your answer to this question in the format of "
         "[(s1, e1), (s2, e2), ...]. For example: <answer>A</answer><glue>[(5.2, 10.4)]</glue>.")
_GLUE_LAYOUT = rewards.ANSWER_LAYOUT + r"\s*<glue>.*?</glue>"


class NextGQA(AnnotationFormat):
    """NExT-GQA: `[{"id", "video": "<dir>/<id>.mp4", "question", "options", "duration", "glue", "answer"}]`,
    video `<media_root>/<video>`. Read as gqa (with the glue spans) or mcq (the answer only)."""

    name, tasks = "nextgqa", ("gqa", "mcq")

    def detect(self, data) -> bool:
        return (isinstance(data, list) and bool(data) and isinstance(data[0], dict)
                and {"question", "options"} <= data[0].keys())

    def parse(self, i, entry, task, media_root: Path, stem: str) -> list[Sample]:
        solution = {"answer": entry["answer"]}
        if task.glue:
            solution["glue"] = entry["glue"]
        check_text(entry["video"], "video")
        duration = entry.get("duration")
        return [Sample(task=task.name, uid=str(entry["id"]), video=str(media_root / entry["video"]),
                       fields={"question": entry["question"], "options": entry["options"]}, solution=solution,
                       duration=None if duration is None else float(duration))]


class VideoQA(Task):
    """fields {"question": str, "options": ["(A) ...", ...]}; solution {"answer": "(C)"}, and with `glue` also
    {"glue": [[s, e], ...]}. Rewards: format (with glue, the glue list must parse), accuracy (the option
    letter), and with glue iou (of the glue spans)."""

    formats = (NextGQA(),)
    glue = True

    def prompt(self, fields: dict, think: bool) -> str:
        text = _TASK.format(question=field_value(fields, "question"), options=str(field_value(fields, "options")))
        answer = _ANSWER + (_GLUE if self.glue else "")
        # The released no-think QA prompts are one paragraph.
        return f"{text}\n\n{THINK}\n\n{then(answer)}" if think else f"{text} {answer}"

    def check(self, fields: dict, solution) -> None:
        check_text(fields.get("question"), "question")
        options = fields.get("options")
        if not (isinstance(options, list) and options and all(isinstance(o, str) for o in options)):
            raise ValueError(f"options must be a non-empty list of strings, got {options!r}")
        rewards.check_letter(rewards.solution_value(solution, "answer"))
        if self.glue:
            rewards.check_glue(rewards.solution_value(solution, "glue"))
        rewards.check_option(solution["answer"], options)

    def rewards(self, completion: str, solution: dict, think: bool) -> dict[str, float]:
        if not self.glue:
            fmt = rewards.matches_layout(completion, rewards.ANSWER_LAYOUT, think)
            return {"format": float(fmt), "accuracy": accuracy(completion, rewards.solution_value(solution, "answer"))}
        fmt = rewards.matches_layout(completion, _GLUE_LAYOUT, think) and rewards.parse_glue(completion) is not None
        return {"format": float(fmt), "accuracy": accuracy(completion, rewards.solution_value(solution, "answer")),
                "iou": glue_iou(completion, rewards.solution_value(solution, "glue"))}

    def score(self, completion: str, solution: dict) -> dict:
        rewards.check_letter(rewards.solution_value(solution, "answer"))
        acc = accuracy(completion, solution["answer"])
        parsed = rewards.parse_letter(completion) != ""
        if not self.glue:
            return {"acc": acc, "parsed": parsed}
        # A gqa answer counts as unparseable when its letter or its glue list cannot be read.
        return {"acc": acc, "iou": glue_iou(completion, rewards.solution_value(solution, "glue")),
                "parsed": parsed and rewards.parse_glue(completion) is not None}

    def aggregate(self, items: list[dict]) -> dict:
        out = super().aggregate(items)  # acc and, with glue, iou in percent
        if self.glue:
            out = {"acc": out["acc"], "mIoU": out.pop("iou"), **{k: out[k] for k in ("unparseable", "n")}}
        return out

    def reference_answer(self, fields: dict, solution: dict, think: bool) -> str:
        letter = solution["answer"].strip("() ")
        answer = f"<answer>{letter}</answer>"
        if self.glue:
            answer += "<glue>[" + ", ".join(f"({s}, {e})" for s, e in solution["glue"]) + "]</glue>"
        return (f"<think>The answer is {letter}.</think>" if think else "") + answer

    def blind(self, train: list[Sample], test: list[Sample]) -> dict[str, float]:
        if not self.glue:
            return {}
        fit, scored = ([(x.duration, x.solution["glue"]) for x in xs if x.duration] for xs in (train, test))
        return {"mIoU": metrics.blind_span_baseline(fit, scored)["mIoU"]} if fit and scored else {}



class GroundedQA(VideoQA):
    name, headline, glue = "gqa", ("acc", "mIoU"), True

    # ---- the synthetic default's data and the tiny tokenizer's corpus
    def synthetic_item(self, rng, i: int, split: str, media: Path, size: int, fps: int):
        from vcr1.data import synthetic

        return synthetic.colour_question(rng, i, split, media, size, fps)

    def synthetic_annotations(self, items: list):
        return items

    def corpus(self, draw: dict, think: bool | None) -> str:
        """A line of the tiny tokenizer's training text: the prompt (think given) or an answer (None)."""
        if think is None:
            s, e = draw["span"]
            return f"<answer>{draw['letter']}</answer><glue>[({s}, {e})]</glue>"
        return self.prompt({"question": f"What is the {draw['object']} doing?", "options": draw["options"]}, think)


class MultipleChoiceQA(VideoQA):
    name, headline, glue = "mcq", ("acc",), False


def accuracy(completion: str, answer) -> float:
    """1.0 when the option letter of the FIRST <answer> block equals the ground truth's ("(C)" -> C)."""
    return float(rewards.parse_letter(completion) == rewards.check_letter(answer))


def glue_iou(completion: str, glue) -> float:
    """IoU of the FIRST valid <glue> interval list against the ground-truth intervals."""
    glue = rewards.check_glue(glue)
    pred = rewards.parse_glue(completion)
    return rewards.intervals_iou(pred, glue) if pred is not None else 0.0
