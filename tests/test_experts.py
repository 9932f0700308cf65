"""Expert SVD analysis on matrices with known spectra, and the compression round trip."""
import pytest
import torch

from pipeline.experts import THRESHOLDS, analyse, factored_params, kept_rank, normalised_singular_values
from pipeline.model import Student, StudentConfig


def matrix_with_spectrum(singular_values, shape, seed=0):
    """U diag(s) V^T with random orthonormal U (out, k) and V (in, k)."""
    generator = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=generator, dtype=torch.float64))
    return (u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def test_known_spectrum():
    spectrum = [4.0, 2.0, 0.6, 0.3, 0.1, 0.0]  # normalised: 1, .5, .15, .075, .025, 0
    weight = matrix_with_spectrum(spectrum, (8, 6))
    assert normalised_singular_values(weight).tolist() == pytest.approx([1, 0.5, 0.15, 0.075, 0.025, 0], abs=1e-9)
    assert [kept_rank(weight, t) for t in THRESHOLDS] == [2, 3, 4]  # > 0.2, > 0.1, > 0.05
    assert factored_params((8, 6), 3) == 3 * (8 + 6)
    assert factored_params((8, 6), 5) == 8 * 6  # factors would be larger than the matrix


def tiny_student(num_experts):
    return Student(StudentConfig(num_layers=2, hidden_size=24, num_heads=2, intermediate_size=32, vocab_size=50,
                                 num_experts=num_experts, router_noise=None))


@torch.no_grad()
def test_table_groups_experts_and_counts_params():
    torch.manual_seed(0)
    student = tiny_student(num_experts=2)
    # expert 1 of both layers: rank-3 matrices with spectrum 1, .5, .08 -> 2 above 0.2/0.1, 3 above 0.05
    low_rank = {}
    for name, linear in student.ffn_linears().items():
        if ".deepspeed_experts.1." in name:
            linear.weight.copy_(matrix_with_spectrum([1.0, 0.5, 0.08], tuple(linear.weight.shape)))
            low_rank[name] = linear
    assert len(low_rank) == 4  # 2 layers x (fc1, fc2)
    report = analyse(student)
    assert [row.name for row in report.rows] == ["expert 0", "expert 1"]
    expert1 = report.rows[1]
    assert expert1.singular_values == 4 * 24  # min(32, 24) per matrix
    assert [expert1.above[t] for t in THRESHOLDS] == [2 * 4, 2 * 4, 3 * 4]
    # fc1 (32, 24) and fc2 (24, 32) at rank 2: 2 x 56 weights each, plus the biases (32 + 24) per layer
    assert expert1.params_kept == 2 * (2 * 2 * 56 + 32 + 24)
    assert expert1.params == 2 * (2 * 32 * 24 + 32 + 24)
    transformer = sum(p.numel() for p in student.layers.parameters())
    saved = sum(row.params - row.params_kept for row in report.rows)
    assert (report.transformer_params, report.transformer_params_kept) == (transformer, transformer - saved)
    assert "| expert 1 | 8.3% | 8.3% | 12.5% |" in report.markdown()  # 8/96, 8/96, 12/96
