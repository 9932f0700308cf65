"""AdamW parameter groups and the LR schedule, shared by distillation and finetuning."""
from __future__ import annotations

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


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup over `warmup_steps` (reaching 1 at the last warmup step), then linear decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
