"""Compute report against the paper's Table 1 columns (params and GFLOPs of a 128-token sequence)."""
from __future__ import annotations

import json

import pytest
from transformers import BertConfig

from pipeline.report import compute_report, main


@pytest.mark.parametrize("spec, experts, params_m, gflops", [
    ("3L384H", None, 17.2, 0.68),   # MiniLM 3L;384H
    ("3L384H", 4, 28.3, 0.68),      # MiniMoE 3L;384H: ~E x the FFN parameters, the same compute
    ("4L384H", None, None, 0.91),
    ("6L384H", None, None, 1.36),
    ("4L192H", None, None, 0.23),
])
def test_student_numbers_match_the_paper(spec, experts, params_m, gflops):
    report = compute_report(spec, experts, throughput=False)
    assert report.gflops == pytest.approx(gflops, rel=0.01)
    if params_m is not None:  # the paper's MiniMoE has a few extra parts (pooler); 2% tolerance
        assert report.total_params / 1e6 == pytest.approx(params_m, rel=0.02)


def test_moe_active_params_are_the_dense_ones_plus_the_router():
    dense = compute_report("3L384H", throughput=False)
    moe = compute_report("3L384H", 4, throughput=False)
    ffn = 2 * 384 * 1536 + 1536 + 384  # one expert: fc1 + fc2 with biases
    assert moe.layer_params - dense.layer_params == 3 * (3 * ffn + 4 * 384)  # 3 more experts + router, 3 layers
    assert moe.active_layer_params - dense.active_layer_params == 3 * 4 * 384
    assert moe.embedding_params == dense.embedding_params == 30522 * 384 + 512 * 384 + 2 * 384 + 2 * 384


def test_bert_base_dir_matches_the_paper(tmp_path):
    BertConfig().save_pretrained(tmp_path)  # bert-base-uncased shape; weights are not needed
    report = compute_report(str(tmp_path), throughput=False)
    assert report.total_params / 1e6 == pytest.approx(109.5, rel=0.002)
    assert report.gflops == pytest.approx(10.9, rel=0.005)


def test_real_teacher_dir_and_cli(teacher_dir, capsys):
    assert main(["compute", str(teacher_dir), "--no-throughput", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["total_params"] / 1e6 == pytest.approx(22.7, rel=0.01)  # all-MiniLM-L6-v2's size
    assert row["gflops"] == pytest.approx(1.36, rel=0.01)
    assert main(["4L192H", "--no-throughput"]) == 0  # `compute` is the default subcommand
    assert "| 4L192H | 7.7 |" in capsys.readouterr().out
    assert main(["no/such/model", "--no-throughput"]) == 2
    assert capsys.readouterr().err.startswith("error: no/such/model: not a preset")
