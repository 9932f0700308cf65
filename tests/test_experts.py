"""Expert SVD analysis on matrices with known spectra, and the compression round trip."""
import pytest
import torch

from pipeline.experts import THRESHOLDS, analyse, factored_params, kept_rank, normalised_singular_values
from pipeline.models import Student, StudentConfig


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


def test_compression_round_trip(tmp_path, teacher_dir):
    from minimoe_common.tokenizer import load_tokenizer
    from pipeline.compress import compress, main
    from pipeline.models import LowRankLinear, StudentForSequenceClassification

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(teacher_dir))
    student = Student(StudentConfig(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64,
                                    vocab_size=len(tokenizer), num_experts=2, router_noise=None)).eval()
    with torch.no_grad():  # every FFN matrix of rank 3: a threshold of 1e-6 keeps all its non-zero values
        for linear in student.ffn_linears().values():
            linear.weight.copy_(matrix_with_spectrum([1.0, 0.4, 0.2], tuple(linear.weight.shape), seed=len(linear.weight)))
    source, target = tmp_path / "student", tmp_path / "compressed"
    student.save_pretrained(source)
    tokenizer.save_pretrained(str(source))
    assert main([str(source), str(target), "--threshold", "1e-6"]) == 0
    loaded = Student.from_pretrained(target).eval()
    assert set(loaded.config.ffn_ranks.values()) == {3} and len(loaded.config.ffn_ranks) == 8  # 2 layers x 2 experts x 2
    assert all(isinstance(m, LowRankLinear) for m in loaded.ffn_linears().values())
    ids = torch.randint(1000, 2000, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        expected, got = student(ids, mask).last_hidden_state, loaded(ids, mask).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    ffn = sum(p.numel() for m in student.ffn_linears().values() for p in m.parameters())
    ffn_kept = 8 * (3 * (64 + 32)) + 4 * (64 + 32)  # factors + the biases of fc1 (64) and fc2 (32) per expert
    params = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert params(student) - params(loaded) == ffn - ffn_kept
    assert size(source) - size(target) > 4 * (ffn - ffn_kept) - 2048  # float32 bytes, up to a longer header
    assert compress(loaded, 1e-6).config.ffn_ranks == loaded.config.ffn_ranks  # compressing again changes nothing
    # still finetunes: a task head loads the compressed encoder and its factors get gradients
    head = StudentForSequenceClassification.from_pretrained(target, num_labels=2)
    head(ids, mask, labels=torch.tensor([0, 1, 1])).loss.backward()
    factor = next(iter(head.student.ffn_linears().values())).down.weight
    assert factor.grad is not None and factor.grad.abs().sum() > 0


def test_compress_refuses_bad_input(tmp_path, capsys):
    from pipeline.compress import main

    assert main([str(tmp_path), str(tmp_path / "out"), "--threshold", "1.5"]) == 2
    assert "error: --threshold 1.5: must be in [0, 1)" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
