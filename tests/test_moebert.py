"""minimoe-moebert (pipeline.baselines.moebert) and minimoe-finetune --moebert-distill: the importance against the authors'
per-example weight-gradient loop, the split by hand, experts of the whole FFN giving the teacher's logits (and
smaller ones, in eval, the teacher cut to expert 0's neurons), the distillation loss by hand, the written dir
distilled through the real engine, and the one-line refusals."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_finetune import SST2_SLICE, _tensorboard_tags, one_process_group, tokenizer  # noqa: F401 (fixtures)
from test_pkd import tiny_bert

from pipeline.finetune import main as finetune_main
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.run import distillation_loss
from pipeline.models import StudentForSequenceClassification
from pipeline.models.hf_export import load_student_head
from pipeline.baselines.moebert import expert_neurons, main, moebert_student, neuron_importance
from pipeline.baselines.prune import pruned
from pipeline.tasks import get_task


def random_batches(sizes: list[int], vocab: int, num_labels: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Batches of random 10-token sequences (every second one padded after token 6) with random labels."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        ids = torch.randint(1000, vocab, (size, 10), generator=generator)
        mask = torch.ones_like(ids)
        mask[1::2, 6:] = 0
        labels = (torch.rand(size, generator=generator, dtype=torch.float64) if num_labels == 1
                  else torch.randint(0, num_labels, (size,), generator=generator))
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def authors_importance(bert, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The authors' loop (modeling_bert.py, `preprocess_importance`), on transformers' BERT: per example,
    autograd.grad of its loss w.r.t. each layer's W1 (intermediate.dense) and W2 (output.dense);
    |sum_k W1[j, k] g1[j, k] + sum_k W2[k, j] g2[k, j]|, summed over examples."""
    layers = bert.bert.encoder.layer
    scores = [torch.zeros(layer.intermediate.dense.out_features, dtype=torch.float64) for layer in layers]
    for batch in batches:
        logits = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if logits.size(-1) == 1:
            losses = torch.nn.functional.mse_loss(logits.view(-1), batch["labels"], reduction="none")
        else:
            losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        for score, layer in zip(scores, layers):
            w1, w2 = layer.intermediate.dense.weight, layer.output.dense.weight
            for loss in losses:
                g1 = torch.autograd.grad(loss, w1, retain_graph=True)[0]
                g2 = torch.autograd.grad(loss, w2, retain_graph=True)[0]
                score += ((w1 * g1).sum(1) + (w2 * g2).sum(0)).abs()
    return scores


def bert_head(path: Path, tokenizer, num_labels: int = 2) -> Path:
    """tiny_bert (2L;64H, FFN 128) with `num_labels` outputs (1: regression, a new random classifier)."""
    from transformers import BertForSequenceClassification

    tiny_bert(path, tokenizer, layers=2, hidden=64)
    if num_labels != 2:
        BertForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                      ignore_mismatched_sizes=True).save_pretrained(path)
    return path


@pytest.mark.parametrize("num_labels", [2, 1])
def test_importance_equals_the_authors_per_example_gradient_loop(tmp_path, tokenizer, num_labels):
    """Our one backward with (B, 1, width) masks per batch against their loop of per-example weight gradients, in
    float64, over two batches (5 and 3 examples, some padded): the scores of every neuron of both layers agree.
    The per-example absolute value matters: |sum over a batch| would be smaller."""
    from transformers import BertForSequenceClassification

    directory = bert_head(tmp_path / "bert", tokenizer, num_labels)
    bert = BertForSequenceClassification.from_pretrained(directory).double().eval()
    batches = random_batches([5, 3], len(tokenizer), num_labels)
    expected = authors_importance(bert, batches)
    ours = neuron_importance(load_student_head(directory, token=False).double(), iter(dict(b) for b in batches))
    for score, reference in zip(ours, expected, strict=True):
        torch.testing.assert_close(score, reference, rtol=1e-9, atol=1e-12)
    assert all(s.min() > 0 for s in ours)


def test_split_by_hand():
    """10 neurons scored 5 9 1 7 3 8 0 6 2 4: by importance 1 5 3 7 0 9 4 8 2 6. Shared 3: 1 5 3; the rest
    7 0 9 4 8 2 6 round-robin over 2 experts: 7 9 8 6 and 0 4 2; cut to 5: 1 5 3 7 9 and 1 5 3 0 4."""
    scores = torch.tensor([5.0, 9, 1, 7, 3, 8, 0, 6, 2, 4])
    assert [e.tolist() for e in expert_neurons(scores, 2, 5, 3)] == [[1, 5, 3, 7, 9], [1, 5, 3, 0, 4]]
    assert [e.tolist() for e in expert_neurons(scores, 2, 10, 10)] == [[1, 5, 3, 7, 0, 9, 4, 8, 2, 6]] * 2
    assert [e.tolist() for e in expert_neurons(torch.ones(4), 2, 2, 0)] == [[0, 2], [1, 3]]  # ties: lower index


