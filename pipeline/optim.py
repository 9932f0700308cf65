"""Training setup shared by distillation and finetuning: the DeepSpeed config, the engine with AdamW, its
parameter groups and the LR schedule."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups, decay on matrices and embeddings only (BERT recipe), split into MoE / non-MoE
    groups as DeepSpeed requires (expert gradients are reduced over the expert-data-parallel group)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"name": "decay", "params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
              {"name": "no_decay", "params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_engine(model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float, warmup_steps: int,
                 total_steps: int, eps: float = 1e-8):
    """The DeepSpeed engine over `model`, with AdamW on `param_groups` and the `lr_factor` schedule (the
    engine steps both at accumulation boundaries).

    AdamW is torch's fused one: one kernel over all tensors, on CPUs too, where it steps a 28M-parameter
    student 4.7x faster than the default per-tensor loop (BENCHMARKS.md). fp32 ZeRO-0 on a single rank
    skips DeepSpeed's gradient all-reduce, which there only copies every gradient into buckets and back;
    ZeRO-1/2 and bf16/fp16 keep it, as their reduce step also moves gradients into the optimizer's buffers."""
    import deepspeed
    import torch.distributed as dist

    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, eps=eps, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    plain_fp32 = engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
    if plain_fp32 and dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False
    return engine


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup over `warmup_steps` (reaching 1 at the last warmup step), then linear decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def read_deepspeed_config(path: str | Path, owned_keys: dict[str, str], command: str) -> dict[str, Any]:
    """A DeepSpeed JSON config (ZeRO stage, precision, ...), refused with a one-line reason when it sets a
    key the command's flags own (`owned_keys`: key -> flag), asks for ZeRO-3 or for fp16 on a device
    without it."""
    from deepspeed.accelerator import get_accelerator

    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the DeepSpeed config: {e}") from None
    for key, flag in owned_keys.items():
        if key in ds:
            raise ValueError(f"{path}: {key!r} is set by {command} ({flag}); remove it from the DeepSpeed config")
    if ds.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ValueError(f"{path}: ZeRO stage 3 is not supported: DeepSpeed's MoE layer does not work with it "
                         f"(Native DeepSpeed MoE is not supported with ZeRO Stage 3); use ZeRO 0, 1 or 2 "
                         f"(ds_configs/zero2.json)")
    accelerator = get_accelerator()
    if ds.get("fp16", {}).get("enabled") and not accelerator.is_fp16_supported():
        raise ValueError(f"{path}: fp16 is not supported on the {accelerator.device_name()} accelerator; "
                         f"use bf16 (ds_configs/zero2-bf16.json) or fp32 (ds_configs/zero2.json)")
    return ds
