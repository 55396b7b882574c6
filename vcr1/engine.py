"""Processes and the DeepSpeed engine: torchrun environment, ZeRO 0/2/3 with optional CPU offload,
AdamW with the LR schedule, and the collectives the trainer needs."""
from __future__ import annotations

import contextlib
import math
import os
import socket

import torch
import torch.distributed as dist


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
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def lr_lambda(step: int, *, sft_steps: int, sft_scale: float, grpo_steps: int, warmup: int, kind: str) -> float:
    """LR multiplier of optim.lr at optimizer step `step`: warm-up steps first at sft.lr, then GRPO's schedule."""
    if step < sft_steps:
        return sft_scale
    step -= sft_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, grpo_steps - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


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
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train and cfg.optim.max_grad_norm > 0:
        ds["gradient_clipping"] = cfg.optim.max_grad_norm
    return ds


def build_engine(model, cfg, *, grpo_steps: int):
    """The DeepSpeed engine training `model` with AdamW and the combined warm-up + GRPO schedule."""
    import deepspeed

    ds = deepspeed_config(cfg, train=True)
    params = [p for p in model.parameters() if p.requires_grad]
    adam = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    if "offload_optimizer" in ds["zero_optimization"]:
        ds["optimizer"] = {"type": "AdamW", "params": adam}  # DeepSpeed's CPU Adam runs the offloaded step
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(params, **adam)
    sched = dict(sft_steps=cfg.sft.steps if "sft" in cfg.stage else 0, sft_scale=cfg.sft.lr / cfg.optim.lr,
                 grpo_steps=grpo_steps, warmup=cfg.optim.warmup_steps, kind=cfg.optim.scheduler)
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


def gathered(model, zero_stage: int):
    """Full weights for generation under ZeRO-3 (per-layer gathering would make decoding crawl)."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    value = value.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=op)
    return value


def all_gather_objects(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
