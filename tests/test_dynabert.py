"""minimoe-dynabert (pipeline.baselines.dynabert): rewiring is exact and sorts the importance, the authors' width / depth
arithmetic, the exported sub-network against one built by hand, the training masks against the exported
sub-network, one engine step against plain torch accumulating the widths (their loop), the command end to end
and its refusals."""
import copy
import json

import pytest
import torch
from test_finetune import SST2_SLICE, one_process_group, tokenizer  # noqa: F401 (fixtures)
from test_pkd import tiny_bert
from test_prune import synthetic_batches

from pipeline.baselines.dynabert import (WIDTHS, Networks, dynabert_loss, kept_layers, kept_units, main, skeleton,
                                         subnetwork, train_step)
from pipeline.models import StudentConfig, StudentForSequenceClassification
from pipeline.models.hf_export import load_student_head
from pipeline.optim import LinearSchedule, build_engine
from pipeline.baselines.prune import importance, masked, prefix_call, rewired


def tiny(**overrides) -> StudentForSequenceClassification:
    """test_prune's tiny head (H 64, 4 heads of 16, 2 labels; random, eval mode) of 2 layers of FFN 128 unless
    overridden."""
    torch.manual_seed(0)
    fields = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128, "vocab_size": 100,
              "num_labels": 2, **overrides}
    return StudentForSequenceClassification(StudentConfig(**fields)).eval()


def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"]).logits


def test_rewiring_keeps_the_logits_and_sorts_every_layers_units():
    model = tiny()
    batches = synthetic_batches(3)
    scores = importance(model, iter(batches))
    rewired_model = rewired(model, scores).eval()
    for batch in batches:
        torch.testing.assert_close(logits(rewired_model, batch), logits(model, batch), atol=1e-5, rtol=0)
    after = importance(rewired_model, iter(batches))
    for before_scores, after_scores in zip([*scores.heads, *scores.neurons], [*after.heads, *after.neurons]):
        torch.testing.assert_close(after_scores, before_scores.sort(descending=True).values, rtol=1e-4, atol=1e-7)


def test_the_authors_width_and_depth_arithmetic():
    """modeling_bert.py: BERT-base's 12 heads and 3072 neurons, 12 layers; the packaged teacher's 6 layers."""
    assert [kept_units(12, 3072, w) for w in WIDTHS] == [(3, 768), (6, 1536), (9, 2304), (12, 3072)]
    assert kept_layers(12, 0.5) == [0, 2, 4, 6, 8, 10]
    assert kept_layers(12, 0.75) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert kept_layers(12, 1.0) == list(range(12))
    assert kept_layers(6, 0.5) == [0, 2, 4]


def test_the_subnetwork_equals_one_built_by_hand():
    """Width 0.5, depth 0.5 of 4 layers of 4 heads (16 wide) and 128 neurons: layers 0 and 2, their first 2 heads'
    Q/K/V rows and output columns, their first 64 fc1 rows and fc2 columns, copied module by module."""
    model = tiny(num_layers=4)
    config = StudentConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=100,
                           num_labels=2, layer_heads=[2, 2], layer_intermediate_sizes=[64, 64])
    reference = StudentForSequenceClassification(config).eval()
    with torch.no_grad():
        for name in ("student.embeddings", "pooler", "classifier"):
            reference.get_submodule(name).load_state_dict(model.get_submodule(name).state_dict())
        for new, old in enumerate([0, 2]):
            source, target = model.student.layers[old], reference.student.layers[new]
            for name in ("query", "key", "value"):
                getattr(target.attention, name).weight.copy_(getattr(source.attention, name).weight[:32])
                getattr(target.attention, name).bias.copy_(getattr(source.attention, name).bias[:32])
            target.attention.output.weight.copy_(source.attention.output.weight[:, :32])
            target.attention.output.bias.copy_(source.attention.output.bias)
            target.ffn.fc1.weight.copy_(source.ffn.fc1.weight[:64])
            target.ffn.fc1.bias.copy_(source.ffn.fc1.bias[:64])
            target.ffn.fc2.weight.copy_(source.ffn.fc2.weight[:, :64])
            target.ffn.fc2.bias.copy_(source.ffn.fc2.bias)
            for norm in ("attention_norm", "ffn_norm"):
                getattr(target, norm).load_state_dict(getattr(source, norm).state_dict())
    small = subnetwork(model, 0.5, 0.5)
    assert small.config == reference.config
    for batch in synthetic_batches(2):
        torch.testing.assert_close(logits(small, batch), logits(reference, batch), atol=1e-6, rtol=0)


