"""The embedded default's warm start: the tiny model after a long supervised warm-up, shipped with vcr1.

A randomly initialised 1.4M-parameter model needs well over a thousand supervised steps before it writes
tracking's eight boxes or tells the shapes apart, more than the default run's few minutes allow. So the
default run starts GRPO from this file, and its minutes go to GRPO.

    python -m vcr1.warm_start [--out FILE]

rebuilds it (vcr1.tiny loads it): the supervised-only runs of vcr1/train.py in STAGES, each from the
weights the one before ended with, on a synthetic set of their own seed (so the default run's examples, of
seeds 0, 1, ..., are new to them), then the final weights written to WARM_START with the recipes and a
fingerprint of the tokenizer in the file's metadata. The runs are deterministic: the same stages, torch
version and THREADS give the same bytes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from vcr1.tiny import WARM_START, tokenizer_fingerprint

# --optim.lr: the warm-up's rate is optim.lr × (sft.lr / optim.lr), whose last bit depends on optim.lr; the
# file was built with 3e-4, so the recipe pins it (the default's GRPO rate is 1e-4). --data.reshuffle: the
# warm-up's ~13 passes each take a new order, as they did before the default run kept one.
_SFT = (
    "--stage", "sft", "--seed", "1000", "--sft.scheduler", "cosine", "--sft.batch_size", "8", "--optim.lr", "3e-4",
    "--data.synthetic_train", "400", "--data.synthetic_test", "24", "--eval_limit", "72", "--data.reshuffle", "true",
    "--eval_before_after", "true", "--save_every", "100000",
)
# Stage 1 from random weights; stage 2 restarts a lower cosine from its weights, which gains on tracking and
# tg (figures in docs/experiments.md).
STAGES = (
    (*_SFT, "--sft.steps", "2000", "--sft.lr", "2e-3", "--model.init", "none"),
    (*_SFT, "--sft.steps", "600", "--sft.lr", "5e-4"),
)
THREADS = 2  # CPU kernels split work by thread count: a rebuild matches bit for bit only at the same count


def build(out: Path = WARM_START, stages=STAGES, threads: int = THREADS, work: Path | None = None) -> dict:
    """Run the supervised stages one after the other and write the last one's final weights to `out`; returns
    the metadata. A stage after the first starts from the weights the one before it exported."""
    from vcr1.distributed import standalone_env

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp)
        env = standalone_env(OMP_NUM_THREADS=str(threads))
        train = Path(__file__).resolve().parent / "train.py"
        start = ()
        for i, recipe in enumerate(stages, 1):
            run_dir = work / f"stage-{i}"
            subprocess.run([sys.executable, str(train), *recipe, *start, "--output_dir", str(run_dir),
                            "--resume", "false"], env=env, check=True)
            weights = out if i == len(stages) else work / f"stage-{i}.safetensors"
            meta = export(run_dir, weights, stages[:i], threads)
            start = ("--model.init", str(weights))
        return meta


def export(run_dir: Path, out: Path, stages, threads: int) -> dict:
    """Write the final weights of the finished warm-up run in `run_dir` (the last of `stages`) to `out`, with
    their metadata."""
    import torch
    from safetensors.torch import save_file

    from vcr1.checkpoint import find_checkpoint
    from vcr1.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(None)
    model = load_model(str(find_checkpoint(Path(run_dir), required=True)), tokenizer)
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    final_eval = {k: v for r in rows if r["stage"] == "eval" for k, v in r.items() if k.startswith("eval/")}
    meta = {"tokenizer": tokenizer_fingerprint(tokenizer), "recipe": " | ".join(" ".join(r) for r in stages),
            "threads": str(threads), "torch": torch.__version__, "eval": json.dumps(final_eval, sort_keys=True)}
    out.parent.mkdir(parents=True, exist_ok=True)
    # One metadata entry: safetensors writes several in hash order, which would vary the file's bytes.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out),
              metadata={"vcr1": json.dumps(meta, sort_keys=True)})
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=WARM_START)
    args = p.parse_args(argv)
    meta = build(args.out)
    print(f"wrote {args.out}: {meta}")


if __name__ == "__main__":
    main()
