"""Tasks as plug-ins: the paper's four built in, a user's own named by import path.

A dataset names its task as a built-in name (`tg`, `tracking`, `gqa`, `mcq`) or as `module:Class`, a
vcr1.tasks.Task subclass in the user's own file (importable from the current directory or PYTHONPATH).
`get_task` resolves either and registers the task under its `name`, which samples, logs and tables carry.
"""
from __future__ import annotations

import importlib
import os
import sys

from vcr1.data.sample import Sample
from vcr1.tasks.base import AnnotationFormat, Task
from vcr1.tasks.temporal_grounding import TemporalGrounding
from vcr1.tasks.tracking import Tracking
from vcr1.tasks.video_qa import GroundedQA, MultipleChoiceQA

__all__ = ["AnnotationFormat", "Task", "Sample", "get_task", "task_names", "annotation_formats", "blind_answers",
           "SYNTHETIC"]

BUILTIN = (TemporalGrounding(), Tracking(), GroundedQA(), MultipleChoiceQA())  # the paper's tasks
SYNTHETIC = ("tg", "tracking", "gqa")  # the tasks the synthetic default generates, in the order of their seeds
_registry: dict[str, Task] = {task.name: task for task in BUILTIN}


def task_names() -> list[str]:
    """Names of the built-in tasks and of every plug-in resolved so far."""
    return list(_registry)


def get_task(spec: str | Task) -> Task:
    """The task named `spec` (a built-in or one resolved before), or the Task subclass (or instance) an import
    path `module:Class` names. A ValueError says what is wrong."""
    if isinstance(spec, Task):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a task is a name or module:Class, not {spec!r}")
    if spec in _registry:
        return _registry[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown task {spec!r}: one of {', '.join(_registry)}, or module:Class for your own")
    obj = getattr(_import(module_name, spec), attr, None)
    task = obj() if isinstance(obj, type) and issubclass(obj, Task) else obj
    if not isinstance(task, Task):
        raise ValueError(f"task {spec!r}: {attr} in {module_name} is not a vcr1.tasks.Task subclass")
    if not task.name or not task.name.isidentifier():
        raise ValueError(f"task {spec!r}: its `name` must be set to an identifier, got {task.name!r}")
    known = _registry.get(task.name)
    if known is not None and type(known) is not type(task):
        raise ValueError(f"task {spec!r}: the name {task.name!r} is already {type(known).__name__}'s")
    _registry.setdefault(task.name, task)
    return _registry[task.name]


def _import(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise ValueError(f"task {spec!r}: cannot import {module_name}: {e}") from None
    sys.path.append(os.getcwd())  # as `python -m` would: a task file in the directory the run starts from
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"task {spec!r}: cannot import {module_name} (from the current directory or "
                         f"PYTHONPATH): {e}") from None


def annotation_formats() -> dict[str, AnnotationFormat]:
    """Every annotation format of the known tasks, by name, in detection order."""
    formats = {}
    for task in _registry.values():
        for fmt in task.formats:
            formats.setdefault(fmt.name, fmt)
    return formats


def blind_answers(train: list[Sample], test: list[Sample]) -> dict[str, float]:
    """{"<task> <metric>": value}: what each task's blind answer (Task.blind) scores on the `test` samples,
    fitted on the `train` ones, for every task of `test`."""
    out = {}
    for name in dict.fromkeys(x.task for x in test):
        own = [x for x in train if x.task == name], [x for x in test if x.task == name]
        out.update({f"{name} {metric}": value for metric, value in get_task(name).blind(*own).items()})
    return out
