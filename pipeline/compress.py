"""Compress a student's FFN matrices (dense FFN and every expert) into truncated-SVD low-rank factors.

The paper leaves this as future work after its memory-efficiency table (Sec. 5): experts with a
fast-decaying singular-value spectrum lose little when truncated. Each FFN matrix W (out, in) keeps
the singular values above `threshold` x the largest, W ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T), stored as
`pipeline.models.LowRankLinear` (down: (r, in), up: (out, r) + the original bias) where that is smaller
than W. The input is an exported student dir (a dense one exported as BERT too); the output is a normal student
dir (config.json records `ffn_ranks`, so it is not BERT any more): it loads, finetunes and can be compressed again.

    python -m pipeline.compress DIR OUT --threshold 0.1
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from minimoe_common.cli import check_output_dir, command
from minimoe_common.files import written_dir
from minimoe_common.tokenizer import load_tokenizer
from pipeline.experts import KEEP_THRESHOLD, factored_params, ffn_weight, kept_rank
from pipeline.models import LowRankLinear, Student
from pipeline.models.files import read_model_config
from pipeline.models.hf_export import load_student


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (r, in), up (out, r)) with up @ down = the best rank-r approximation of weight (out, in)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(weight.dtype), (u[:, :rank] * root).to(weight.dtype)


@torch.no_grad()
def compress(student: Student, threshold: float = KEEP_THRESHOLD) -> Student:
    """A new student whose FFN matrices are truncated at `threshold` wherever the factors are smaller."""
    ranks, state = dict(student.config.ffn_ranks or {}), student.state_dict()
    for path, module in student.ffn_linears().items():
        weight = ffn_weight(module)
        rank = kept_rank(weight, threshold)
        if not isinstance(module, LowRankLinear) and factored_params(tuple(weight.shape), rank) >= weight.numel():
            continue  # factors would not be smaller: keep the matrix
        bias = module.up.bias if isinstance(module, LowRankLinear) else module.bias
        for key in [k for k in state if k.startswith(path + ".")]:
            del state[key]
        state[f"{path}.down.weight"], state[f"{path}.up.weight"] = low_rank_factors(weight, rank)
        state[f"{path}.up.bias"] = bias
        ranks[path] = rank
    compressed = Student(dataclasses.replace(student.config, ffn_ranks=ranks or None))
    compressed.load_state_dict(state)
    return compressed


def compress_dir(model_dir: str | Path, output: str | Path, threshold: float) -> dict:
    """Compress an exported student dir into `output` (written under a temporary name, then renamed)."""
    model_dir, output = Path(model_dir), Path(output)
    if read_model_config(model_dir).get("architectures") not in (None, ["Student"], ["BertModel"]):
        raise ValueError(f"{model_dir}: a finetuned task-head dir; compress the exported student, then finetune it")
    student = load_student(model_dir)
    compressed = compress(student, threshold)
    with written_dir(output) as tmp:
        compressed.save_pretrained(tmp)
        load_tokenizer(str(model_dir)).save_pretrained(str(tmp))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    return {"threshold": threshold, "params_before": count(student), "params_after": count(compressed),
            "layer_params_before": count(student.layers), "layer_params_after": count(compressed.layers),
            "low_rank_matrices": len(compressed.config.ffn_ranks or {}), "ffn_matrices": len(student.ffn_linears())}


@command
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="minimoe-compress", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="exported student dir (dense or MiniMoE)")
    parser.add_argument("output", help="output dir for the compressed student")
    parser.add_argument("--threshold", type=float, default=KEEP_THRESHOLD,
                        help="keep singular values above this fraction of each matrix's largest (default 0.1)")
    args = parser.parse_args(argv)
    if not 0 <= args.threshold < 1:
        raise ValueError(f"--threshold {args.threshold}: must be in [0, 1)")
    check_output_dir(args.output, "output")
    summary = compress_dir(args.model, args.output, args.threshold)
    print(f"{summary['low_rank_matrices']} of {summary['ffn_matrices']} FFN matrices factored; params "
          f"{summary['params_before'] / 1e6:.2f} M -> {summary['params_after'] / 1e6:.2f} M (transformer layers "
          f"{summary['layer_params_before'] / 1e6:.2f} M -> {summary['layer_params_after'] / 1e6:.2f} M); wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
