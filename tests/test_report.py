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
    assert round(report.gflops, 2) == gflops
    if params_m is not None:
        assert round(report.total_params / 1e6, 1) == params_m


# By hand, 3L;384H with the bert-base-uncased vocabulary: embeddings (word, position, segment, LayerNorm),
# per layer attention Q/K/V/output + 2 LayerNorms, an FFN expert fc1 + fc2, the router Linear(384, 4) with
# bias, and MiniMoE's relation projection Q/K/V Linear(384, 384) on the last hidden state.
EMBEDDINGS = 30522 * 384 + 512 * 384 + 2 * 384 + 2 * 384
ATTENTION = 4 * (384 * 384 + 384) + 2 * 2 * 384
FFN = 2 * 384 * 1536 + 1536 + 384
ROUTER = 384 * 4 + 4
PROJECTION = 3 * (384 * 384 + 384)


def test_minimoe_3l384h_counts_by_hand():
    dense = compute_report("3L384H", throughput=False)
    moe = compute_report("3L384H", 4, throughput=False)
    assert dense.total_params == dense.deployable_params == EMBEDDINGS + 3 * (ATTENTION + FFN) == 17_241_984
    assert moe.total_params == EMBEDDINGS + 3 * (ATTENTION + 4 * FFN + ROUTER) + PROJECTION == 28_324_236
    assert moe.deployable_params == moe.total_params - PROJECTION == 27_880_716
    assert moe.layer_params == 16_405_644  # the paper's "16.4M" transformer parameters (its SVD table)
    assert moe.active_layer_params - dense.active_layer_params == 3 * ROUTER  # one expert per token
    assert round(moe.gflops, 2) == round(dense.gflops, 2) == 0.68  # the router adds 0.0006
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


def test_tinybert_4l312h_preset_by_hand():
    """TinyBERT's general-distillation student: 4 layers, hidden 312, FFN 1200, 12 heads (Jiao et al. 2020)."""
    embeddings = 30522 * 312 + 512 * 312 + 2 * 312 + 2 * 312
    layer = 4 * (312 * 312 + 312) + 2 * 2 * 312 + (312 * 1200 + 1200) + (1200 * 312 + 312)
    report = compute_report("4L312H", None, throughput=False)
    assert (report.embedding_params, report.layer_params) == (embeddings, 4 * layer) == (9_683_856, 4_568_736)
    assert report.total_params == 14_252_592  # TinyBERT's 14.5M also counts BERT's pooler and its 312 -> 768 W_h
    assert report.gflops == pytest.approx(4 * layer * 128 / 1e9)  # the paper's convention: params x tokens
