"""Evaluation with the paper's metrics (docs/paper.md §5): greedy answers from a checkpoint, scored over all items.

    python -m vcr1.eval --model CKPT [--json]        # a vcr1 checkpoint on its run's own held-out set
    python -m vcr1.eval --task tg --model CKPT --annotations charades_sta_test.json --media_root VIDEOS \
        --predictions preds.jsonl [--json]            # generate (resumable), then score
    python -m vcr1.eval --task tg --predictions preds.jsonl --json     # score a predictions file only

A vcr1 checkpoint holds its run's resolved config (vcr1_config.yaml): generation uses the settings the run was
trained and evaluated with (prompt, video sampling, answer length, batch size, dtype); a flag given explicitly
overrides one; without a saved config (a downloaded model) they are the paper's. With `--model CKPT` and no
`--annotations`, the checkpoint answers its run's held-out set (data.eval_datasets, or the synthetic test split,
limited to eval_limit as the trainer does) and the metrics are the trainer's eval row: `eval/<task>/<metric>`.

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

from vcr1.config import ATTN_IMPLEMENTATIONS, DTYPE_NAMES, ConfigError, DataConfig, VideoConfig, parse_config
from vcr1.data.annotations import format_names
from vcr1.tasks import get_task, task_names

log = logging.getLogger("vcr1.eval")

PAPER_MAX_NEW_TOKENS = 2048
PAPER_BATCH_SIZE = 8  # prompts per generation call when the checkpoint has no run config
VIDEO_SETTINGS = tuple(f.name for f in dataclasses.fields(VideoConfig))
SETTINGS = ("think", "max_new_tokens", "batch_size", "dtype", "attn", *VIDEO_SETTINGS)


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
        result[task] = get_task(task).aggregate(items[task]) if items[task] else {"unparseable": 0, "n": 0}
        result[task].update(skipped=skipped[task], malformed=malformed[task])
    return result


def evaluate(model, tokenizer, samples, *, cfg, rank: int = 0, world: int = 1, device="cpu",
             batch_size: int | None = None, max_new_tokens: int | None = None, records: list | None = None) -> dict:
    """{task: {metric: value}} over ALL samples; every process calls it and gets the same dict.

    Each process answers samples[rank::world] greedily with cfg.data's video and prompt settings, at most
    cfg.grpo.max_completion_length new tokens, cfg.eval_batch_size prompts per batch (default
    cfg.prompts_per_step: the prompt caches a training rollout already holds), grouped by task so that
    short answers are not batched with long ones. Samples that cannot be encoded (e.g. a video that does
    not decode) count in `skipped`, items that cannot be scored (a malformed solution) in `malformed`: a
    bad held-out item never ends training, and every process still makes the one gather below.
    `records`, when given, receives this process's prediction records.
    """
    from vcr1.distributed import all_gather_objects

    batch_size = batch_size or cfg.eval_batch_size or cfg.prompts_per_step
    max_new_tokens = max_new_tokens or cfg.grpo.max_completion_length
    items, skipped, malformed = collections.defaultdict(list), collections.Counter(), collections.Counter()
    was_training = model.training
    model.eval()
    try:
        mine = sorted(samples[rank::world], key=lambda s: s.task)  # stable: each task keeps its order
        for batch, bad in predict(model, tokenizer, mine, data_cfg=cfg.data, device=device,
                                  batch_size=batch_size, max_new_tokens=max_new_tokens):
            if records is not None:
                records.extend(batch)
            for r in batch:
                try:
                    items[r["task"]].append(get_task(r["task"]).score(r["completion"], r["solution"]))
                except Exception as e:  # a malformed solution that bypassed load-time validation, or a bug
                    log.warning("not scoring %s: %r", r["uid"], e)
                    malformed[r["task"]] += 1
            skipped.update(bad)
    finally:
        model.train(was_training)
    return summarize(all_gather_objects((dict(items), skipped, malformed)))


# ------------------------------------------------------------------------------- predictions files

def score_predictions(task: str, path) -> dict:
    """Metrics of a JSONL file of {"completion": str, "solution": {...}} lines, scored by `task`.

    Lines that are not such objects, or whose solution is malformed, are skipped and counted in
    `malformed`; blank lines are ignored.
    """
    task = get_task(task)
    items, malformed = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("completion"), str):
                    raise ValueError("want {'completion': str, 'solution': {...}}")
                items.append(task.score(record["completion"], record.get("solution")))
            except Exception:  # bad JSON, a malformed solution, or a task's scorer that threw: never fatal
                malformed += 1
    return {**task.aggregate(items), "malformed": malformed}


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
    p = argparse.ArgumentParser(prog="python -m vcr1.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", help=f"a task ({', '.join(task_names())}) or module:Class of your own: the task of "
                                  "--annotations and --predictions (required there); with --model CKPT alone, only "
                                  "this task of the run's held-out set")
    p.add_argument("--predictions", type=Path,
                   help="JSONL of {uid, task, completion, solution}: appended to when generating, then scored "
                        "(required with --annotations or alone; with --model CKPT alone it is written, default "
                        "CKPT/eval_predictions.jsonl)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    gen = p.add_argument_group("generation")
    gen.add_argument("--model", help="checkpoint dir; a vcr1 checkpoint brings its run's settings and held-out set "
                                     "(vcr1_config.yaml); omitted: the tiny random default (smoke tests)")
    gen.add_argument("--annotations", type=Path, help="annotation file to answer; without it and without --model, "
                                                      "only score --predictions")
    gen.add_argument("--media_root", type=Path, help="folder the annotation's video paths are relative to")
    gen.add_argument("--fmt", choices=format_names(), help="default: detected")
    gen.add_argument("--limit", type=int, help="answer at most this many items of the file (with --model CKPT "
                                               "alone: of the run's held-out set, balanced over tasks; default its "
                                               "eval_limit)")
    settings = p.add_argument_group(
        "generation settings", "Each defaults to the value of the checkpoint's run config (vcr1_config.yaml), else "
                               "the paper's (shown); a flag given explicitly overrides it.")
    settings.add_argument("--dtype", choices=DTYPE_NAMES, help="run: model.dtype; paper: bf16, fp32 for the tiny "
                                                               "default")
    settings.add_argument("--attn", choices=ATTN_IMPLEMENTATIONS, help="run: model.attn; paper: sdpa")
    settings.add_argument("--batch_size", type=int, help="prompts per generation call; run: eval_batch_size "
                                                         f"(else prompts_per_step); paper: {PAPER_BATCH_SIZE}")
    settings.add_argument("--max_new_tokens", type=int, help="run: grpo.max_completion_length; paper: "
                                                             f"{PAPER_MAX_NEW_TOKENS}")
    settings.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                          help="prompts that ask for a <think> block; run: data.think; paper: on")
    for f in dataclasses.fields(VideoConfig):  # the paper's video settings, as training uses them
        settings.add_argument(f"--{f.name}", type=type(f.default), default=None, choices=f.metadata["choices"],
                              help=f"{f.metadata['help']}; run: data.video.{f.name}; paper: {f.default}")
    return p


def load_run_config(model: str | None):
    """(the resolved config of the run that wrote checkpoint `model`, its file), or (None, None) when the
    checkpoint has none (a downloaded model) or no model is given. A config that no longer parses is a
    ConfigError."""
    if model is None:
        return None, None
    from vcr1.checkpoint import RUN_CONFIG

    path = Path(model) / RUN_CONFIG
    if not path.is_file():
        return None, None
    return parse_config(["--config", str(path)]), path


def resolve_settings(args, run_cfg) -> list[str]:
    """Fill each generation setting the flags left unset (None) from the run config, else the paper's; returns
    the names of those a flag gave."""
    if run_cfg is None:
        base = {"think": True, "max_new_tokens": PAPER_MAX_NEW_TOKENS, "batch_size": PAPER_BATCH_SIZE,
                "dtype": "fp32" if args.model is None else "bf16", "attn": "sdpa",
                **dataclasses.asdict(VideoConfig())}
    else:
        base = {"think": run_cfg.data.think, "max_new_tokens": run_cfg.grpo.max_completion_length,
                "batch_size": run_cfg.eval_batch_size or run_cfg.prompts_per_step, "dtype": run_cfg.model.dtype,
                "attn": run_cfg.model.attn, **dataclasses.asdict(run_cfg.data.video)}
    flagged = [name for name in SETTINGS if getattr(args, name) is not None]
    for name in SETTINGS:
        if name not in flagged:
            setattr(args, name, base[name])
    return flagged


def describe_settings(args, flagged: list[str], source: str) -> str:
    """The two stderr lines naming the generation settings and where they came from."""
    used = " ".join(f"{name}={getattr(args, name)}" for name in SETTINGS)
    return (f"vcr1.eval: settings: {used}\n"
            f"vcr1.eval: settings from {source}; overridden by flags: {', '.join(flagged) or 'none'}")


def video_config(args) -> VideoConfig:
    return VideoConfig(**{name: getattr(args, name) for name in VIDEO_SETTINGS})


def generate_predictions(args, rank: int, world: int, device) -> dict:
    """Answer the annotation items not yet in the predictions file; returns skip counts (all processes)."""
    from vcr1.data.annotations import load_annotations
    from vcr1.distributed import all_gather_objects, barrier
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
        data_cfg = DataConfig(think=args.think, video=video_config(args))
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

    from vcr1.distributed import init_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed()
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def held_out_samples(run_cfg, ckpt: Path, rank: int, limit: int | None = None) -> tuple[list, int]:
    """The held-out examples the run's evaluations scored, found as the trainer finds them (Trainer._build_data):
    data.eval_datasets, or the synthetic test split of the run's seed and data settings (reused where the run
    wrote it, else regenerated, byte for byte), then balanced_subset(eval_limit). Returns (samples, malformed
    annotation entries skipped)."""
    from vcr1.data.dataset import balanced_subset, load_split, synthetic_datasets
    from vcr1.distributed import barrier

    eval_datasets = run_cfg.data.eval_datasets
    if not eval_datasets and not run_cfg.data.datasets:
        if run_cfg.data.synthetic_dir:
            root = Path(run_cfg.data.synthetic_dir)
        elif ckpt.parent.name == "checkpoints":  # <output_dir>/checkpoints/step-N: the run's <output_dir>/synthetic
            root = ckpt.parent.parent / "synthetic"
        else:
            root = ckpt / "eval_synthetic"
        if rank == 0:
            synthetic_datasets(root, run_cfg.data, run_cfg.seed)
        barrier()
        eval_datasets = synthetic_datasets(root, run_cfg.data, run_cfg.seed)["test"]
    if not eval_datasets:
        raise ValueError("the run had no held-out set (data.eval_datasets is empty): pass --task, --annotations "
                         "and --media_root")
    samples, bad = load_split(eval_datasets)
    return balanced_subset(samples, run_cfg.eval_limit if limit is None else limit), bad


def evaluate_run(args, run_cfg, rank: int, world: int, device) -> dict:
    """The checkpoint `args.model` on its run's held-out set: {eval/<task>/<metric>: value}, as the trainer's
    eval rows; the predictions are written to args.predictions."""
    from vcr1.distributed import all_gather_objects, barrier
    from vcr1.model import load_model, load_tokenizer

    ckpt = Path(args.model)
    samples, bad = held_out_samples(run_cfg, ckpt, rank, args.limit)
    if args.task:
        samples = [s for s in samples if s.task == args.task]
    if rank == 0:
        per_task = collections.Counter(s.task for s in samples)
        print(f"vcr1.eval: {len(samples)} held-out examples of the run ("
              f"{', '.join(f'{t} {n}' for t, n in per_task.items())}; {bad} malformed annotations skipped)",
              file=sys.stderr)
    tokenizer = load_tokenizer(str(ckpt))
    model = load_model(str(ckpt), tokenizer, dtype=args.dtype, attn=args.attn).to(device).eval()
    cfg = dataclasses.replace(run_cfg, data=dataclasses.replace(run_cfg.data, think=args.think,
                                                                video=video_config(args)))
    mine = []
    result = evaluate(model, tokenizer, samples, cfg=cfg, rank=rank, world=world, device=device,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, records=mine)
    gathered = all_gather_objects(mine)
    if rank == 0:
        path = args.predictions or ckpt / "eval_predictions.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for part in gathered for r in part), encoding="utf-8")
        os.replace(tmp, path)
        print(f"vcr1.eval: predictions in {path}", file=sys.stderr)
    barrier()
    return {f"eval/{task}/{k}": v for task, values in result.items() for k, v in values.items()}


def _print(result: dict, as_json: bool, width: int = 12):
    if as_json:
        print(json.dumps(result))
        return
    print("\n".join(f"{k:>{width}}  {v:.2f}" if isinstance(v, float) else f"{k:>{width}}  {v}"
                    for k, v in result.items()))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_cfg, run_file = load_run_config(args.model)
    except ConfigError as e:
        parser.error(f"--model {args.model}: cannot read its run config: {e}")
    held_out = args.annotations is None and run_cfg is not None
    generating = held_out or args.annotations is not None
    if not held_out and (args.task is None or args.predictions is None):
        parser.error("--task and --predictions are needed, except with a vcr1 checkpoint (--model CKPT, which holds "
                     "vcr1_config.yaml) and no --annotations")
    if args.task is not None:
        try:
            args.task = get_task(args.task).name
        except ValueError as e:
            parser.error(str(e))
    extra = {}
    if generating:
        if args.annotations is not None and args.media_root is None:
            parser.error("--annotations needs --media_root")
        flagged = resolve_settings(args, run_cfg)
        from vcr1.preflight import unrunnable_here

        if problem := unrunnable_here(args.attn, args.dtype, args.decode_device):
            parser.error(problem)
        rank, world, device = _processes()
        if rank == 0:
            source = (f"the run config {run_file}" if run_file else
                      f"the paper's defaults ({args.model} has no vcr1_config.yaml)" if args.model else
                      "the paper's defaults (no --model: the tiny random model)")
            print(describe_settings(args, flagged, source), file=sys.stderr)
        if held_out:
            try:
                result = evaluate_run(args, run_cfg, rank, world, device)
            except ValueError as e:
                parser.error(str(e))
            if rank == 0:
                _print(result, args.json, width=max(map(len, result), default=12))
            return 0
        extra = generate_predictions(args, rank, world, device)
        if rank != 0:
            return 0
    if not args.predictions.is_file():
        parser.error(f"--predictions {args.predictions}: no such file")
    try:
        result = {**score_predictions(args.task, args.predictions), **extra}
    except ValueError as e:  # no scorable item at all
        print(f"vcr1.eval: {args.predictions}: {e}", file=sys.stderr)
        return 1
    _print(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