def masked_forward(model, masks, width: float, layers: list[int], **inputs):
    """The authors' sub-network written another way: `model` (with prune.masked's masks) at full width with zeros
    on every layer's heads and neurons past `width`'s, its encoder looping over `layers` only."""
    with torch.no_grad():
        for mask_heads, mask_neurons in zip(masks.heads, masks.neurons):
            heads, neurons = kept_units(len(mask_heads), len(mask_neurons), width)
            mask_heads.copy_(torch.arange(len(mask_heads)) < heads)
            mask_neurons.copy_(torch.arange(len(mask_neurons)) < neurons)
    full = model.student.layers
    model.student.layers = torch.nn.ModuleList(full[i] for i in layers)
    try:
        return model(**inputs)
    finally:
        model.student.layers = full


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("depth", [1.0, 0.5])
def test_the_training_subnetworks_and_the_export_compute_the_masked_model(width, depth):
    """prefix_call's sub-network (training) and the exported one = the full model masked and run on the kept layers."""
    model = tiny(num_layers=4, intermediate_size=130)  # 130 neurons: int(w x 130) is not w x 130
    small = subnetwork(model, width, depth)
    assert small.config.layer_intermediate_sizes == [int(round(4 * width) / 4 * 130)] * round(4 * depth)
    layers = kept_layers(4, depth)
    masks, _ = masked(model)
    for batch in synthetic_batches(2):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        want = masked_forward(model, masks, width, layers, **inputs).logits.detach()
        torch.testing.assert_close(logits(small, batch), want, atol=1e-5, rtol=0)
        out = prefix_call(model, skeleton(model, width, depth), layers, **inputs).logits
        torch.testing.assert_close(out.detach(), want, atol=1e-5, rtol=0)


def engine_seeing_gradients(model, accumulation: int):
    """A ZeRO-0 engine over `model` (AdamW lr 1e-3, no clipping or decay, `accumulation` backward passes a step)
    and the list its optimizer's steps fill with the gradients they see."""
    ds_config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": accumulation,
                 "gradient_clipping": 0.0, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine = build_engine(model, ds_config, 1e-3, 0.0, LinearSchedule(0, 10))
    seen = []
    engine.optimizer.register_step_pre_hook(lambda *_: seen.extend(p.grad.clone() for p in engine.module.parameters()))
    return engine, seen


def assert_one_equal_step(engine, seen: list[torch.Tensor], reference) -> None:
    """The engine took one step, on the gradients `reference` holds, to the weights of AdamW's step on those. AdamW's
    first step moves every weight by about lr x sign(gradient), so a gradient of rounding noise (the keys' bias,
    which softmax ignores) is compared as a gradient only."""
    expected = [p.grad.clone() for p in reference.parameters()]
    torch.optim.AdamW(reference.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.0).step()
    names = [name for name, _ in reference.named_parameters()]
    assert len(seen) == len(expected)  # one optimizer step
    for name, grad, want in zip(names, seen, expected):
        torch.testing.assert_close(grad, want, atol=1e-7, rtol=1e-5, msg=name)
    for name, p, q, want in zip(names, engine.module.parameters(), reference.parameters(), expected):
        if want.abs().max() > 1e-6:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("depths", [[1.0], [1.0, 0.5]])
