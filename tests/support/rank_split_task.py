"""A task for the dynamic-sampling tests: temporal grounding whose rewards are all equal on the process of
rank 0 (so only that process's groups are dropped) and always differ within a group on the others."""
import itertools
import os

from vcr1.tasks.temporal_grounding import TemporalGrounding

_calls = itertools.count()


class RankSplitGrounding(TemporalGrounding):
    name = "tg_rank_split"

    def rewards(self, completion, solution, think):
        if os.environ.get("RANK", "0") == "0":
            return {"format": 0.0, "iou": 0.0}
        return {**super().rewards(completion, solution, think), "turn": float(next(_calls) % 2)}
