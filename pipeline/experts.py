"""Expert SVD analysis: the paper's memory-efficiency table (Zhang et al. 2023, Sec. 5).

For the dense student, and for each expert of a MiniMoE student, the share of the FFN weight matrices'
singular values (each normalised by its matrix's largest) above 0.2, 0.1 and 0.05, and how many of the
transformer's parameters a rank truncation at 0.1 would keep: a matrix (out, in) of kept rank r costs
r x (out + in) as two factors, or out x in if that is smaller. Experts with a fast-decaying spectrum
are compressible; pipeline.compress applies the truncation.

    python -m pipeline.report experts DIR
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.models import EXPERT_KEY, LowRankLinear, Student
from pipeline.models.hf_export import load_student

THRESHOLDS = (0.2, 0.1, 0.05)
KEEP_THRESHOLD = 0.1


def normalised_singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D weight divided by the largest, descending."""
    values = torch.linalg.svdvals(weight.detach().double())
    return values / values[0]


def ffn_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of an FFN Linear, or the product of a LowRankLinear's factors."""
    return module.up.weight @ module.down.weight if isinstance(module, LowRankLinear) else module.weight


def kept_rank(weight: torch.Tensor, threshold: float) -> int:
    """Number of normalised singular values above `threshold` (at least 1)."""
    return max(1, int((normalised_singular_values(weight) > threshold).sum()))


def factored_params(shape: tuple[int, int], rank: int) -> int:
    """Weight parameters of a (out, in) matrix stored as rank-`rank` factors, or dense if that is smaller."""
    out_features, in_features = shape
    return min(rank * (out_features + in_features), out_features * in_features)


@dataclass
class SpectrumRow:
    """One row of the table: the dense FFN or one expert, over all layers and both FFN matrices."""

    name: str
    above: dict[float, int] = field(default_factory=lambda: dict.fromkeys(THRESHOLDS, 0))
    singular_values: int = 0
    params: int = 0
    params_kept: int = 0

    def share(self, threshold: float) -> float:
        return self.above[threshold] / self.singular_values


@dataclass
class ExpertReport:
    rows: list[SpectrumRow]
    transformer_params: int
    """Parameters of the transformer layers (attention, FFNs or experts, router, norms; no embeddings)."""
    transformer_params_kept: int
    """The same after truncating every FFN matrix at `threshold`."""
    threshold: float = KEEP_THRESHOLD

    def markdown(self) -> str:
        head = " | ".join(f"SV > {t}" for t in THRESHOLDS)
        lines = [f"| FFN | {head} | FFN params | kept at {self.threshold} |", "|---|" + "---:|" * (len(THRESHOLDS) + 2)]
        for row in self.rows:
            shares = " | ".join(f"{100 * row.share(t):.1f}%" for t in THRESHOLDS)
            lines.append(f"| {row.name} | {shares} | {row.params / 1e6:.2f} M | {row.params_kept / 1e6:.2f} M |")
        kept = self.transformer_params_kept / self.transformer_params
        lines.append(f"\nTransformer params: {self.transformer_params / 1e6:.2f} M -> {self.transformer_params_kept / 1e6:.2f} M "
                     f"kept at threshold {self.threshold} ({100 * kept:.1f}%).")
        return "\n".join(lines) + "\n"


def ffn_group(name: str) -> str:
    """'dense' or 'expert E' for an FFN Linear's module path."""
    match = EXPERT_KEY.match(name)
    return "dense" if match is None else f"expert {match[2]}"


def analyse(student: Student, threshold: float = KEEP_THRESHOLD) -> ExpertReport:
    """The memory-efficiency table of a loaded student."""
    rows: dict[str, SpectrumRow] = defaultdict(lambda: SpectrumRow(""))
    saved = 0
    for name, module in student.ffn_linears().items():
        row = rows[ffn_group(name)]
        row.name = ffn_group(name)
        weight = ffn_weight(module)
        spectrum = normalised_singular_values(weight)
        for t in THRESHOLDS:
            row.above[t] += int((spectrum > t).sum())
        row.singular_values += len(spectrum)
        params = sum(p.numel() for p in module.parameters())
        kept = min(params, factored_params(tuple(weight.shape), kept_rank(weight, threshold)) + weight.shape[0])  # + bias
        row.params += params
        row.params_kept += kept
        saved += params - kept
    total = sum(p.numel() for p in student.layers.parameters())
    order = sorted(rows, key=lambda g: (g != "dense", int(g.split()[-1]) if g != "dense" else 0))
    return ExpertReport([rows[g] for g in order], total, total - saved, threshold)


def add_experts_parser(subparsers) -> None:
    """`python -m pipeline.report experts DIR [DIR ...]` (registered in pipeline/report.py)."""
    p = subparsers.add_parser("experts", help="singular-value spectrum of the FFN / each expert (memory-efficiency table)")
    p.add_argument("models", nargs="+", help="exported student dirs (dense or MiniMoE; finetuned head dirs too)")
    p.add_argument("--threshold", type=float, default=KEEP_THRESHOLD, help="threshold of the params-kept column")
    p.set_defaults(func=lambda args: print("\n".join(f"## {m}\n\n" + analyse(load_student(m), args.threshold).markdown()
                                                    for m in args.models)))
