"""Evaluation with the paper's metrics (spec §5): greedy answers from a checkpoint, scored over all items.

    python -m vcr1.eval --task tg --model CKPT --annotations charades_sta_test.json --media_root VIDEOS \
        --predictions preds.jsonl [--json]            # generate (resumable), then score
    python -m vcr1.eval --task tg --predictions preds.jsonl --json     # score a predictions file only

Under torchrun every process answers its share of the pending items into `preds.jsonl.rank{r}`; rank 0
then merges the shards into the predictions file and scores it. A rerun skips every uid already in the
file or in a shard, so a killed run resumes where it stopped.

`evaluate()` is the trainer's periodic held-out pass: the same generation, in memory, with the per-item
scores gathered from every process before aggregation.

torch, transformers and the video stack are imported where generation needs them, so that scoring a
file alone starts at once.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from vcr1 import metrics
from vcr1.config import ATTN_IMPLEMENTATIONS, DTYPE_NAMES, DataConfig, VideoConfig
from vcr1.data.annotations import FORMATS
from vcr1.prompts import TASKS

log = logging.getLogger("vcr1.eval")

PAPER_MAX_NEW_TOKENS = 2048


# ---------------------------------------------------------------------------------------- generation

def predict(model, tokenizer, samples, *, data_cfg: DataConfig, device, batch_size: int, max_new_tokens: int):
    """Per batch of samples: (prediction records, tasks of the samples that could not be encoded)."""
    from vcr1 import rollout
    from vcr1.data.dataset import encode_sample
    from vcr1.model import stop_ids

    stops = stop_ids(model, tokenizer)
    for i in range(0, len(samples), batch_size):
        ready, prompts, skipped = [], [], []
        for sample in samples[i:i + batch_size]:
            try:
                prompts.append(encode_sample(sample, tokenizer, model.config, data_cfg, device))
                ready.append(sample)
            except Exception as e:  # an undecodable video (VideoError) or any other bad sample: never fatal
                log.warning("skipping %s: cannot encode it: %r", sample.uid, e)
                skipped.append(sample.task)
        outs = rollout.generate(model, prompts, num_samples=1, max_new_tokens=max_new_tokens, greedy=True,
                                eos_token_id=stops) if prompts else []
        records = [{"uid": s.uid, "task": s.task, "solution": s.solution,
                    "completion": tokenizer.decode(out[0].token_ids, skip_special_tokens=True)}
                   for s, out in zip(ready, outs)]
        yield records, skipped


# --------------------------------------------------------------------------------- in-process (trainer)

def summarize(parts) -> dict:
    """{task: metrics + skipped + malformed} from every process's ({task: scored items}, Counter of the
    tasks of samples not encoded, Counter of the tasks of items not scored)."""
    items, skipped, malformed = collections.defaultdict(list), collections.Counter(), collections.Counter()
    for part_items, part_skipped, part_malformed in parts:
        for task, scored in part_items.items():
            items[task] += scored
        skipped.update(part_skipped)
        malformed.update(part_malformed)
    result = {}
    for task in sorted(set(items) | set(skipped) | set(malformed)):
        result[task] = metrics.aggregate(task, items[task]) if items[task] else {"unparseable": 0, "n": 0}
        result[task].update(skipped=skipped[task], malformed=malformed[task])
    return result


def evaluate(model, tokenizer, samples, *, cfg, rank: int = 0, world: int = 1, device="cpu",
             batch_size: int | None = None, max_new_tokens: int | None = None) -> dict:
    """{task: {metric: value}} over ALL samples; every process calls it and gets the same dict.

    Each process answers samples[rank::world] greedily with cfg.data's video and prompt settings, at most
    cfg.grpo.max_completion_length new tokens, cfg.eval_batch_size prompts per batch (default
    cfg.prompts_per_step: the prompt caches a training rollout already holds), grouped by task so that
    short answers are not batched with long ones. Samples that cannot be encoded (e.g. a video that does
    not decode) count in `skipped`, items that cannot be scored (a malformed solution) in `malformed`: a
    bad held-out item never ends training, and every process still makes the one gather below.
    """
    from vcr1.engine import all_gather_objects

    batch_size = batch_size or cfg.eval_batch_size or cfg.prompts_per_step
    max_new_tokens = max_new_tokens or cfg.grpo.max_completion_length
    items, skipped, malformed = collections.defaultdict(list), collections.Counter(), collections.Counter()
    was_training = model.training
    model.eval()
    try:
        mine = sorted(samples[rank::world], key=lambda s: s.task)  # stable: each task keeps its order
        for records, bad in predict(model, tokenizer, mine, data_cfg=cfg.data, device=device,
                                    batch_size=batch_size, max_new_tokens=max_new_tokens):
            for r in records:
                try:
                    items[r["task"]].append(metrics.score_item(r["task"], r["completion"], r["solution"]))
                except Exception as e:  # a malformed solution that bypassed load-time validation, or a bug
                    log.warning("not scoring %s: %r", r["uid"], e)
                    malformed[r["task"]] += 1
            skipped.update(bad)
    finally:
        model.train(was_training)
    return summarize(all_gather_objects((dict(items), skipped, malformed)))


# ------------------------------------------------------------------------------- predictions files

def shards(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".rank*"))


def read_records(path: Path) -> list[dict]:
    """The complete records of a predictions file; a line cut short by a killed write is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "uid" in record:
            records.append(record)
    return records


