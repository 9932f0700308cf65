"""minimoe-minidisc (pipeline.baselines.minidisc): the levels by hand, the sub-networks computed on prefix views
against cut-out models, the loss and one engine step against the authors' loop written with masks, the
lambda-tradeoff, the schedule end to end with its resume, and the refusals."""
import copy
import json

import pytest
import torch
from test_dynabert import assert_one_equal_step, engine_seeing_gradients, tiny
from test_finetune import SST2_SLICE, one_process_group, tokenizer  # noqa: F401 (fixtures)
from test_pkd import tiny_bert
from test_prune import synthetic_batches

import pipeline.baselines.minidisc as minidisc
from pipeline.baselines.minidisc import Level, choose, cut, hidden_layers, levels, main, minidisc_loss, train_step
from pipeline.baselines.prune import Importance, importance, masked, prefix_call, pruned, rewired, sub_network
from pipeline.finetune.data import load_task_data
from pipeline.finetune.scoring import evaluate
from pipeline.models.hf_export import load_student_head
from pipeline.tasks import get_task


def hand_scores() -> Importance:
    """2 layers of 4 heads and 128 neurons. Heads: layer 0 scores 4, 3, 2, 1 (L2-normalised .73 .55 .37 .18), layer
    1 all 1 (.5 each). Neurons: layer 0 all 1 (.088 each), layer 1 2 on its first 64 (.125), 0 after."""
    return Importance([torch.tensor([4.0, 3, 2, 1]), torch.ones(4)],
                      [torch.ones(128), torch.cat([torch.full((64,), 2.0), torch.zeros(64)])])


def test_levels_by_hand():
    """H 64, heads of 16: per layer 6 x 64 fixed parameters, per head 4 x 64 x 16 + 3 x 16 = 4,144, per neuron
    129; 66,944 in all. Sparsity 50: round(0.5 x 8) = 4 heads (the two best of layer 0, then two of layer 1's
    equal .5s), 33,472 - 768 - 4 x 4,144 = 16,128 parameters = 125.0 neurons (layer 1's 64 at .125 first, then
    61 of layer 0). Sparsity 75: 2 heads (layer 0's), (16,736 - 768 - 8,288) / 129 = 59.5 -> 60 neurons, all of
    layer 1's best."""
    assert levels(tiny(), hand_scores(), [75, 50]) == [Level(50, [2, 2], [61, 64]), Level(75, [2, 0], [0, 60])]


def test_levels_that_would_not_nest_are_refused():
    """4 layers, 16 heads, 133,888 parameters: sparsity 46 keeps round(0.54 x 16) = 9 heads and 259 neurons, 47
    keeps 8 heads and 281 neurons (the head given up pays for more neurons than 1% costs): not a sub-network."""
    model = tiny(num_layers=4)
    scores = importance(copy.deepcopy(model), iter(synthetic_batches(2)))
    with pytest.raises(ValueError, match="--sparsities 46 and 47: too close"):
        levels(model, scores, [46, 47])


def test_hidden_layers_are_every_sixth():
    assert hidden_layers(12) == [0, 2, 4, 6, 8, 10, 12]
    assert hidden_layers(24) == [0, 4, 8, 12, 16, 20, 24]
    assert hidden_layers(6) == list(range(7))
    assert hidden_layers(2) == [0, 1, 2]


@pytest.mark.parametrize("level", [Level(50, [2, 2], [61, 64]), Level(75, [2, 0], [0, 60]),
                                   Level(0, [4, 4], [128, 128])])
def test_prefix_views_compute_the_cut_network_and_its_gradients(level):
    """Logits and every parameter's gradient of the sub-network run on prefix views of the full model = those of
    the network cut out by indices (prune.pruned), which `cut` copies; the full model's units after the prefixes
    get no gradient. A layer without heads or neurons included."""
    model = rewired(tiny(), hand_scores())
    small = pruned(model, [torch.arange(h) for h in level.heads], [torch.arange(n) for n in level.neurons])
    random_state = torch.get_rng_state()
    copied = cut(model, level).state_dict()
    assert torch.equal(torch.get_rng_state(), random_state)  # evaluating a level leaves training's dropout as it was
    assert all(torch.equal(value, copied[key]) for key, value in small.state_dict().items())
    batch = {k: v for k, v in synthetic_batches(1)[0].items() if k != "labels"}
    out = prefix_call(model, sub_network(model, level.heads, level.neurons), **batch).logits
    want = small(**batch).logits
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    out.square().sum().backward()
    want.square().sum().backward()
    full, cut_params = dict(model.named_parameters()), dict(small.named_parameters())
    for name, p in cut_params.items():
        grad = full[name].grad
        prefix = tuple(slice(0, n) for n in p.shape)
        torch.testing.assert_close(grad[prefix], p.grad, atol=1e-6, rtol=1e-5, msg=name)
        rest = grad.clone()
        rest[prefix] = 0
        assert not rest.any(), name


