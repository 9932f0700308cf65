"""XLM-RoBERTa, DeBERTa-v2/v3 and ModernBERT teachers (tiny random configs of the real transformers classes):
their captured Q/K/V against what the HF model itself computes, a sentencepiece (Unigram) tokenizer trained
here on the bundled Wikipedia sample for the students and data prep, and XLM-R end to end through
`minimoe-prep build` (int32 shards) and a few distillation steps."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from transformers import (DebertaV2Config, DebertaV2Model, ModernBertConfig, ModernBertModel, XLMRobertaConfig,
                          XLMRobertaModel, XLMRobertaTokenizer)

from minimoe_common.tokenizer import load_tokenizer
from pipeline.models import Student, StudentConfig
from pipeline.models.teacher import Teacher
from pipeline.objectives import minilm_relation_loss

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data" / "wiki_sample" / "wiki_00"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0-3 (its <mask> is the last id)
FILLER = 1 << 16  # unused pieces after the specials: every trained piece gets an id above 65535
VOCAB = FILLER + 500  # and the 500 trained pieces, specials included
PEAKED = 0.2  # weight init std: 10x the usual, so that random attention is far from uniform and comparisons bite
SENTENCES = ["The cat sat on the mat.", "Anarchism is a political philosophy that rejects hierarchy, they say."]


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    """An XLM-R style sentencepiece tokenizer (Unigram + Metaspace, <s>=0 <pad>=1 </s>=2 <unk>=3) trained on the
    bundled sample: 500 pieces, and 65536 never-matching filler pieces after the specials, so that its vocabulary
    has 66036 ids and real text maps to ids above 65535, as XLM-R's 250K vocabulary does (training a 250K
    vocabulary would take minutes and needs far more text than the sample)."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import Unigram

    lines = [line for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line and not line.startswith("<")]
    trained = Tokenizer(Unigram())
    trained.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    trainer = trainers.UnigramTrainer(vocab_size=500, special_tokens=SPECIALS, unk_token="<unk>")
    trained.train_from_iterator(lines, trainer)
    pieces = [tuple(piece) for piece in json.loads(trained.to_str())["model"]["vocab"]]
    assert [p for p, _ in pieces[:5]] == SPECIALS
    filler = [(f"<unused{i}>", -1e4) for i in range(FILLER)]
    path = tmp_path_factory.mktemp("sp_tokenizer")
    XLMRobertaTokenizer(vocab=pieces[:5] + filler + pieces[5:], model_max_length=128).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sp_tokenizer(sp_tokenizer_dir):
    return load_tokenizer(str(sp_tokenizer_dir))


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, T, H = x.shape
    return x.view(B, T, num_heads, H // num_heads).transpose(1, 2)  # (B, nh, T, hd)


def attention_probs(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(hd)) per head, keys where key_mask (B, [nh,] T, T or B, T) is 0 masked."""
    qh, kh = split_heads(q, num_heads), split_heads(k, num_heads)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(qh.size(-1))
    if key_mask.dim() == 2:
        key_mask = key_mask[:, None, None, :]
    return scores.masked_fill(key_mask == 0, torch.finfo(scores.dtype).min).softmax(-1)


def relation_loss_is_zero(captured, reference, mask, num_heads: int) -> None:
    """The relation loss of the captured Q/K/V against the HF-computed ones (as the student side) vanishes."""
    loss, _ = minilm_relation_loss(reference, captured, mask, num_relation_heads=num_heads)
    assert abs(loss.item()) < 1e-6


def tiny_xlmr(vocab_size: int) -> XLMRobertaModel:
    torch.manual_seed(0)  # 130 positions = 128 tokens after RoBERTa's padding offset
    config = XLMRobertaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=130, type_vocab_size=1,
                              initializer_range=PEAKED, attn_implementation="eager")
    return XLMRobertaModel(config).eval()


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory, sp_tokenizer) -> Path:
    """A tiny random XLMRobertaModel with the trained sentencepiece tokenizer: a teacher dir."""
    path = tmp_path_factory.mktemp("xlmr")
    tiny_xlmr(len(sp_tokenizer)).save_pretrained(path)
    sp_tokenizer.save_pretrained(path)
    return path


def test_sentencepiece_tokenizer_has_xlmr_ids_and_a_vocabulary_above_uint16(sp_tokenizer):
    ids = sp_tokenizer(SENTENCES[0])["input_ids"]
    assert (ids[0], ids[-1], sp_tokenizer.pad_token_id, sp_tokenizer.unk_token_id) == (0, 2, 1, 3)
    assert len(sp_tokenizer) == VOCAB and min(ids[1:-1]) > 65535
    assert sp_tokenizer.decode(ids, skip_special_tokens=True) == SENTENCES[0]


@pytest.mark.parametrize("layer", [0, -1])
def test_xlm_roberta_qkv_reproduce_hf_attention_probabilities(xlmr_dir, sp_tokenizer, layer):
    teacher = Teacher.from_pretrained(xlmr_dir, layer=layer)
    assert (teacher.num_layers, teacher.num_heads, teacher.hidden_size, teacher.rope) == (2, 4, 64, None)
    batch = sp_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].eq(0).any()  # padding (id 1) is exercised
    qkv = teacher(**batch)
    hf = XLMRobertaModel.from_pretrained(xlmr_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(**batch, output_attentions=True, output_hidden_states=True)
        block = hf.encoder.layer[layer].attention.self
        hidden = out.hidden_states[teacher.layer]  # entering the layer (hidden_states[-1] is the last output)
        reference = [linear(hidden) for linear in (block.query, block.key, block.value)]
    torch.testing.assert_close(attention_probs(*qkv[:2], batch["attention_mask"], 4), out.attentions[layer],
                               atol=1e-5, rtol=1e-4)
    relation_loss_is_zero(qkv, reference, batch["attention_mask"], 4)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_deberta_v2_qkv_are_the_content_projections(tmp_path, version):
    """DeBERTa's attention is softmax(content Q·K + c2p + p2c): the captured Q/K/V are the query_proj/key_proj/
    value_proj outputs of the layer's input, so their scores miss the relative-position terms; adding the model's
    own disentangled_attention_bias of the captured Q/K gives back its attention probabilities."""
    torch.manual_seed(0)
    # v3 (deberta-v3-base): shared position keys, log buckets, no absolute positions; v2: own position projections.
    extra = (dict(share_att_key=True, position_buckets=16, position_biased_input=False, norm_rel_ebd="layer_norm")
             if version == "v3" else dict(share_att_key=False, position_biased_input=True))
    config = DebertaV2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=64, type_vocab_size=0,
                             relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                             initializer_range=PEAKED, **extra)
    DebertaV2Model(config).eval().save_pretrained(tmp_path)
    inputs = {"input_ids": torch.randint(5, 100, (2, 9)), "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3])}
    teacher = Teacher.from_pretrained(tmp_path, layer=1)
    q, k, v = teacher(**inputs, token_type_ids=torch.zeros(2, 9, dtype=torch.long))
    hf = DebertaV2Model.from_pretrained(tmp_path).eval()
    attention = hf.encoder.layer[1].attention.self
    with torch.no_grad():
        out = hf(**inputs, output_attentions=True, output_hidden_states=True)
        hidden = out.hidden_states[1]
        reference = [attention.query_proj(hidden), attention.key_proj(hidden), attention.value_proj(hidden)]
        for actual, expected in zip((q, k, v), reference):
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        relation_loss_is_zero((q, k, v), reference, inputs["attention_mask"], 4)

        mask = inputs["attention_mask"]
        pair_mask = (mask[:, None, :, None] * mask[:, None, None, :]).expand(-1, 4, -1, -1)  # DeBERTa's (B, nh, T, T)
        expected = out.attentions[1]
        content = attention_probs(q / math.sqrt(3), k, pair_mask, 4)  # DeBERTa scales by sqrt(3 hd) with c2p, p2c
        assert (content - expected).abs().max() > 1e-2  # the position terms matter
        qh, kh = (attention.transpose_for_scores(x, 4) for x in (q, k))  # (B * nh, T, hd)
        relative = hf.encoder.get_rel_pos(hidden)
        bias = attention.disentangled_attention_bias(qh, kh, relative, hf.encoder.get_rel_embedding(), 3)
        scores = (qh @ kh.transpose(-1, -2) / math.sqrt(3 * qh.size(-1)) + bias).view(2, 4, 9, 9)
        full = scores.masked_fill(pair_mask == 0, torch.finfo(scores.dtype).min).softmax(-1)
        torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def modernbert_dir(tmp_path_factory) -> Path:
    """Tiny ModernBERT: 3 layers, global attention on layers 0 and 2, a +-2 token sliding window on layer 1."""
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=96, global_attn_every_n_layers=2, local_attention=4,
                              initializer_range=PEAKED, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              cls_token_id=1, sep_token_id=2)
    path = tmp_path_factory.mktemp("modernbert")
    ModernBertModel(config).eval().save_pretrained(path)
    return path


MODERNBERT_INPUTS = {"input_ids": torch.randint(5, 100, (2, 10), generator=torch.Generator().manual_seed(0)),
                     "attention_mask": torch.tensor([[1] * 10, [1] * 7 + [0] * 3])}


def modernbert_reference(path: Path, layer: int):
    """(the eager model's output, Q/K/V pre-RoPE as the split of Wqkv, Q/K post-RoPE by HF's
    apply_rotary_pos_emb) of `layer`."""
    from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

    hf = ModernBertModel.from_pretrained(path, attn_implementation="eager").eval()
    block = hf.layers[layer]
    with torch.no_grad():
        out = hf(**MODERNBERT_INPUTS, output_attentions=True, output_hidden_states=True)
        hidden = out.hidden_states[layer]
        pre = block.attn.Wqkv(block.attn_norm(hidden)).chunk(3, dim=-1)
        cos, sin = hf.rotary_emb(hidden, torch.arange(10)[None], block.attention_type)
        post = apply_rotary_pos_emb(*(split_heads(x, 4) for x in pre[:2]), cos, sin)  # (B, nh, T, hd) each
    post = [x.transpose(1, 2).flatten(2) for x in post]
    return out, pre, post


@pytest.mark.parametrize("layer", [0, 1])
def test_modernbert_qkv_split_wqkv_and_rotate_as_the_model(modernbert_dir, layer):
    out, pre, post = modernbert_reference(modernbert_dir, layer)
    mask = MODERNBERT_INPUTS["attention_mask"]
    pre_teacher = Teacher.from_pretrained(modernbert_dir, layer=layer, rope="pre")
    for actual, expected in zip(pre_teacher(**MODERNBERT_INPUTS), pre):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    teacher = Teacher.from_pretrained(modernbert_dir, layer=layer)  # post-RoPE by default
    assert (teacher.rope, teacher.num_heads, teacher.hidden_size) == ("post", 4, 64)
    q, k, v = teacher(**MODERNBERT_INPUTS)
    for actual, expected in zip((q, k, v), [*post, pre[2]]):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    relation_loss_is_zero((q, k, v), [*post, pre[2]], mask, 4)
    # Post-RoPE Q/K give the model's attention: over every real key on the global layer 0, only within the
    # +-2 window on the local layer 1, where the relations (every real pair) see more than the model attends to.
    positions = torch.arange(10)
    window = ((positions[:, None] - positions[None, :]).abs() <= 2)[None, None]
    full = attention_probs(q, k, mask, 4)
    windowed = attention_probs(q, k, mask[:, None, None, :] * window, 4)
    real = mask.bool()[:, None, :, None].expand_as(full)  # compare real query rows
    torch.testing.assert_close((full if layer == 0 else windowed)[real], out.attentions[layer][real],
                               atol=1e-5, rtol=1e-4)
    if layer == 1:
        assert (full - out.attentions[layer])[real].abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"rope must be 'post' or 'pre' \(got 'mid'\)"):
        Teacher.from_pretrained(modernbert_dir, rope="mid")


def test_students_take_the_sentencepiece_tokenizer(sp_tokenizer):
    from pipeline import distill
    from pipeline.distill import DistillConfig

    preset = StudentConfig.from_preset("4L192H", tokenizer=sp_tokenizer, num_experts=4)
    flags = distill.student_config(DistillConfig(teacher="t", shards="s", layers=1, hidden=64, heads=4), sp_tokenizer)
    for config in (preset, flags):
        assert (config.vocab_size, config.pad_token_id, config.cls_token_id, config.sep_token_id) == (VOCAB, 1, 0, 2)
    student = Student(flags).eval()
    batch = sp_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    out = student(batch["input_ids"], batch["attention_mask"])
    assert student.embeddings.word_embeddings.padding_idx == 1 and torch.isfinite(out.last_hidden_state).all()


def test_xlm_roberta_end_to_end_int32_shards_then_distillation(xlmr_dir, sp_tokenizer, tmp_path, monkeypatch, capsys):
    from data_prep.__main__ import main as prep
    from test_distill import run_in_process

    shards = tmp_path / "shards"
    assert prep(["build", "--input", str(SAMPLE), "--output", str(shards), "--tokenizer", str(xlmr_dir),
                 "--max-seq-length", "64", "--workers", "1"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == VOCAB
    assert manifest["tokenizer"]["special_ids"] == {"cls_token": 0, "sep_token": 2, "pad_token": 1, "mask_token": 4,
                                                    "unk_token": 3}
    table = pa.ipc.open_stream(pa.memory_map(str(shards / "shard-00000.arrow"))).read_all()
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    ids = table.column("input_ids")[0].as_py()  # <s> A </s> B </s> with the tokenizer's own ids
    assert ids[0] == 0 and ids[-1] == 2 and ids.count(2) == 2 and min(set(ids) - {0, 2}) > 65535
    assert sp_tokenizer.decode(ids[1:ids.index(2)]) in SAMPLE.read_text(encoding="utf-8")

    run = tmp_path / "run"
    args = ["--teacher", str(xlmr_dir), "--shards", str(shards), "--output", str(run), "--layers", "1",
            "--hidden", "64", "--heads", "4", "--experts", "2", "--relation-heads", "4", "--micro-batch-size", "4",
            "--global-batch-size", "4", "--max-steps", "2", "--log-every", "1",
            "--deepspeed-config", str(REPO / "ds_configs" / "zero0.json")]
    assert run_in_process(monkeypatch, args) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    state = json.loads((run / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    student = state["student"]
    assert [student[k] for k in ("vocab_size", "pad_token_id", "cls_token_id", "sep_token_id")] == [VOCAB, 1, 0, 2]


@pytest.mark.parametrize("kind", ["packaged BERT WordPiece", "sentencepiece Unigram"])
def test_data_preps_tokenizer_reads_what_transformers_reads(kind, teacher_dir, sp_tokenizer_dir):
    """Data prep reads tokenizer dirs with the `tokenizers` library alone; the distiller checks its fingerprint
    against transformers' tokenizer of the teacher, so the two must agree on everything that decides the ids."""
    from data_prep.build import open_tokenizer
    from minimoe_common.tokenizer import special_ids, tokenizer_fingerprint

    path = teacher_dir if kind.startswith("packaged") else sp_tokenizer_dir
    (light, encoder), full = open_tokenizer(str(path)), load_tokenizer(str(path))
    assert (len(light), light.model_max_length) == (len(full), full.model_max_length)
    assert special_ids(light) == special_ids(full) and None not in (light.cls_token_id, light.sep_token_id)
    assert tokenizer_fingerprint(light) == tokenizer_fingerprint(full)
    for text in SENTENCES:
        ids = full(text, add_special_tokens=False)["input_ids"]
        assert encoder.encode(text, add_special_tokens=False).ids == ids
        assert light.decode(ids) == full.decode(ids)
