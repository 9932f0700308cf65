"""minimoe-prune (pipeline.baselines.prune): first-order Taylor importance against finite differences, the kept share of
transformer-layer parameters by hand, nothing pruned = the teacher's logits, the least important head mattering
less than the most important, the written dir loading in a fresh process, the refusals, and the KD finetune of
a pruned student from its teacher through the real engine."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune import SST2_SLICE, one_process_group, tokenizer  # noqa: F401 (fixtures)
from test_pkd import tiny_bert

from pipeline.finetune import main as finetune_main
from pipeline.models import StudentConfig, StudentForSequenceClassification
from pipeline.models.hf_export import load_student_head
from pipeline.baselines.prune import budget, importance, layer_param_sizes, layer_params, main, pruned, top_units

REPO = Path(__file__).resolve().parents[1]


def tiny_head(**overrides) -> StudentForSequenceClassification:
    """2 layers, H 64, 4 heads of 16, FFN 128, 2 labels; random, eval mode."""
    torch.manual_seed(0)
    config = StudentConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=100,
                           num_labels=2, **overrides)
    return StudentForSequenceClassification(config).eval()


def synthetic_batches(count: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Batches of 8 random sequences of 12 tokens (the last 3 of each second one padding); the label says
    whether token 7 occurs: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(5, 100, (8, 12), generator=generator)
        ids[::3, 4] = 7
        mask = torch.ones_like(ids)
        mask[1::2, 9:] = 0
        labels = ((ids == 7) & mask.bool()).any(1).long()
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def batch_loss(model, batch: dict[str, torch.Tensor]) -> float:
    """The batch's mean cross-entropy in the model's precision (the head's own loss is taken in float32)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(**inputs).logits, batch["labels"]).item()


def test_importance_equals_finite_differences_of_the_loss():
    """|dL/dm| per batch, summed, against central differences of the batch loss when a head's output (its
    columns of the attention output projection) or a neuron's (its fc2 column) is scaled by 1 +- eps, in float64:
    the masks and hooks of `importance` against plain weight edits."""
    model = tiny_head().double()
    batches = synthetic_batches(3)
    scores = importance(model, iter(batches))
    eps, head_size = 1e-6, 16

    def scaled_loss(weight: torch.Tensor, columns: slice, factor: float, batch) -> float:
        original = weight[:, columns].clone()
        with torch.no_grad():
            weight[:, columns] *= factor
        loss = batch_loss(model, batch)
        with torch.no_grad():
            weight[:, columns] = original
        return loss

    def finite_difference(weight: torch.Tensor, columns: slice) -> float:
        return sum(abs(scaled_loss(weight, columns, 1 + eps, b) - scaled_loss(weight, columns, 1 - eps, b)) / (2 * eps)
                   for b in batches)

    for layer_index, layer in enumerate(model.student.layers):
        for head in range(4):
            expected = finite_difference(layer.attention.output.weight, slice(head * head_size, (head + 1) * head_size))
            assert scores.heads[layer_index][head].item() == pytest.approx(expected, rel=1e-4, abs=1e-9)
        for neuron in (0, 17, 127):
            expected = finite_difference(layer.ffn.fc2.weight, slice(neuron, neuron + 1))
            assert scores.neurons[layer_index][neuron].item() == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert all(s.min() > 0 for s in [*scores.heads, *scores.neurons])


@pytest.mark.parametrize("keep", [3, 5, 10, 15, 50, 100])
def test_kept_parameters_are_keep_percent_of_the_layers_within_half_a_neuron(keep):
    """By hand for 2 layers, H 64, 4 heads of 16, FFN 128: per layer Q/K/V 3 x (64 x 64 + 64) = 12,480, attention
    output 4,160, two LayerNorms 256, fc1 8,320, fc2 8,256: 33,472; 66,944 for both. Fixed per layer: 6 x 64 = 384;
    a head 4 x 64 x 16 + 3 x 16 = 4,144; a neuron 2 x 64 + 1 = 129. Keep 15%: 10,041.6 parameters; round(0.15 x 8)
    = 1 head; round((10,041.6 - 768 - 4,144) / 129) = round(39.8) = 40 neurons: 768 + 4,144 + 5,160 = 10,072."""
    model = tiny_head()
    assert layer_params(model) == 66_944
    assert layer_param_sizes(model.config) == (768, 4_144, 129)
    heads, neurons = budget(model.config, keep)
    if keep == 15:
        assert (heads, neurons) == (1, 40)
    scores = importance(model, iter(synthetic_batches(2)))
    small = pruned(model, top_units(scores.heads, heads), top_units(scores.neurons, neurons))
    assert (sum(small.config.layer_heads), sum(small.config.layer_intermediate_sizes)) == (heads, neurons)
    assert layer_params(small) == 768 + 4_144 * heads + 129 * neurons
    assert abs(layer_params(small) - keep / 100 * 66_944) <= 129 / 2
    assert small(**synthetic_batches(1)[0]).logits.shape == (8, 2)


def test_global_ranking_after_each_layers_l2_normalisation():
    """MiniDisc: each layer's scores over their L2 norm, then one ranking over all layers. Layer 0 (3, 4) ->
    (.6, .8); layer 1 (10, 0, 0) -> (1, 0, 0): the top 2 are layer 1's first and layer 0's second."""
    kept = top_units([torch.tensor([3.0, 4.0]), torch.tensor([10.0, 0.0, 0.0])], 2)
    assert [k.tolist() for k in kept] == [[1], [0]]
    assert [k.tolist() for k in top_units([torch.tensor([1.0, 1.0]), torch.tensor([])], 1)] == [[0], []]


def test_a_layer_pruned_to_no_heads_keeps_its_output_bias():
    """0 heads (or 0 neurons) leave Linear(0, H): its output is the bias, as masking every head of the layer."""
    model = tiny_head()
    batch = synthetic_batches(1)[0]
    small = pruned(model, [torch.tensor([], dtype=torch.long), torch.arange(4)], [torch.arange(128), torch.arange(0)])
    assert small.config.layer_heads == [0, 4] and small.config.layer_intermediate_sizes == [128, 0]
    with torch.no_grad():
        model.student.layers[0].attention.output.weight.zero_()
        model.student.layers[1].ffn.fc2.weight.zero_()
    torch.testing.assert_close(small(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)


def test_pruning_the_least_important_head_costs_less_than_the_most_important():
    """A tiny model trained 40 steps on the synthetic task (deterministic); removing its least important head
    raises the training loss less than removing its most important one."""
    model = tiny_head().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = synthetic_batches(8)
    for step in range(40):
        optimizer.zero_grad()
        model(**batches[step % 8]).loss.backward()
        optimizer.step()
    scores = importance(model, iter(batches))
    flat = torch.cat(scores.heads)
    every_neuron = [torch.arange(128)] * 2

    def loss_without(index: int) -> float:
        heads = [torch.tensor([h for h in range(4) if layer * 4 + h != index]) for layer in range(2)]
        small = pruned(model, heads, every_neuron)
        return sum(batch_loss(small, b) for b in batches) / len(batches)

    base = sum(batch_loss(model, b) for b in batches) / len(batches)
    least, most = loss_without(int(flat.argmin())), loss_without(int(flat.argmax()))
    assert abs(least - base) < abs(most - base)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tokenizer) -> Path:
    """A random tiny BertForSequenceClassification (4L;64H, 4 heads, FFN 128, 2 labels; the packaged teacher's
    tokenizer), as minimoe-finetune would write one."""
    return tiny_bert(tmp_path_factory.mktemp("teacher") / "model", tokenizer, layers=4, hidden=64)


def prune_cli(model: Path, output: Path, *flags: str) -> int:
    return main([str(model), str(output), "--task", "sst2", "--data-dir", str(SST2_SLICE), "--max-examples", "64",
                 "--max-seq-length", "32", *flags])


def test_nothing_pruned_gives_the_teachers_logits_and_loads_in_a_fresh_process(tmp_path, tiny_teacher, tokenizer):
    """--keep 100 keeps every head and neuron: the written student dir's logits equal the BERT teacher's within
    1e-5, in this process and in a fresh one that loads it with transformers' AutoModelForSequenceClassification
    after `import pipeline` (the registration; transformers 5 has no head pruning, so a pruned BERT needs our
    config) and imports no DeepSpeed. A 3% model (every head gone) loads there the same way."""
    from transformers import BertForSequenceClassification

    texts = ["a gripping , funny film .", "dull and far too long"]
    batch = tokenizer(texts, ["it works", "it does not"], padding=True, return_tensors="pt")
    teacher = BertForSequenceClassification.from_pretrained(tiny_teacher).eval()
    for keep in ("100", "3"):
        assert prune_cli(tiny_teacher, tmp_path / keep, "--keep", keep) == 0
    pruning = json.loads((tmp_path / "100" / "pruning.json").read_text())
    assert pruning["layer_heads"] == [4] * 4 and pruning["layer_intermediate_sizes"] == [128] * 4
    assert pruning["layer_params_before"] == pruning["layer_params_after"]
    assert pruning["dev_before"] == pruning["dev_after"]  # the untrained pruned model scored on dev, as MiniDisc
    assert json.loads((tmp_path / "3" / "pruning.json").read_text())["layer_heads"] == [0] * 4
    with torch.no_grad():
        expected = teacher(**batch).logits
        ours = StudentForSequenceClassification.from_pretrained(tmp_path / "100").eval()(**batch).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)

    script = """import json, sys, torch
import pipeline
from transformers import AutoModelForSequenceClassification, AutoTokenizer
out = {}
for path in sys.argv[1:]:
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    batch = AutoTokenizer.from_pretrained(path)(%r, %r, padding=True, return_tensors="pt")
    with torch.no_grad():
        out[path] = model(**batch).logits.tolist()
out["deepspeed"] = "deepspeed" in sys.modules
print(json.dumps(out))""" % (texts, ["it works", "it does not"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "100"), str(tmp_path / "3")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.splitlines()[-1])
    assert loaded["deepspeed"] is False
    torch.testing.assert_close(torch.tensor(loaded[str(tmp_path / "100")]), expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        five = StudentForSequenceClassification.from_pretrained(tmp_path / "3").eval()(**batch).logits
    torch.testing.assert_close(torch.tensor(loaded[str(tmp_path / "3")]), five, atol=1e-6, rtol=0)


def test_the_bert_head_converts_to_ours_exactly(tiny_teacher, tokenizer):
    from transformers import BertForSequenceClassification

    batch = tokenizer(["a fine film", "not good at all , sadly"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = BertForSequenceClassification.from_pretrained(tiny_teacher).eval()(**batch).logits
        ours = load_student_head(tiny_teacher, token=False).eval()(**batch).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_refusals_are_one_line_errors(tmp_path, tiny_teacher, tokenizer, capsys):
    from transformers import BertModel

    encoder = tmp_path / "encoder"
    BertModel.from_pretrained(tiny_teacher).save_pretrained(encoder)
    tokenizer.save_pretrained(str(encoder))
    cases = [
        ((encoder, "--keep", "15"), f"error: model {encoder}: not finetuned for sst2 (no *ForSequenceClassification"),
        ((tiny_teacher, "--keep", "0"), "error: --keep 0: must be in (0, 100]"),
        ((tiny_teacher, "--keep", "100.5"), "error: --keep 100.5: must be in (0, 100]"),
        ((tiny_teacher, "--keep", "0.5"), "error: --keep 0.5: below the 1.1"),
        ((tiny_teacher, "--keep", "15", "--batch-size", "0"), "error: --batch-size 0: must be >= 1"),
    ]
    for args, message in cases:
        assert prune_cli(args[0], tmp_path / "out", *args[1:]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert main([str(tiny_teacher), str(tmp_path / "out"), "--task", "sst3", "--data-dir", str(SST2_SLICE),
                 "--keep", "15"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown task 'sst3'")
    assert not (tmp_path / "out").exists()


def test_per_layer_shapes_are_checked():
    with pytest.raises(ValueError, match=r"layer_heads \[4\] must hold one count >= 0 per layer \(2\)"):
        tiny_head(layer_heads=[4])
    with pytest.raises(ValueError, match="for dense students"):
        tiny_head(layer_intermediate_sizes=[8, 8], num_experts=4)


def test_kd_finetune_of_a_pruned_student_from_its_teacher(tmp_path, tiny_teacher, one_process_group):
    """The KD_x% row end to end on the bundled SST-2 slice: the tiny teacher finetuned 10 steps, pruned to 15%
    (some layers without heads: zero-size parameters in the engine), then minimoe-finetune --teacher into the
    pruned student, whose saved model keeps the pruned shapes."""
    common = ["--task", "sst2", "--data-dir", str(SST2_SLICE), "--max-train-examples", "320",
              "--max-seq-length", "32", "--epochs", "1", "--lr", "1e-3"]
    assert finetune_main(["--model", str(tiny_teacher), "--output", str(tmp_path / "teacher"), *common]) == 0
    teacher = tmp_path / "teacher" / "model"
    assert prune_cli(teacher, tmp_path / "pruned", "--keep", "15") == 0
    shapes = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert finetune_main(["--model", str(tmp_path / "pruned"), "--teacher", str(teacher),
                          "--output", str(tmp_path / "kd"), *common]) == 0
    results = json.loads((tmp_path / "kd" / "results.json").read_text())
    assert results["steps_trained"] == 10 and results["teacher"] == str(teacher)
    saved = json.loads((tmp_path / "kd" / "model" / "config.json").read_text())
    assert (saved["layer_heads"], saved["layer_intermediate_sizes"]) == (shapes["layer_heads"],
                                                                         shapes["layer_intermediate_sizes"])