def test_the_loss_by_hand():
    """(mean over the compared layers of the MSE over real tokens + KL(teacher || student)) / 2, counted with
    loops over the examples' real tokens."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    student = type("Out", (), {"hidden_states": [torch.randn(2, 3, 4) for _ in range(3)], "logits": torch.randn(2, 2)})
    teacher = type("Out", (), {"hidden_states": [torch.randn(2, 3, 4) for _ in range(3)], "logits": torch.randn(2, 2)})
    mses = []
    for s, t in zip(student.hidden_states, teacher.hidden_states):
        rows = [(s[b, i] - t[b, i]).square().mean() for b in range(2) for i in range(3) if mask[b, i]]
        mses.append(sum(rows) / len(rows))
    p_t, p_s = teacher.logits.softmax(-1), student.logits.softmax(-1)
    kl = sum((p_t[b] * (p_t[b].log() - p_s[b].log())).sum() for b in range(2)) / 2
    torch.testing.assert_close(minidisc_loss(student, teacher, mask), (sum(mses) / 3 + kl) / 2)


def test_one_step_equals_the_authors_loop(one_process_group):
    """The engine step (levels accumulated by DeepSpeed, on prefix views) against their loop written with masks in
    plain torch: for each sparsity, forward, (loss / number of sparsities).backward(); the gradients the
    optimizer sees, and the weights after one AdamW step (no clipping or decay, so that a sum and a mean
    differ)."""
    teacher = rewired(tiny(dropout=0.0), hand_scores()).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = copy.deepcopy(student)
    trained = [Level(0, [4, 4], [128, 128]), Level(50, [2, 2], [61, 64]), Level(75, [2, 0], [0, 60])]
    batch = synthetic_batches(1, seed=3)[0]
    engine, seen = engine_seeing_gradients(student, len(trained))
    skeletons = [(level, sub_network(engine.module, level.heads, level.neurons)) for level in trained]
    losses = train_step(engine, teacher, skeletons, batch)

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    teacher_out = teacher(**inputs, output_hidden_states=True)
    masks, _ = masked(reference)
    want_losses = {}
    for level in trained:
        with torch.no_grad():
            for mask, kept in zip([*masks.heads, *masks.neurons], [*level.heads, *level.neurons]):
                mask.copy_(torch.arange(len(mask)) < kept)
        loss = minidisc_loss(reference(**inputs, output_hidden_states=True), teacher_out, inputs["attention_mask"])
        (loss / len(trained)).backward()
        want_losses[f"loss@{level.sparsity}"] = loss.detach()
    torch.testing.assert_close(losses, want_losses)
    assert_one_equal_step(engine, seen, reference)


def test_the_lambda_tradeoff_chooses_the_assistant():
    """dev 60, 59, 50, 70 at sparsities 50, 60, 90, 95, lambda 0.2, target 90: 0.60 + 0.10, 0.59 + 0.12, 0.50 +
    0.18; 95 is beyond the target. The final iteration scores the target alone."""
    scores = {50: 60.0, 60: 59.0, 90: 50.0, 95: 70.0}
    sparsity, value = choose(scores, 90, 0.2, final=False)
    assert sparsity == 60 and value == pytest.approx(0.71)
    assert choose(scores, 90, 0.0, final=False)[0] == 50
    assert choose(scores, 90, 1.0, final=False)[0] == 90
    assert choose(scores, 90, 0.2, final=True) == (90, 0.5)
    assert choose({50: 50.0, 60: 48.0}, 60, 0.2, final=False)[0] == 50  # 0.6 = 0.6: the denser one


def test_the_schedule_end_to_end_and_its_resume(tmp_path, tokenizer, one_process_group, monkeypatch):
    """A TA forced at the densest candidate (the tradeoff is tested above): teacher -> 50% -> 75%. The student
    dir has the target's shapes and scores what its record says; a rerun trains nothing; with iteration 2 gone,
    a rerun redoes it to the same weights; other settings over the same output are refused."""
    real_choose = minidisc.choose
    monkeypatch.setattr(minidisc, "choose", lambda scores, target, lam, final:
                        real_choose(scores, target, lam, final) if final else (min(scores), 1.0))
    teacher_dir = tiny_bert(tmp_path / "teacher", tokenizer, layers=4, hidden=64)
    out = tmp_path / "minidisc"
    argv = ["--model", str(teacher_dir), "--output", str(out), "--task", "sst2", "--data-dir", str(SST2_SLICE),
            "--sparsities", "50", "75", "--target-sparsity", "75", "--max-examples", "48", "--max-seq-length", "32",
            "--epochs", "1", "--eval-every", "2", "--lr", "1e-3"]
    assert main(argv) == 0
    summary = json.loads((out / "minidisc.json").read_text())
    assert summary["schedule"] == [0, 50, 75] and summary["student"] == str(out / "iteration2")
    first, second = (json.loads((out / f"iteration{i}" / "minidisc.json").read_text()) for i in (1, 2))
    assert first["levels"] == [50, 75] and first["teacher_sparsity"] == 0 and first["steps"] == 3
    assert second["levels"] == [50, 75] and second["teacher_sparsity"] == 50 and second["sparsity"] == 75
    target = next(level for level in summary["levels"] if level["sparsity"] == 75)
    student = load_student_head(out / "iteration2", token=False)
    assert student.config.layer_heads == target["heads"] and sum(target["heads"]) == 4  # round(0.25 x 16)
    assert student.config.layer_intermediate_sizes == target["neurons"]
    task = get_task("sst2")
    data = load_task_data(task, str(SST2_SLICE), tokenizer, 32, 48)
    assert evaluate(student, task, data, 32, tokenizer.pad_token_id, 0)["score"] == pytest.approx(summary["dev"])
    assert summary["dev"] == second["dev_by_sparsity"]["75"]

    weights = {i: (out / f"iteration{i}" / "model.safetensors") for i in (1, 2)}
    stamps = {i: path.stat().st_mtime_ns for i, path in weights.items()}
    assert main(argv) == 0
    assert {i: path.stat().st_mtime_ns for i, path in weights.items()} == stamps
    before = load_student_head(out / "iteration2", token=False).state_dict()
    for path in (out / "iteration2").iterdir():
        path.unlink()
    (out / "iteration2").rmdir()
    assert main(argv) == 0
    assert weights[1].stat().st_mtime_ns == stamps[1]
    after = load_student_head(out / "iteration2", token=False).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert main([*argv, "--lam", "0.5"]) == 2


def test_one_level_one_iteration_is_the_authors_kd_of_a_sparsified_student(tmp_path, tokenizer, one_process_group):
    """--sparsities S --iterations 1 (README's KD_x% the authors' way): teacher -> S directly, the student has the
    level's shapes and its recorded dev score, and only that level was trained."""
    teacher_dir = tiny_bert(tmp_path / "teacher", tokenizer, layers=2, hidden=64)
    out = tmp_path / "kd75"
    assert main(["--model", str(teacher_dir), "--output", str(out), "--task", "sst2", "--data-dir", str(SST2_SLICE),
                 "--sparsities", "75", "--target-sparsity", "75", "--iterations", "1", "--max-examples", "32",
                 "--max-seq-length", "32", "--epochs", "1", "--eval-every", "1"]) == 0
    summary = json.loads((out / "minidisc.json").read_text())
    record = json.loads((out / "iteration1" / "minidisc.json").read_text())
    assert summary["schedule"] == [0, 75] and record["levels"] == [75] and record["teacher_sparsity"] == 0
    assert [list(e["dev"]) for e in record["evaluations"]] == [["75"]] * 2  # 2 steps of 16, dev after each
    level = summary["levels"][0]
    student = load_student_head(out / "iteration1", token=False)
    assert (student.config.layer_heads, student.config.layer_intermediate_sizes) == (level["heads"], level["neurons"])
    assert summary["dev"] == record["dev"] == record["dev_by_sparsity"]["75"]