@pytest.mark.parametrize("experts, routing", [(4, "learned"), (3, "learned"), (3, "hash")])
def test_experts_of_the_whole_ffn_compute_the_teacher(tmp_path, tokenizer, experts, routing):
    """Experts = the whole FFN (expert size = shared = width). Learned router: at zero every token's gate value is
    p = 1/E, each expert's fc2 is E x the teacher's, so p x E x FFN(x) = FFN(x) (x E and x 1/E are exact for
    E = 4, a power of two; not for 3). Hash routing: each token's expert, unscaled, is the teacher's FFN. Either
    way the student's logits are the BERT teacher's within rounding."""
    from transformers import BertForSequenceClassification

    directory = bert_head(tmp_path / "bert", tokenizer)
    teacher = BertForSequenceClassification.from_pretrained(directory).eval()
    dense = load_student_head(directory, token=False).eval()
    neurons = [[torch.arange(128)] * experts for _ in range(2)]
    student = moebert_student(dense, neurons, balance_weight=0.0, routing=routing).eval()
    batch = {k: v for k, v in random_batches([4], len(tokenizer), 2)[0].items() if k != "labels"}
    with torch.no_grad():
        out = student(**batch)
        torch.testing.assert_close(out.logits, teacher(**batch).logits, atol=1e-5, rtol=0)
    gate = student.student.layers[0].ffn.deepspeed_moe.gate
    if routing == "learned":
        assert gate.wg.weight.abs().sum() == 0 and gate.wg.bias.abs().sum() == 0
    else:  # no router parameters; the tokens spread over the experts by id
        assert not list(gate.parameters()) and all(int((c > 0).sum()) == experts for c in out.expert_counts)


def test_smaller_experts_start_as_the_teacher_cut_to_expert_zero(tmp_path, tokenizer):
    """In eval the zero router's logits tie and every token goes to expert 0: the student equals the teacher
    pruned to expert 0's neurons in each layer (pipeline.baselines.prune.pruned, every head kept)."""
    directory = bert_head(tmp_path / "bert", tokenizer)
    dense = load_student_head(directory, token=False).eval()
    neurons = [expert_neurons(torch.randn(128), 4, 40, 24) for _ in range(2)]
    student = moebert_student(dense, neurons, balance_weight=0.0).eval()
    cut = pruned(dense, [torch.arange(4)] * 2, [layer[0].sort().values for layer in neurons])
    batch = {k: v for k, v in random_batches([4], len(tokenizer), 2)[0].items() if k != "labels"}
    with torch.no_grad():
        out = student(**batch)
        torch.testing.assert_close(out.logits, cut(**batch).logits, atol=1e-5, rtol=0)
    assert [c.tolist() for c in out.expert_counts] == [[int(batch["attention_mask"].sum()), 0, 0, 0]] * 2


@pytest.mark.parametrize("num_labels", [2, 1])
def test_distillation_loss_by_hand(tmp_path, num_labels):
    """task loss + 5 x (sum over the 3 states of the MSE over real tokens x H + prediction loss), the prediction
    loss the symmetric KL 1/2 sum_c (p - q)(log p - log q) averaged over examples (MSE for regression)."""
    torch.manual_seed(0)
    B, T, H = 2, 3, 2
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])

    def output() -> SimpleNamespace:  # the embeddings' state and two layers'
        return SimpleNamespace(logits=torch.randn(B, num_labels), hidden_states=tuple(torch.randn(B, T, H) for _ in range(3)))

    student, teacher = output(), output()
    labels = torch.tensor([0.3, 0.9]) if num_labels == 1 else torch.tensor([0, 1])
    task = get_task("stsb" if num_labels == 1 else "sst2")
    config = FinetuneConfig("M", task.name, "D", str(tmp_path), teacher="T", moebert_distill=5.0)
    pairs = [(0, 0), (1, 1), (2, 2)]
    loss, terms = distillation_loss(task, student, teacher, labels, mask, config, pairs)

    hidden = 0.0
    for s, t in zip(student.hidden_states, teacher.hidden_states):
        squares = [float((s[b, i] - t[b, i]).square().sum()) for b in range(B) for i in range(T) if mask[b, i]]
        hidden += sum(squares) / (len(squares) * H)
    s, t = student.logits.double(), teacher.logits.double()
    if num_labels == 1:
        prediction = float((s - t).square().mean())
        task_term = float((s.squeeze(1) - labels).square().mean())
    else:
        p, q = torch.softmax(s, 1), torch.softmax(t, 1)
        prediction = sum(0.5 * float(((p[b] - q[b]) * (p[b].log() - q[b].log())).sum()) for b in range(B)) / B
        task_term = -sum(math.log(p[b, labels[b]]) for b in range(B)) / B
    assert terms["hidden_loss"].item() == pytest.approx(hidden, rel=1e-5)
    assert terms["prediction_loss"].item() == pytest.approx(prediction, rel=1e-5)
    assert loss.item() == pytest.approx(task_term + 5 * (hidden + prediction), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tokenizer) -> Path:
    """A random tiny BertForSequenceClassification (4L;64H, FFN 128, 2 labels), as minimoe-finetune writes one."""
    return tiny_bert(tmp_path_factory.mktemp("teacher") / "model", tokenizer, layers=4, hidden=64)


