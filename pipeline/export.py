"""minimoe-export CHECKPOINT OUT_DIR: a distillation checkpoint -> a plain student model dir.

DeepSpeed writes a MoE model as one file of non-expert weights (mp_rank_00_model_states.pt) plus one
file per expert with its GLOBAL id (layer_{L}_expert_{E}_mp_rank_00_model_states.pt), whichever
expert-parallel rank held it; zero_to_fp32.py does not understand those files, so this merges them
itself. The result (config.json + model.safetensors + tokenizer, via transformers' save_pretrained) loads
in one process whatever ep_size it was trained with; training-only parts (MiniMoE's relation projection, TinyBERT's W_h) are
dropped, so a MiniMoE 3L;384H exports 27.88 M of its 28.32 M distillation-time parameters. In a bf16/fp16 run the weights are the engine's half-precision module
weights, saved as fp32.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minimoe_common.cli import check_output_dir
from minimoe_common.tokenizer import load_tokenizer
from pipeline import checkpoint
from pipeline.models import TRAINING_ONLY_PREFIXES, Student, StudentConfig

MODEL_STATES = "mp_rank_00_model_states.pt"


def step_dir_of(path: str | Path) -> Path:
    """A step dir, or a checkpoints dir / run dir holding `latest` -> the step dir to export."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        tag = checkpoint.latest_tag(root)
        if tag is not None:
            return root / tag
    if (path / checkpoint.TRAINER_STATE).is_file():
        return path
    raise FileNotFoundError(f"{path}: neither a checkpoint step dir (with {checkpoint.TRAINER_STATE}) nor a dir with a "
                            f"'latest' checkpoint (a run's output dir or its checkpoints/)")


def merged_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Non-expert weights + every expert file (keys already carry global expert ids), in fp32, without the
    training-only parts: the TinyBERT projection and MiniMoE's relation projection."""
    state = torch.load(step_dir / MODEL_STATES, map_location="cpu", weights_only=True)["module"]
    for expert_file in sorted(step_dir.glob("layer_*_expert_*_" + MODEL_STATES)):
        state.update(torch.load(expert_file, map_location="cpu", weights_only=True))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()
            if not k.startswith(TRAINING_ONLY_PREFIXES)}


def export(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Write OUT_DIR (config.json, model.safetensors, tokenizer) from a checkpoint; returns the step dir used."""
    check_output_dir(str(out_dir), "OUT_DIR")
    step_dir = step_dir_of(checkpoint_path)
    state = checkpoint.read_trainer_state(step_dir)
    config = StudentConfig.from_dict({**state["student"], "relation_projection": False},
                                     source=str(step_dir / checkpoint.TRAINER_STATE))
    student = Student(config)
    weights = merged_state_dict(step_dir)
    missing, unexpected = sorted(set(student.state_dict()) - set(weights)), sorted(set(weights) - set(student.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{step_dir}: checkpoint weights do not match the student config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    student.load_state_dict(weights)
    student.save_pretrained(out_dir)
    load_tokenizer(str(step_dir / "tokenizer")).save_pretrained(str(out_dir))
    return step_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minimoe-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run's output dir, its checkpoints/ dir (the latest is taken) or a step-N dir")
    parser.add_argument("out_dir", help="model dir to write (config.json, model.safetensors, tokenizer files)")
    args = parser.parse_args(argv)
    try:
        step_dir = export(args.checkpoint, args.out_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {step_dir} -> {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
