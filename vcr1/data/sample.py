"""The example every annotation format becomes: what a task's prompt, rewards and metric read."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sample:
    """One training or evaluation example.

    task: the name of its task (vcr1.tasks.get_task resolves it).
    video: a file path, a frame directory (GOT-10k) or a list of frame paths.
    fields: what the task's prompt fills in; solution: what its rewards and metric compare against.
    start/end: a window of the video in seconds, for formats that need clipping.
    """

    task: str
    uid: str
    video: str | list[str]
    fields: dict
    solution: dict
    duration: float | None = None
    start: float | None = None
    end: float | None = None
