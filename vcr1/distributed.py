"""Processes and the DeepSpeed engine: torchrun environment, ZeRO 0/2/3 with optional CPU offload,
AdamW with the LR schedule, full weights for generation, and every collective vcr1 makes.

Collectives live here and nowhere else: each builds its tensor on `collective_device()` (the GPU under
NCCL, the CPU under gloo), so no caller can hand NCCL a CPU tensor.
"""
from __future__ import annotations

import contextlib
import math
import os
import socket

import torch
import torch.distributed as dist

# What torchrun (or init_distributed, for a world of one) puts in a process's environment.
PROCESS_GROUP_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def standalone_env(**overrides: str) -> dict:
    """This process's environment without its process-group variables, plus `overrides`: for a child
    process that must start a world of its own, not join (or collide on the port of) this one's."""
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARIABLES}
    return {**env, **overrides}


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Plain `python vcr1/train.py` runs as a world of one."""
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        # A world of one on a free port, so several single-process runs on one machine never collide.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    import deepspeed

    cuda = torch.cuda.is_available()
    if not cuda and os.environ["WORLD_SIZE"] == "1":
        # DeepSpeed's CPU backend compiles its shared-memory all-reduce op on first use (~45 s on 2 cores,
        # before the run's first line); a world of one reduces nothing. Its table of usable ops is read
        # lazily and kept, so marking the op unusable here skips both the build and the probe of the rest.
        deepspeed.ops.__compatible_ops__ = {}
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


# ---------------------------------------------------------------------------------------- optimizer

def _decay(progress: float, kind: str) -> float:
    """LR multiplier of a schedule `kind` at `progress` in [0, 1] of its steps."""
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def lr_lambda(step: int, *, sft_steps: int, sft_scale: float, sft_kind: str, grpo_steps: int, warmup: int,
              kind: str) -> float:
    """LR multiplier of optim.lr at optimizer step `step`: the warm-up's steps from sft.lr on sft.scheduler,
    then GRPO's schedule over its `grpo_steps` optimizer steps (μ per GRPO step)."""
    if step < sft_steps:
        return sft_scale * _decay(step / sft_steps, sft_kind)
    step -= sft_steps
    if step < warmup:
        return (step + 1) / warmup
    return _decay(min(1.0, (step - warmup) / max(1, grpo_steps - warmup)), kind)


class CheckedAdamW(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm and skips a step whose gradients are not all finite.

    DeepSpeed does both for its own optimizer wrappers (ZeRO >= 1, bf16, fp16) but hands an fp32 ZeRO-0
    run the bare optimizer: there a NaN gradient would be clipped into the weights. A skipped step sets
    `overflow`, which DeepSpeed reads to leave the LR schedule alone and count `skipped_steps`; the norm
    is reported as DeepSpeed's wrappers report it (`_global_grad_norm`, before clipping).
    """

    def __init__(self, params, *, max_grad_norm: float, **adam):
        super().__init__(params, **adam)
        self.max_grad_norm, self.overflow, self._global_grad_norm = max_grad_norm, False, None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        # ZeRO-0 all-reduced the gradients already, so every process computes the same norm.
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm > 0 else math.inf)
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


def _bare_optimizer(cfg) -> bool:
    """DeepSpeed runs the client optimizer itself, without overflow checks, only at ZeRO-0 in fp32."""
    return cfg.engine.zero_stage == 0 and cfg.model.dtype == "fp32"


def deepspeed_config(cfg, *, train: bool) -> dict:
    dtype = cfg.model.dtype
    zero = {"stage": cfg.engine.zero_stage}
    if cfg.engine.offload and cfg.engine.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if cfg.engine.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.engine.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.grad_accum if train else 1,
        "zero_optimization": zero,
        # check_grad_overflow: a bf16 step with a non-finite gradient is skipped, never applied
        "bf16": {"enabled": dtype == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train and cfg.optim.max_grad_norm > 0 and not _bare_optimizer(cfg):
        ds["gradient_clipping"] = cfg.optim.max_grad_norm
    return ds


def build_engine(model, cfg, *, grpo_steps: int):
    """The DeepSpeed engine training `model` with AdamW and the combined warm-up + GRPO schedule.

    One optimizer step per micro-batch group of `grad_accum`, μ = grpo.num_iterations of them per GRPO step;
    steps whose gradients are not finite are skipped and counted in `engine.skipped_steps`."""
    import deepspeed

    ds = deepspeed_config(cfg, train=True)
    params = [p for p in model.parameters() if p.requires_grad]
    adam = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    if "offload_optimizer" in ds["zero_optimization"]:
        ds["optimizer"] = {"type": "AdamW", "params": adam}  # DeepSpeed's CPU Adam runs the offloaded step
        optimizer = None
    elif _bare_optimizer(cfg):
        optimizer = CheckedAdamW(params, max_grad_norm=cfg.optim.max_grad_norm, **adam)
    else:
        optimizer = torch.optim.AdamW(params, **adam)
    sched = dict(sft_steps=cfg.sft.steps if "sft" in cfg.stage else 0, sft_scale=cfg.sft.lr / cfg.optim.lr,
                 sft_kind=cfg.sft.scheduler,
                 grpo_steps=grpo_steps * cfg.grpo.num_iterations, warmup=cfg.optim.warmup_steps,
                 kind=cfg.optim.scheduler)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, **sched)),
    )
    return engine


def build_frozen(model, cfg):
    """A frozen copy for the reference policy: sharded like the policy under ZeRO-3, plain otherwise."""
    model.requires_grad_(False).eval()
    if cfg.engine.zero_stage != 3:
        return model
    import deepspeed

    ds = deepspeed_config(cfg, train=False)
    ds["zero_optimization"].pop("offload_optimizer", None)
    return deepspeed.initialize(model=model, config=ds)[0].module


def generation_weights(engine, zero_stage: int):
    """Full weights and no ZeRO-3 module hooks for a generation call (rollouts, eval), restored after.

    Under ZeRO-3 every module's hooks gather its shard before a forward and release it after: decoding
    token by token would re-gather every layer every step, and a process whose completions end early
    would leave the others waiting in a gather. Gathering once and removing the hooks makes generation
    collective-free, so processes may stop decoding at different steps."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    return unwrap_model_for_generation(engine)


# -------------------------------------------------------------------------------------- collectives

def _multi() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where a collective's tensors must live: the current GPU under NCCL, the CPU otherwise."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_collective_device(t: torch.Tensor) -> torch.Tensor:
    return t.to(collective_device())


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over every process (float64, on the collective device)."""
    t = to_collective_device(torch.tensor(values, dtype=torch.float64))
    if _multi():
        dist.all_reduce(t)
    return t.tolist()


def any_process(*flags: bool) -> list[bool]:
    """For each flag: is it set on any process? (Every process gets the same answer.)"""
    return [s > 0 for s in sum_floats([float(bool(f)) for f in flags])]


def all_gather_objects(obj) -> list:
    if not _multi():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if _multi():
        dist.barrier()
