"""Test helper started by the deepspeed launcher: the training-time model's outputs on a fixed batch.

Loads a distillation checkpoint the way training does (DeepSpeed engine, the run's ep_size, DeepSpeed's
own reading of the expert files: independent of pipeline.export), runs the first 4 shard samples in eval
mode on every rank, and rank 0 saves last_hidden_state and Q/K/V to OUT.

usage: deepspeed --num_gpus N tests/distill_probe.py CHECKPOINT_STEP_DIR SHARDS OUT
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import checkpoint  # noqa: E402
from pipeline.data import ShardDataset, collate  # noqa: E402
from pipeline.models import Student, StudentConfig  # noqa: E402
from pipeline.optim import init_distributed  # noqa: E402


def main(step_dir: Path, shards: Path, out: Path) -> None:
    init_distributed()
    state = checkpoint.read_trainer_state(step_dir)
    config = dataclasses.replace(StudentConfig.from_dict(state["student"]), dropout=0.0)
    student = Student(config, deepspeed_moe=True, ep_size=state["layout"]["ep_size"])
    engine, *_ = deepspeed.initialize(model=student, config={"train_micro_batch_size_per_gpu": 4})
    engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name, load_module_only=True)
    engine.eval()
    dataset = ShardDataset(shards)
    batch = collate([dataset[i] for i in range(4)], dataset.pad_id)
    with torch.no_grad():
        output = engine(**batch)
    if dist.get_rank() == 0:
        torch.save({"hidden": output.last_hidden_state, "qkv": list(output.qkv), **batch}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    main(*map(Path, args))
