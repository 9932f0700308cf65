"""Compute report: parameters, per-token active parameters, GFLOPs and measured throughput of a model.

The paper's convention (Zhang et al. 2023, Table 1): GFLOPs of a 128-token sequence = the
transformer-layer parameters one token passes through x 128 (embeddings not counted; for a MoE layer
only the router and the top-k experts a token visits). BERT-base: 85.0 M x 128 = 10.9 GFLOPs.

    python -m pipeline.report compute 3L384H --experts 4      # a preset
    python -m pipeline.report compute out/export               # an exported student or an HF encoder dir
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from minimoe_common.cli import command
from pipeline.experts import add_experts_parser
from pipeline.models import STUDENT_PRESETS, Student, StudentConfig, is_student_dir
from pipeline.models.files import loading

TOKENS_PER_SEQUENCE = 128  # the paper's sequence length for GFLOPs


@dataclass
class ComputeReport:
    model: str
    """What was measured: a preset name or a path."""
    total_params: int
    """Every parameter, the training-only relation projection included (the paper's count: MiniMoE 3L;384H 28.3 M)."""
    deployable_params: int
    """total_params without training-only parts (what minimoe-export writes)."""
    embedding_params: int
    """Token, position, segment embeddings and their LayerNorm."""
    layer_params: int
    """All transformer-layer parameters (every expert; the relation projection too, as the paper's 16.4 M)."""
    active_layer_params: int
    """Transformer-layer parameters one token passes through (router + top-k experts of a MoE layer)."""
    gflops: float
    """active_layer_params x 128 / 1e9 (the paper's convention)."""
    tokens_per_ms: float | None
    """Measured inference throughput at the batch below on this device (None when not measured)."""
    batch: str
    device: str


def build_model(spec: str, num_experts: int | None = None, device: str = "meta") -> nn.Module:
    """A preset name, a student config .json, an exported student dir or a Hugging Face encoder dir."""
    path = Path(spec)
    with torch.device(device):
        if spec in STUDENT_PRESETS or path.suffix == ".json":
            config = StudentConfig.from_preset(spec) if spec in STUDENT_PRESETS else StudentConfig.load(path)
            if num_experts is not None:  # the relation projection follows the new expert count
                config = dataclasses.replace(config, num_experts=num_experts, relation_projection=None)
            return Student(config)
        if is_student_dir(path):
            if device == "meta":
                return Student(StudentConfig.load(path))
            with loading(path):
                return Student.from_pretrained(path)
        if (path / "config.json").is_file():
            from transformers import AutoConfig, AutoModel

            config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            if device == "meta":
                return AutoModel.from_config(config)
            with loading(path):
                return AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    raise ValueError(f"{spec}: not a preset ({', '.join(STUDENT_PRESETS)}), a config .json or a model dir with config.json")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Split the parameters into embeddings / transformer layers / the rest (e.g. a pooler)."""
    top_k = model.config.top_k if isinstance(model, Student) else 1
    num_experts = model.config.num_experts if isinstance(model, Student) else 1
    attention_experts = model.config.attention_experts if isinstance(model, Student) else 1
    counts = {"total": 0, "embedding": 0, "layer": 0, "expert": 0, "attention_expert": 0, "training_only": 0}
    for name, param in model.named_parameters():
        counts["total"] += param.numel()
        if name.startswith("embeddings."):
            counts["embedding"] += param.numel()
        elif name.startswith(("layers.", "encoder.layer.", "transformer.layer.")):
            counts["layer"] += param.numel()
            if ".deepspeed_experts." in name:
                counts["expert"] += param.numel()
            elif ".attention.experts." in name:
                counts["attention_expert"] += param.numel()
        elif name.startswith("relation_projection."):  # distillation-time only; the paper counts it in both
            counts["layer"] += param.numel()
            counts["training_only"] += param.numel()
    # A token passes through top_k of the num_experts experts of each MoE layer (and one attention expert);
    # the relation projection is not part of the deployed model's compute.
    counts["active_layer"] = (counts["layer"] - counts["expert"] - counts["attention_expert"] - counts["training_only"]
                              + counts["expert"] * top_k // num_experts + counts["attention_expert"] // attention_experts)
    return counts


def measure_throughput(model: nn.Module, batch_size: int = 32, seq_len: int = 128, repeats: int = 5) -> float:
    """Inference tokens/ms: median of `repeats` timed forwards after one warm-up, full-length sequences."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.randint(1000, 2000, (batch_size, seq_len), device=device)
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        for step in range(repeats + 1):
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - start)
    return batch_size * seq_len / (sorted(times)[len(times) // 2] * 1000)


def compute_report(spec: str, num_experts: int | None = None, throughput: bool = True, batch_size: int = 32,
                   seq_len: int = 128, device: str | None = None) -> ComputeReport:
    """Parameter counts and GFLOPs of `spec` (see build_model), with measured throughput if asked."""
    model = build_model(spec, num_experts)
    counts = count_parameters(model)
    tokens_per_ms = None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if throughput:
        with torch.device(device):
            torch.manual_seed(0)
            tokens_per_ms = measure_throughput(build_model(spec, num_experts, device=device), batch_size, seq_len)
    experts = getattr(getattr(model, "config", None), "num_experts", 1)
    return ComputeReport(spec if experts == 1 else f"{spec} ({experts} experts)", counts["total"],
                         counts["total"] - counts["training_only"], counts["embedding"], counts["layer"],
                         counts["active_layer"],
                         counts["active_layer"] * TOKENS_PER_SEQUENCE / 1e9, tokens_per_ms,
                         f"{batch_size}x{seq_len}", device)


def format_table(reports: list[ComputeReport]) -> str:
    lines = ["| model | params (M) | deployable (M) | embedding (M) | layers (M) | active/token (M) | GFLOPs | tokens/ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        speed = "-" if r.tokens_per_ms is None else f"{r.tokens_per_ms:.1f}"
        lines.append(f"| {r.model} | {r.total_params / 1e6:.1f} | {r.deployable_params / 1e6:.2f} | "
                     f"{r.embedding_params / 1e6:.1f} | "
                     f"{r.layer_params / 1e6:.1f} | {r.active_layer_params / 1e6:.2f} | {r.gflops:.2f} | {speed} |")
    return "\n".join(lines)


def run_compute(args: argparse.Namespace) -> None:
    reports = [compute_report(spec, args.experts, not args.no_throughput, args.batch_size, args.seq_len)
               for spec in args.models]
    print(json.dumps([asdict(r) for r in reports], indent=2) if args.json else format_table(reports))


def add_compute_parser(subparsers) -> None:
    p = subparsers.add_parser("compute", help="parameters, GFLOPs (paper convention) and throughput")
    p.add_argument("models", nargs="+", help=f"presets ({', '.join(STUDENT_PRESETS)}), student config .json "
                                             "files, exported student dirs or Hugging Face encoder dirs")
    p.add_argument("--experts", type=int, default=None, help="override num_experts of presets/configs (4 = MiniMoE)")
    p.add_argument("--no-throughput", action="store_true", help="skip the timed forward passes")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per timed forward (default 32)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence in the timed forward (default 128)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    p.set_defaults(func=run_compute)


# Subcommands: name -> function adding its parser (sets `func`). Other stages register theirs here.
SUBCOMMANDS = {"compute": add_compute_parser, "experts": add_experts_parser}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimoe-report", description="Reports on models: `compute` "
                                     "(default when the first argument is not a subcommand).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


@command
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "compute")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
