"""What a task is to vcr1: the contract every built-in task and every user task implements.

A task owns its prompt, the check of its examples, its rewards, its evaluation metric, its reference answer
(the supervised warm-up's target), its blind baseline and the annotation formats it reads. The trainer,
the data pipeline, evaluation and logging only ever call these methods, through `vcr1.tasks.get_task`.
"""
from __future__ import annotations

from pathlib import Path

from vcr1.data.sample import Sample
from vcr1.metrics import percent


def field_value(fields: dict, key: str):
    """fields[key], or a ValueError naming the missing prompt field."""
    if key not in fields:
        raise ValueError(f"prompt fields {sorted(fields)} lack {key!r}")
    return fields[key]


def check_text(x, what: str) -> None:
    if not isinstance(x, str) or not x.strip():
        raise ValueError(f"{what} must be a non-empty string, got {x!r}")


class Task:
    """Subclass and set `name` and `headline`; implement `prompt`, `rewards` and `score`.

    name: how datasets, logs (`reward/<name>/<component>`, `eval/<name>/<metric>`) and tables call it.
    headline: the metrics the before/after table shows, the first one foremost.
    formats: AnnotationFormats of the real files this task reads (the generic JSONL format reads any task).
    """

    name: str = ""
    headline: tuple[str, ...] = ()
    formats: tuple[AnnotationFormat, ...] = ()

    def prompt(self, fields: dict, think: bool) -> str:
        """The user turn's text (the video follows it)."""
        raise NotImplementedError

    def complete_fields(self, fields: dict, solution) -> dict:
        """The prompt fields with defaults filled in from the solution (for a JSONL line that omits some)."""
        return fields

    def check(self, fields: dict, solution) -> None:
        """Raise ValueError naming what is wrong when an example cannot be prompted or rewarded. An example
        that passes never makes `rewards` or `score` raise."""

    def rewards(self, completion: str, solution: dict, think: bool) -> dict[str, float]:
        """Reward components of one completion, each in [0, 1]; summed (with grpo.reward_weights) into the
        GRPO reward. A completion that cannot be read scores 0, never raises."""
        raise NotImplementedError

    def score(self, completion: str, solution: dict) -> dict:
        """Raw evaluation values of one answer; `parsed`: whether it could be read at all."""
        raise NotImplementedError

    def aggregate(self, items: list[dict]) -> dict:
        """Metrics over all scored items. Default: each numeric value's mean in percent, plus `unparseable`
        and `n` (counts)."""
        if not items:
            raise ValueError("no items to aggregate")
        keys = [k for k, v in items[0].items() if k != "parsed" and isinstance(v, (int, float))]
        out = {k: percent(it[k] for it in items) for k in keys}
        return {**out, "unparseable": sum(not it["parsed"] for it in items), "n": len(items)}

    def reference_answer(self, fields: dict, solution: dict, think: bool) -> str:
        """The ground truth written as a perfect completion (the supervised warm-up's target)."""
        raise NotImplementedError(f"task {self.name!r} has no reference answer, so it cannot be warmed up (sft)")

    def blind(self, train: list[Sample], test: list[Sample]) -> dict[str, float]:
        """{metric: value} that an answer ignoring the video scores on `test` (fitted on `train` where it
        needs fitting); the before/after table prints it beside the model's figure. Default: none."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class AnnotationFormat:
    """A JSON annotation file layout (the real datasets'), read into Samples of a task that lists it in its
    `formats`; `tasks` names the built-in ones (the first is the default of a file loaded without a task).

    container: dict (entries keyed by an id) or list. `parse` raises KeyError/TypeError/ValueError/IndexError
    on a malformed entry, which the loader then skips and counts.
    """

    name: str = ""
    tasks: tuple[str, ...] = ()
    container: type = list

    def detect(self, data) -> bool:
        """Whether parsed JSON `data` looks like this format."""
        raise NotImplementedError

    def parse(self, key, entry, task: Task, media_root: Path, stem: str) -> list[Sample]:
        raise NotImplementedError

    def describe(self, key, entry) -> str:
        """How a warning names a skipped entry."""
        name = entry.get("id", entry.get("path")) if isinstance(entry, dict) else None
        return f"entry {key}" + (f" ({name})" if name is not None else "")