def test_a_diverged_run_stops_naming_the_step(tmp_path, tokenizer, one_process_group, monkeypatch, capsys):
    monkeypatch.setattr(minidisc, "minidisc_loss", lambda out, *_: out.logits.sum() * float("nan"))
    teacher_dir = tiny_bert(tmp_path / "teacher", tokenizer, layers=2, hidden=64)
    argv = ["--model", str(teacher_dir), "--output", str(tmp_path / "o"), "--task", "sst2", "--data-dir",
            str(SST2_SLICE), "--sparsities", "50", "--target-sparsity", "50", "--max-examples", "16"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: non-finite loss at step 1: loss@50=nan"), err
    assert not (tmp_path / "o" / "iteration1").exists()


@pytest.mark.parametrize("flags, message", [
    (["--target-sparsity", "33"], "--target-sparsity 33: not one of --sparsities 50 60 70 80 85 90 95"),
    (["--sparsities", "50", "50"], "--sparsities 50 50: distinct percentages"),
    (["--sparsities", "0", "90"], "--sparsities 0 90: distinct percentages"),
    (["--warmup", "1"], "--warmup 1: a share"),
    (["--lam", "-1"], "--lam -1: must be >= 0"),
    (["--iterations", "0"], "--iterations 0: must be > 0"),
    (["--max-examples", "0"], "--max-examples 0: must be > 0"),
    (["--task", "conll2003"], "--task conll2003: a token task"),
])
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, tokenizer, capsys):
    teacher_dir = tiny_bert(tmp_path / "teacher", tokenizer, layers=2, hidden=64)
    argv = ["--model", str(teacher_dir), "--output", str(tmp_path / "o"), "--task", "sst2", "--data-dir",
            str(SST2_SLICE), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
