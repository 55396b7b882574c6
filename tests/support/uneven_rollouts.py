"""`torchrun tests/support/uneven_rollouts.py ARGS`: vcr1/train.py, except that rank 1 samples the stop
token every time, so its rollouts and greedy eval answers end after one token while rank 0's run on to
the length limit. The processes must then never wait on each other inside generation (under ZeRO-3: no
per-module gathers while decoding)."""
import os

from vcr1 import rollout, train

_sample = rollout.sample


def _stop_at_once(logits, sampling, generator):
    tokens, logprobs = _sample(logits, sampling, generator)
    stops = sampling.eos_token_id
    return tokens.clone().fill_(stops if isinstance(stops, int) else stops[0]), logprobs


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        rollout.sample = _stop_at_once
    train.main()
