"""Training data: the configured datasets (or the synthetic default), a resumable per-process stream
that decodes each video once per step and skips bad samples with a count, and reference answers for
the supervised warm-up.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from vcr1.data.annotations import load_annotations
from vcr1.data.processor import prompt_inputs
from vcr1.data.sample import Sample
from vcr1.data.video import VideoError, load_video, video_inputs
from vcr1.model import end_of_turn_id
from vcr1.prompts import build_messages
from vcr1.tasks import SYNTHETIC, get_task

log = logging.getLogger("vcr1.data")


@dataclass
class Example:
    """One prompt ready for the model: its sample and processor-like inputs (decoded once)."""
    sample: Sample
    inputs: dict


def load_split(datasets: list[dict]) -> tuple[list[Sample], int]:
    """All samples of the listed datasets, and the count of malformed annotation entries skipped."""
    samples, skipped = [], 0
    for ds in datasets:
        got, bad = load_annotations(ds["task"], ds["annotations"], ds["media_root"], fmt=ds.get("fmt"),
                                    limit=ds.get("limit"))
        samples += got
        skipped += bad
    return samples, skipped


def synthetic_datasets(root: Path, data_cfg, seed: int) -> dict[str, list[dict]]:
    """Generate (or reuse) the synthetic set and describe its splits as dataset configs."""
    from vcr1.data.synthetic import generate

    splits = generate(root, tasks=[get_task(name) for name in SYNTHETIC], seed=seed,
                      n_train=data_cfg.synthetic_train, n_test=data_cfg.synthetic_test)
    return {split: [{"task": task, "annotations": str(p["annotations"]), "media_root": str(p["media_root"])}
                    for task, p in tasks.items()] for split, tasks in splits.items()}


def reference_tokens(sample: Sample, tokenizer, think: bool) -> list[int]:
    """The reference answer as the warm-up's target tokens: its text, then the end of the assistant turn, as
    the chat template would write the turn (so the policy learns to stop where rollouts stop)."""
    text = get_task(sample.task).reference_answer(sample.fields, sample.solution, think)
    answer = tokenizer(text, add_special_tokens=False)["input_ids"]
    return answer + [end_of_turn_id(tokenizer)]


def encode_sample(sample: Sample, tokenizer, model_config, data_cfg, device, videos: dict | None = None) -> dict:
    """Prompt inputs of one sample, its video decoded with the configured settings (raises VideoError).

    `data.video.decode_device` "auto" decodes where the model runs (NVDEC on a GPU machine). `videos`
    maps a video (source, window) to its decoded inputs, so samples sharing a video (several sentences
    of one Charades clip) decode it once and share its tensors."""
    key = (str(sample.video), sample.start, sample.end)
    video = None if videos is None else videos.get(key)
    if video is None:
        v = data_cfg.video
        clip = load_video(sample.video, fps=v.fps, min_frames=v.min_frames, max_frames=v.max_frames,
                          min_pixels=v.min_pixels, max_pixels=v.max_pixels, total_pixels=v.total_pixels,
                          device=str(device) if v.decode_device == "auto" else v.decode_device,
                          start=sample.start, end=sample.end)
        video = video_inputs([clip])
        if videos is not None:
            videos[key] = video
    messages = build_messages(get_task(sample.task).prompt(sample.fields, data_cfg.think))
    return prompt_inputs(tokenizer, model_config, messages, video)


def balanced_subset(samples: list[Sample], limit: int) -> list[Sample]:
    """At most `limit` samples, taken round-robin over tasks so every task is represented."""
    by_task: dict[str, list[Sample]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    out, i = [], 0
    while len(out) < min(limit, len(samples)):
        for group in by_task.values():
            if i < len(group) and len(out) < limit:
                out.append(group[i])
        i += 1
    return out


def _interleave_by_task(order: list[int], tasks: list[str]) -> list[int]:
    """`order` regrouped so tasks take turns (each task's examples keep their shuffled order)."""
    queues: dict[str, list[int]] = {}
    for i, task in zip(order, tasks):
        queues.setdefault(task, []).append(i)
    lanes = [iter(q) for q in queues.values()]
    out = []
    while lanes:
        for lane in list(lanes):
            nxt = next(lane, None)
            if nxt is None:
                lanes.remove(lane)
            else:
                out.append(nxt)
    return out


class PromptStream:
    """This process's share of the data, in a seeded order per epoch, resumable from `state()`.

    Bad media raise VideoError at decode time: the sample is skipped, counted, and the next one taken,
    so every process always returns full batches (ZeRO collectives need every rank to step).
    """

    def __init__(self, samples: list[Sample], tokenizer, model_config, data_cfg, *, rank: int, world: int,
                 seed: int, device: str = "cpu"):
        if len(samples) < world:
            raise ValueError(f"{len(samples)} samples cannot feed {world} processes")
        self.samples, self.tokenizer, self.model_config = samples, tokenizer, model_config
        self.data_cfg, self.rank, self.world, self.seed, self.device = data_cfg, rank, world, seed, device
        self.epoch, self.cursor, self.skipped_media = 0, 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        rng = random.Random(self.seed * 1000 + (self.epoch if self.data_cfg.reshuffle else 0))
        order = list(range(len(self.samples)))
        rng.shuffle(order)
        if self.data_cfg.interleave_tasks:
            order = _interleave_by_task(order, [self.samples[i].task for i in order])
        usable = len(order) - len(order) % self.world  # equal shares: every rank steps the same number of times
        return order[self.rank:usable:self.world]

    def __len__(self) -> int:
        return len(self._order)

    def _next_sample(self) -> Sample:
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        sample = self.samples[self._order[self.cursor]]
        self.cursor += 1
        return sample

    def next_batch(self, n: int) -> list[Example]:
        """The next n decodable prompts; a video several of them use is decoded once."""
        batch, misses, videos = [], 0, {}
        while len(batch) < n:
            sample = self._next_sample()
            try:
                inputs = encode_sample(sample, self.tokenizer, self.model_config, self.data_cfg, self.device, videos)
                batch.append(Example(sample, inputs))
            except VideoError as e:
                self.skipped_media += 1
                misses += 1
                log.warning("skipping %s (%s): %s", sample.uid, sample.task, e)
                if misses > max(100, 2 * len(self._order)):
                    raise RuntimeError("no decodable video left in this process's share of the data") from e
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "skipped_media": self.skipped_media}

    def load_state(self, state: dict):
        self.epoch, self.cursor, self.skipped_media = state["epoch"], state["cursor"], state["skipped_media"]
        self._order = self._epoch_order()
