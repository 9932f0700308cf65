"""Training setup shared by distillation and finetuning: the DeepSpeed config, the engine with AdamW, its
parameter groups and the LR schedule."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.logs import prints_to_stderr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups, decay on matrices and embeddings only (BERT recipe), split into MoE / non-MoE
    groups as DeepSpeed requires (expert gradients are reduced over the expert-data-parallel group)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"name": "decay", "params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
              {"name": "no_decay", "params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_engine(model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float, schedule: "LinearSchedule",
                 eps: float = 1e-8):
    """The DeepSpeed engine over `model`, with AdamW on `param_groups` and `schedule` (the engine steps both
    at accumulation boundaries).

    AdamW is torch's fused one: one kernel over all tensors, on CPUs too, where it steps a 28M-parameter
    student 4.7x faster than the default per-tensor loop (BENCHMARKS.md). fp32 ZeRO-0 on a single rank
    skips DeepSpeed's gradient all-reduce, which there only copies every gradient into buckets and back;
    ZeRO-1/2 and bf16/fp16 keep it, as their reduce step also moves gradients into the optimizer's buffers."""
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, eps=eps, fused=True)
    # A lambda, not the schedule object: LambdaLR checkpoints a callable object's attributes and would load
    # the old schedule back over an extended one on resume.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.factor(step))
    with prints_to_stderr():  # DeepSpeed's MoE layers print as they create their expert groups
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    plain_fp32 = engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
    if plain_fp32 and dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False
    return engine


@dataclasses.dataclass(frozen=True)
class LinearSchedule:
    """The learning-rate factor of optimizer step `step` (0-based): linear warmup over `warmup_steps`
    (reaching 1 at the last warmup step), then linear decay from `decay_from` at `decay_start` (default: the
    end of warmup) to 0 at `total_steps`. A fresh run decays from 1; `extended` moves the end of a running
    schedule without a jump in the rate."""

    warmup_steps: int
    total_steps: int
    decay_start: int = 0
    decay_from: float = 1.0

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start = max(self.decay_start, self.warmup_steps)
        return self.decay_from * max(0.0, (self.total_steps - step) / max(1, self.total_steps - start))

    def extended(self, step: int, total_steps: int) -> "LinearSchedule":
        """This schedule after `step` steps, now ending at `total_steps`: the factor at `step` is kept and
        decays linearly from there to 0 (warmup, if not over yet, ends as before)."""
        if total_steps == self.total_steps:
            return self
        start = max(step, self.warmup_steps)
        return dataclasses.replace(self, total_steps=total_steps, decay_start=start, decay_from=self.factor(start))


def check_finite(values: dict[str, float], step: int, what: str = "loss") -> None:
    """Stop on a NaN/Inf loss (or metric), naming the step and every value (fp16 overflow is the loss
    scaler's job: it skips the step on infinite gradients, but the loss itself is finite then)."""
    if not all(math.isfinite(v) for v in values.values()):
        shown = ", ".join(f"{name}={value:g}" for name, value in values.items())
        raise FloatingPointError(f"non-finite {what} at step {step}: {shown}; lower --lr or check the data")


def init_distributed() -> None:
    """deepspeed.init_distributed with this accelerator's backend (gloo on CPUs, nccl on GPUs), saying so on
    rank 0 when DeepSpeed is about to compile its CPU shared-memory op (~40 s, once per extensions dir),
    which it otherwise does silently."""
    import sys

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory  # where torch would keep the built op

    accelerator = get_accelerator()
    builder = accelerator.create_op_builder("ShareMemCommBuilder") if accelerator.device_name() == "cpu" else None
    if builder is not None and int(os.environ.get("RANK", "0")) == 0:
        built = Path(_get_build_directory(builder.NAME, verbose=False)) / f"{builder.NAME}.so"
        if not built.exists():
            print(f"note: DeepSpeed compiles its {builder.NAME} op on this first run (~40 s; kept in {built.parent})",
                  file=sys.stderr)
    with prints_to_stderr():  # and its communication ops as they load
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    if builder is not None and {"MASTER_ADDR", "MASTER_PORT", "RANK"} <= os.environ.keys():  # (set by the init)
        # DeepSpeed's init has each rank map every other rank's buffer: once all are through it, the files can go.
        # The mappings stay until the process ends, however it ends: a SIGKILLed rank leaves nothing in /dev/shm.
        dist.barrier()
        shared_memory_buffer().unlink(missing_ok=True)


def shared_memory_buffer() -> Path:
    """This rank's buffer of DeepSpeed's CPU shared-memory allreduce (/dev/shm, 69 MB): DeepSpeed never unlinks it,
    so every run would leave one per rank in RAM-backed /dev/shm (18 GB after a day of test runs here);
    init_distributed unlinks it as soon as every rank has mapped it."""
    env = os.environ
    return Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_"
                            f"{env['RANK']}")


def init_single_process() -> None:
    """Without a launcher, make this process rank 0 of 1 on a free local port, as the deepspeed launcher
    would (DeepSpeed would otherwise look for MPI)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


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


def lost_peer(e: RuntimeError) -> str | None:
    """The backend's reason when a collective failed because another rank died (killed, out of memory, its node
    lost), else None. Gloo raises a plain RuntimeError from its transport ("[.../gloo/transport/tcp/pair.cc:537]
    Read error [127.0.0.1]:12717: Connection reset by peer. This is typically ..."), NCCL a DistBackendError."""
    message = str(e)
    if not isinstance(e, dist.DistError) and "gloo/transport" not in message:
        return None
    return message.split("] ", 1)[-1].split(". ")[0] if "gloo/transport" in message else message.splitlines()[0]