def done_uids(path: Path) -> set:
    return {r["uid"] for p in [path, *shards(path)] for r in read_records(p)}


def open_shard(path: Path):
    """Append to a rank's shard, starting a fresh line after a write that a kill cut short."""
    f = open(path, "a+", encoding="utf-8")
    if f.tell() > 0:
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":
            f.write("\n")
    return f


def merge_shards(path: Path) -> None:
    """Add the shards' records whose uid the file lacks to the predictions file (atomically), then drop them."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    seen = {r["uid"] for r in read_records(path)}
    for shard in shards(path):
        for r in read_records(shard):
            if r["uid"] not in seen:
                seen.add(r["uid"])
                text += json.dumps(r) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    for shard in shards(path):
        shard.unlink()


# --------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vcr1.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--predictions", required=True, type=Path,
                   help="JSONL of {uid, task, completion, solution}: appended to when generating, then scored")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    gen = p.add_argument_group("generation (with --annotations)")
    gen.add_argument("--annotations", type=Path, help="annotation file to answer; without it, only score")
    gen.add_argument("--media_root", type=Path, help="folder the annotation's video paths are relative to")
    gen.add_argument("--fmt", choices=FORMATS, help="default: detected")
    gen.add_argument("--limit", type=int, help="answer at most this many items of the file")
    gen.add_argument("--model", help="Hugging Face checkpoint dir; omitted: the tiny random default (smoke tests)")
    gen.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bf16, fp32 for the tiny default")
    gen.add_argument("--attn", default="sdpa", choices=ATTN_IMPLEMENTATIONS)
    gen.add_argument("--batch_size", type=int, default=8, help="prompts per generation call")
    gen.add_argument("--max_new_tokens", type=int, default=PAPER_MAX_NEW_TOKENS)
    gen.add_argument("--think", action=argparse.BooleanOptionalAction, default=True,
                     help="prompts that ask for a <think> block")
    for f in dataclasses.fields(VideoConfig):  # the paper's video settings, as training uses them
        gen.add_argument(f"--{f.name}", type=type(f.default), default=f.default, choices=f.metadata["choices"],
                         help=f.metadata["help"])
    return p


def generate_predictions(args, rank: int, world: int, device) -> dict:
    """Answer the annotation items not yet in the predictions file; returns skip counts (all processes)."""
    from vcr1.data.annotations import load_annotations
    from vcr1.engine import all_gather_objects, barrier
    from vcr1.model import load_model, load_tokenizer

    samples, bad_entries = load_annotations(args.task, args.annotations, args.media_root, fmt=args.fmt,
                                            limit=args.limit)
    done = done_uids(args.predictions)
    pending = [s for s in samples if s.uid not in done]
    if rank == 0:
        print(f"vcr1.eval: {len(pending)} of {len(samples)} items to answer ({len(samples) - len(pending)} "
              f"already in {args.predictions}, {bad_entries} malformed annotations skipped)", file=sys.stderr)
    share = pending[rank::world]
    skipped = 0
    if share:
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, tokenizer, dtype=args.dtype, attn=args.attn).to(device).eval()
        video = VideoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(VideoConfig)})
        data_cfg = DataConfig(think=args.think, video=video)
        with open_shard(args.predictions.with_name(f"{args.predictions.name}.rank{rank}")) as out:
            for records, bad in predict(model, tokenizer, share, data_cfg=data_cfg, device=device,
                                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens):
                out.writelines(json.dumps(r) + "\n" for r in records)
                out.flush()
                skipped += len(bad)
    skipped = sum(all_gather_objects(skipped))  # also waits until every shard is written
    if rank == 0:
        merge_shards(args.predictions)
    barrier()
    return {"skipped": skipped, "skipped_annotations": bad_entries}


def _processes():
    """(rank, world, device): torchrun's process group when launched by it, else one process."""
    import torch

    from vcr1.engine import init_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed()
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    extra = {}
    if args.annotations is not None:
        if args.media_root is None:
            parser.error("--annotations needs --media_root")
        args.dtype = args.dtype or ("fp32" if args.model is None else "bf16")
        from vcr1.preflight import unrunnable_here

        if problem := unrunnable_here(args.attn, args.dtype, args.decode_device):
            parser.error(problem)
        rank, world, device = _processes()
        extra = generate_predictions(args, rank, world, device)
        if rank != 0:
            return 0
    if not args.predictions.is_file():
        parser.error(f"--predictions {args.predictions}: no such file")
    try:
        result = {**metrics.score_predictions(args.task, args.predictions), **extra}
    except ValueError as e:  # no scorable item at all
        print(f"vcr1.eval: {args.predictions}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(f"{k:>12}  {v:.2f}" if isinstance(v, float) else f"{k:>12}  {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