def convert(model: Path, output: Path, *flags: str) -> int:
    return main([str(model), str(output), "--task", "sst2", "--data-dir", str(SST2_SLICE), "--max-examples", "64",
                 "--max-seq-length", "32", *flags])


@pytest.mark.parametrize("routing", ["learned", "hash"])
def test_converted_dir_distils_through_finetune(tmp_path, tiny_teacher, one_process_group, routing):
    """minimoe-moebert (4 experts of 32 of the 128 neurons, 16 shared) writes a MiniMoE head dir that
    minimoe-finetune --moebert-distill trains from its teacher through the engine: every state paired (the
    embeddings' and 4 layers'), the hidden and prediction losses logged, the saved model still 4 experts of 32
    (with hash routing: its tables saved with the weights, and no balance loss by default)."""
    assert convert(tiny_teacher, tmp_path / "moe", "--expert-size", "32", "--shared", "16", "--routing", routing) == 0
    summary = json.loads((tmp_path / "moe" / "moebert.json").read_text())
    assert [len(layer) for layer in summary["neurons"]] == [4] * 4 and len(summary["importance"][0]) == 128
    assert all(layer[0][:16] == layer[3][:16] for layer in summary["neurons"])
    assert (summary["routing"], summary["balance_weight"]) == (routing, 0.01 if routing == "learned" else 0.0)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert (config["num_experts"], config["intermediate_size"], config["relation_projection"]) == (4, 32, False)
    assert config["routing"] == routing
    assert config["architectures"] == ["StudentForSequenceClassification"]
    out = tmp_path / "distil"
    assert finetune_main(["--model", str(tmp_path / "moe"), "--teacher", str(tiny_teacher), "--moebert-distill", "5",
                          "--task", "sst2", "--data-dir", str(SST2_SLICE), "--output", str(out),
                          "--max-train-examples", "320", "--max-seq-length", "32", "--epochs", "1", "--lr", "1e-3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["layer_pairs"] == [[i, i] for i in range(5)] and results["steps_trained"] == 10
    assert {"train/loss", "train/aux_loss", "train/hidden_loss", "train/prediction_loss"} <= _tensorboard_tags(
        out / "tensorboard")
    saved = StudentForSequenceClassification.from_pretrained(out / "model")
    assert (saved.config.num_experts, saved.config.intermediate_size) == (4, 32)
    if routing == "hash":  # the tables are part of the saved weights
        from safetensors.torch import load_file

        weights = load_file(str(out / "model" / "model.safetensors"))
        assert sum(key.endswith("gate.expert_of_token") for key in weights) == 4


def test_refusals_are_one_line_errors(tmp_path, tiny_teacher, tokenizer, one_process_group, capsys):
    from transformers import BertModel

    encoder = tmp_path / "encoder"
    BertModel.from_pretrained(tiny_teacher).save_pretrained(encoder)
    tokenizer.save_pretrained(str(encoder))
    assert convert(tiny_teacher, tmp_path / "moe", "--expert-size", "32", "--shared", "16") == 0
    cases = [
        ((encoder, "--expert-size", "32", "--shared", "16"),
         f"error: model {encoder}: not finetuned for sst2 (no *ForSequenceClassification"),
        ((tmp_path / "moe", "--expert-size", "8", "--shared", "4"),
         f"error: model {tmp_path / 'moe'}: a MoE model; MoEBERT splits the full FFN of a dense finetuned BERT"),
        ((tiny_teacher, "--expert-size", "32", "--shared", "40"), "error: --shared 40: must be in [0, --expert-size 32]"),
        ((tiny_teacher, "--expert-size", "200", "--shared", "16"),
         "error: --expert-size 200: must be in [1, 128] (the teacher's FFN width)"),
        ((tiny_teacher, "--expert-size", "64", "--shared", "16"),
         "error: --expert-size 64: the smallest expert holds 16 shared + 28 own of the 128 neurons"),
        ((tiny_teacher, "--experts", "1", "--expert-size", "32", "--shared", "16"),
         "error: --experts 1: a mixture needs >= 2 experts"),
    ]
    for args, message in cases:
        assert convert(args[0], tmp_path / "out", *args[1:]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()

    def distil(*flags: str) -> int:
        return finetune_main(["--model", str(tmp_path / "moe"), "--task", "sst2", "--data-dir", str(SST2_SLICE),
                              "--output", str(tmp_path / "run"), "--max-seq-length", "32", *flags])

    shallow = tiny_bert(tmp_path / "shallow", tokenizer, layers=2, hidden=64)
    for flags, message in [
        (("--moebert-distill", "5"), "error: --moebert-distill 5 needs --teacher: MoEBERT distils a model finetuned on the task"),
        (("--teacher", str(tiny_teacher), "--moebert-distill", "5", "--pkd-beta", "500"),
         "error: --pkd-beta and --moebert-distill are two methods' layer losses: give one"),
        (("--teacher", str(shallow), "--moebert-distill", "5"),
         f"error: --moebert-distill pairs every layer's hidden state: the student has 4 layers, the teacher 2 ({shallow})"),
    ]:
        assert distil(*flags) == 2
        assert capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "run" / "results.json").exists()