def test_one_step_equals_plain_torch_accumulating_every_subnetworks_gradient(depths, one_process_group):
    """The engine step (the sub-networks accumulated by DeepSpeed) against the authors' loop in plain torch:
    loss.backward() per sub-network, one AdamW step; dropout off. The gradients the optimizer sees are compared
    too (AdamW's first step hardly depends on their scale): summed, not averaged. Clipping is off here, so that a
    sum and a mean would differ. With depths, the teacher runs at each student width (DynaBERT's stage 2)."""
    teacher = tiny(num_layers=4, dropout=0.0).requires_grad_(False)
    student = rewired(teacher, importance(copy.deepcopy(teacher), iter(synthetic_batches(2)))).train()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():  # a student away from the teacher, so that every loss has gradient
            p.add_(0.05 * torch.randn_like(p))
    reference, teacher_before = copy.deepcopy(student), copy.deepcopy(teacher)
    batch = synthetic_batches(1, seed=3)[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    widths, lambdas = sorted(WIDTHS, reverse=True), (1.0, 0.1)

    engine, seen = engine_seeing_gradients(student, len(WIDTHS) * len(depths))
    skeletons = {(depth, width): skeleton(student, width, depth) for depth in depths for width in widths}
    stage2 = len(depths) > 1
    teacher_skeletons = {width: skeleton(teacher, width, 1.0) for width in widths} if stage2 else None
    train_step(engine, Networks(teacher, skeletons, teacher_skeletons, lambdas), batch)

    masks, _ = masked(reference)
    teacher_masks, _ = masked(teacher)
    for depth in depths:
        layers = kept_layers(4, depth)
        for width in widths:
            with torch.no_grad():
                teacher_out = masked_forward(teacher, teacher_masks, width if stage2 else 1.0, list(range(4)), **inputs,
                                             output_hidden_states=True)
            out = masked_forward(reference, masks, width, layers, **inputs, output_hidden_states=True)
            dynabert_loss(out, teacher_out, [*layers, 4], inputs["attention_mask"], *lambdas).backward()
    assert_one_equal_step(engine, seen, reference)
    for p, q in zip(teacher.parameters(), teacher_before.parameters()):
        assert torch.equal(p, q)


def test_train_then_export_end_to_end(tmp_path, tokenizer, one_process_group):
    teacher_dir = tiny_bert(tmp_path / "teacher", tokenizer, layers=4, hidden=64)
    out, sub = tmp_path / "dyna", tmp_path / "sub"
    assert main(["train", str(teacher_dir), str(out), "--task", "sst2", "--data-dir", str(SST2_SLICE),
                 "--max-examples", "64", "--max-seq-length", "32", "--epochs", "1", "--lr", "1e-3",
                 "--batch-size", "16"]) == 0
    summary = json.loads((out / "dynabert.json").read_text())
    assert summary["steps"] == 4 and set(summary["dev_after"]) == {"w1_d1", "w0.75_d1", "w0.5_d1", "w0.25_d1"}
    deep = tmp_path / "dyna_depth"
    assert main(["train", str(out), str(deep), "--task", "sst2", "--data-dir", str(SST2_SLICE), "--depths", "0.5,1",
                 "--widths", "0.25,1", "--max-examples", "32", "--max-seq-length", "32", "--epochs", "1",
                 "--batch-size", "16"]) == 0
    summary = json.loads((deep / "dynabert.json").read_text())
    assert set(summary["dev_after"]) == {"w1_d1", "w0.25_d1", "w1_d0.5", "w0.25_d0.5"}
    assert summary["lambda_hidden"] == 1.0 and summary["importance"] is None
    out = deep
    assert main(["export", str(out), str(sub), "--width", "0.25", "--depth", "0.5"]) == 0
    small = load_student_head(sub, token=False)
    assert small.config.num_layers == 2 and small.config.layer_heads == [1, 1]
    assert small.config.layer_intermediate_sizes == [32, 32]
    full = load_student_head(out, token=False)
    torch.testing.assert_close(small.student.layers[1].ffn.fc1.weight, full.student.layers[2].ffn.fc1.weight[:32])


@pytest.mark.parametrize("argv, message", [
    (["train", "M", "O", "--task", "sst2", "--data-dir", "D", "--widths", "0.5,1.5"], "--widths 0.5,1.5: each"),
    (["train", "M", "O", "--task", "sst2", "--data-dir", "D", "--depths", "0"], "--depths 0: each"),
    (["train", "M", "O", "--task", "sst2", "--data-dir", "D", "--widths", "a,b"], "comma-separated numbers"),
    (["train", "M", "O", "--task", "sst2", "--data-dir", "D", "--lr", "0"], "--lr 0: must be > 0"),
    (["train", "M", "O", "--task", "sst2", "--data-dir", "D", "--max-examples", "0"], "--max-examples 0: must be > 0"),
    (["train", "M", "O", "--task", "sst2", "--data-dir", "D", "--lambda-hidden", "-1"], "--lambda-hidden -1"),
])
def test_bad_training_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / a) if a in ("M", "O", "D") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_the_depth_stage_needs_a_dynabert_w_dir(tmp_path, tokenizer, capsys):
    teacher_dir = tiny_bert(tmp_path / "teacher", tokenizer, layers=4, hidden=64)
    assert main(["train", str(teacher_dir), str(tmp_path / "o"), "--task", "sst2", "--data-dir", str(SST2_SLICE),
                 "--depths", "0.5,1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "DynaBERT_W dir" in err and "\n" not in err


def test_bad_export_flags_are_one_line_errors(tmp_path, tokenizer, capsys):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(str(tmp_path / "m"))
    for flag, value in (("--width", "0.1"), ("--depth", "1.5")):  # 0.1 x 4 heads rounds to none
        argv = ["export", str(tmp_path / "m"), str(tmp_path / "o"), "--width", "0.5", flag, value]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag} {value}") and "\n" not in err
