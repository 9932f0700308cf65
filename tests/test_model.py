"""Student: config round trip, shapes and masking, dense == 1-expert MoE, top-1 routing and aux loss by
hand, save/load (also of a model trained with ep_size 2), task heads."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.models import moe
from pipeline.models import (STUDENT_PRESETS, Student, StudentConfig, StudentForSequenceClassification,
                            StudentForTokenClassification, is_student_dir)
from pipeline.models.moe import localize_experts, moe_feed_forward


def tiny_config(**overrides) -> StudentConfig:
    values = dict(num_layers=2, hidden_size=24, num_heads=2, vocab_size=50, max_position_embeddings=16, dropout=0.0)
    return StudentConfig(**{**values, **overrides})


def batch(seed: int = 0, lengths=(9, 5, 7), vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    types = torch.zeros_like(ids)
    types[:, 3:] = 1
    return ids, mask, types * mask


def test_config_round_trip_defaults_and_errors(tmp_path):
    config = StudentConfig.from_preset("4L192H", num_experts=4)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.intermediate_size) == (4, 192, 12, 768)
    assert StudentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown StudentConfig field.*'num_expert'"):
        StudentConfig.from_dict({"num_expert": 4})
    with pytest.raises(ValueError, match="num_experts 3 must be >= 1 and a multiple of ep_size 2"):
        Student(tiny_config(num_experts=3), deepspeed_moe=True, ep_size=2)
    with pytest.raises(ValueError, match=r"unknown StudentConfig field\(s\) \['ep_size'\]"):  # a launch setting
        StudentConfig(ep_size=2)
    with pytest.raises(ValueError, match="unknown student preset '5L'"):
        StudentConfig.from_preset("5L")
    assert set(STUDENT_PRESETS) >= {"6L384H", "4L384H", "3L384H", "4L192H"}


def test_preset_takes_vocabulary_and_special_ids_from_tokenizer(teacher_dir):
    from minimoe_common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(teacher_dir))
    config = StudentConfig.from_preset("3L384H", tokenizer=tokenizer)
    assert (config.vocab_size, config.pad_token_id, config.cls_token_id, config.sep_token_id) == (30522, 0, 101, 102)


@pytest.mark.parametrize("num_experts", [1, 4])
def test_shapes_and_padding_do_not_leak(num_experts):
    torch.manual_seed(0)
    model = Student(tiny_config(num_experts=num_experts)).eval()
    ids, mask, types = batch()
    out = model(ids, mask, types, qkv_layer=0)
    assert out.last_hidden_state.shape == (3, 9, 24)
    assert [t.shape for t in out.qkv] == [(3, 9, 24)] * 3
    # Each example alone, unpadded, gives the same real-token outputs as inside the padded batch.
    for i, length in enumerate(mask.sum(1).tolist()):
        alone = model(ids[i:i + 1, :length], mask[i:i + 1, :length], types[i:i + 1, :length], qkv_layer=0)
        torch.testing.assert_close(alone.last_hidden_state[0], out.last_hidden_state[i, :length], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.qkv[2][0], out.qkv[2][i, :length], atol=1e-5, rtol=1e-5)
    if num_experts == 1:
        assert out.expert_counts == [] and out.aux_loss.item() == 0.0
    else:  # counts: real tokens only, every one routed (no dropping by default)
        assert [c.sum().item() for c in out.expert_counts] == [21, 21]


def test_qkv_layer_selects_the_layer():
    model = Student(tiny_config(num_layers=3)).eval()
    ids, mask, _ = batch()
    captured = {}
    model.layers[1].attention.key.register_forward_hook(lambda m, i, o: captured.update(k=o))
    out = model(ids, mask, qkv_layer=1)
    torch.testing.assert_close(out.qkv[1], captured["k"])
    assert model(ids, mask, qkv_layer=None).qkv is None and out.layer_qkv is None
    every = model(ids, mask, output_qkv=True).layer_qkv  # TinyBERT: every layer's
    assert len(every) == 3
    torch.testing.assert_close(every[1][1], captured["k"])


def test_dense_student_equals_moe_student_with_one_expert():
    torch.manual_seed(0)
    config = tiny_config()
    dense = Student(config).eval()
    moe = Student(config).eval()
    moe.load_state_dict(dense.state_dict())
    for layer in moe.layers:  # same code path, the FFN swapped for a 1-expert DeepSpeed MoE block
        ffn = moe_feed_forward(config, num_experts=1)
        ffn.deepspeed_moe.experts.deepspeed_experts[0].load_state_dict(layer.ffn.state_dict())
        layer.ffn = ffn
    ids, mask, types = batch()
    a, b = dense(ids, mask, types), moe(ids, mask, types)
    real = mask.bool()  # (padding positions differ: the MoE block does not compute them)
    torch.testing.assert_close(a.last_hidden_state[real], b.last_hidden_state[real], atol=1e-6, rtol=1e-6)
    # One expert: every token goes there, and l_aux = E * sum(mean gate * fraction routed) = 1 * 1 * 21/27
    # in each layer; the loss is the mean over the layers.
    assert [c.tolist() for c in b.expert_counts] == [[21], [21]]
    torch.testing.assert_close(b.aux_loss, torch.tensor(0.01 * 21 / 27))


def test_top1_routing_and_aux_loss_by_hand():
    torch.manual_seed(1)
    config = tiny_config(num_layers=1, num_experts=4, aux_loss_weight=0.3)
    model = Student(config).eval()
    with torch.no_grad():  # a sharper router so that all experts get tokens
        model.layers[0].ffn.deepspeed_moe.gate.wg.weight.mul_(50)
    ids, mask, types = batch(lengths=(16, 11, 13))
    seen = {}
    ffn = model.layers[0].ffn
    ffn.register_forward_hook(lambda m, inputs, output: seen.update(x=inputs[0], y=output[0]))
    out = model(ids, mask, types)

    x = seen["x"].reshape(-1, 24)  # (S, H) tokens entering the MoE block
    real = mask.reshape(-1).bool()
    gate = ffn.deepspeed_moe.gate.wg
    probs = torch.softmax(x @ gate.weight.T + gate.bias, dim=-1)  # (S, E); the authors' router has a bias
    choice = probs.argmax(-1)
    counts = torch.bincount(choice[real], minlength=4)
    assert out.expert_counts[0].tolist() == counts.tolist() and (counts > 0).sum() >= 3
    # Switch/GShard balance loss: E * sum_e mean_s(p_se) * (tokens routed to e) / S.
    l_aux = 4 * (probs.mean(0) * counts / x.size(0)).sum()
    torch.testing.assert_close(out.aux_loss, 0.3 * l_aux)
    # Top-1: a real token's output is its one expert's FFN output scaled by that expert's gate value.
    experts = ffn.deepspeed_moe.experts.deepspeed_experts
    y = seen["y"].reshape(-1, 24)
    for s in torch.nonzero(real).flatten().tolist():
        e = choice[s].item()
        torch.testing.assert_close(y[s], probs[s, e] * experts[e](x[s]), atol=1e-5, rtol=1e-5)
    assert torch.all(y[~real] == 0)  # padding is not routed


def test_router_noise_changes_training_routing_only():
    torch.manual_seed(0)
    model = Student(tiny_config(num_layers=1, num_experts=4))
    ids, mask, types = batch(lengths=(16, 16, 16))
    model.eval()
    eval_counts = {tuple(model(ids, mask, types).expert_counts[0].tolist()) for _ in range(3)}
    model.train()
    train_counts = {tuple(model(ids, mask, types).expert_counts[0].tolist()) for _ in range(5)}
    assert len(eval_counts) == 1 and len(train_counts) > 1


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("num_experts", [1, 4])
def test_save_load_round_trip(tmp_path, num_experts, teacher_dir, umask_022):
    from minimoe_common.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = Student(tiny_config(num_experts=num_experts)).eval()
    model.save_pretrained(tmp_path)
    load_tokenizer(str(teacher_dir)).save_pretrained(str(tmp_path))
    assert is_student_dir(tmp_path) and (tmp_path / "tokenizer.json").is_file()
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in tmp_path.iterdir()} == {
        f.name: "0o644" for f in tmp_path.iterdir()}  # readable by others (safetensors itself writes 0600)
    loaded = Student.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    from deepspeed.moe.utils import is_moe_param  # loading kept DeepSpeed's marks on the expert weights
    training = Student.from_pretrained(tmp_path, deepspeed_moe=True)
    assert all(is_moe_param(p) == (".deepspeed_experts." in n) for n, p in training.named_parameters())
    ids, mask, types = batch()
    torch.testing.assert_close(loaded(ids, mask, types).last_hidden_state, model(ids, mask, types).last_hidden_state,
                               atol=0, rtol=0)


def test_model_saved_with_ep_size_2_loads_in_one_process(tmp_path):
    torch.manual_seed(0)
    model = Student(tiny_config(num_experts=4)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "ep_size" not in config  # a launch setting, not saved
    (tmp_path / "config.json").write_text(json.dumps({**config, "ep_size": 2}))  # as configs held it before
    loaded = Student.from_pretrained(tmp_path).eval()
    assert loaded.ep_size == 1 and "ep_size" not in loaded.config.to_dict()
    ids, mask, types = batch()
    torch.testing.assert_close(loaded(ids, mask, types).last_hidden_state, model(ids, mask, types).last_hidden_state)


def test_model_dirs_of_the_earlier_format_load(tmp_path):
    """config.json as our hand-written saver wrote it (model_type and every field, ep_size, task_head) next to a
    bare safetensors file: transformers' from_pretrained loads it, head weights included."""
    torch.manual_seed(0)
    head = StudentForSequenceClassification(tiny_config(num_experts=4, num_labels=3)).eval()
    task_head = {"kind": "sequence_classification", "num_labels": 3}
    (tmp_path / "config.json").write_text(json.dumps({**head.config.student_dict(), "ep_size": 1, "task_head": task_head}))
    save_file(head.state_dict(), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = StudentForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.num_labels == 3 and loaded.config == head.config
    ids, mask, types = batch()
    torch.testing.assert_close(loaded(ids, mask, types).logits, head(ids, mask, types).logits, atol=1e-6, rtol=1e-5)


def test_localize_experts_keeps_this_ranks_experts_renumbered(monkeypatch):
    key = "layers.0.ffn.deepspeed_moe.experts.deepspeed_experts.{}.fc1.weight"
    state = {key.format(e): torch.full((1,), float(e)) for e in range(4)} | {"embeddings.x": torch.zeros(1)}
    monkeypatch.setattr(moe, "_expert_parallel_rank", lambda ep_size: 1)
    local = localize_experts(state, num_experts=4, ep_size=2)
    assert sorted(local) == sorted([key.format(0), key.format(1), "embeddings.x"])
    assert (local[key.format(0)].item(), local[key.format(1)].item()) == (2.0, 3.0)


def test_sequence_head_losses_and_reload(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(num_experts=4)
    Student(config).save_pretrained(tmp_path / "student")
    ids, mask, types = batch()
    head = StudentForSequenceClassification.from_pretrained(tmp_path / "student", num_labels=3).eval()
    labels = torch.tensor([0, 2, 1])
    out = head(ids, mask, types, labels=labels)
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels) + out.aux_loss)
    head.save_pretrained(tmp_path / "head")
    again = StudentForSequenceClassification.from_pretrained(tmp_path / "head").eval()
    assert again.num_labels == 3
    # (not bitwise: transformers maps the weights from the file, so their alignment and thus the kernels may differ)
    torch.testing.assert_close(again(ids, mask, types).logits, out.logits, atol=1e-6, rtol=1e-5)
    # The encoder of a saved head loads as a plain student.
    torch.testing.assert_close(Student.from_pretrained(tmp_path / "head").eval()(ids, mask, types).last_hidden_state,
                               head.student(ids, mask, types).last_hidden_state, atol=1e-6, rtol=1e-5)

    regression = StudentForSequenceClassification(tiny_config(num_experts=4, num_labels=1)).eval()
    target = torch.tensor([0.5, 1.0, 4.0])
    out = regression(ids, mask, types, labels=target)
    torch.testing.assert_close(out.loss, ((out.logits[:, 0] - target) ** 2).mean() + out.aux_loss)


def test_token_head_ignores_minus_100():
    torch.manual_seed(0)
    head = StudentForTokenClassification(tiny_config(num_labels=5)).eval()
    ids, mask, types = batch()
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    out = head(ids, mask, types, labels=labels)
    assert out.logits.shape == (3, 9, 5)
    real = labels != -100
    expected = -torch.log_softmax(out.logits, -1)[real].gather(1, labels[real][:, None]).mean()
    torch.testing.assert_close(out.loss, expected)


def test_low_rank_ffn_from_config_round_trips(tmp_path):
    path = "layers.1.ffn.deepspeed_moe.experts.deepspeed_experts.2.fc1"
    config = tiny_config(num_experts=4, ffn_ranks={path: 3, "layers.0.ffn.deepspeed_moe.experts.deepspeed_experts.0.fc2": 5})
    model = Student(config, deepspeed_moe=True).eval()
    low = model.ffn_linears()[path]
    assert (low.down.weight.shape, low.up.weight.shape) == ((3, 24), (96, 3))
    from deepspeed.moe.utils import is_moe_param  # the engine's MoE param groups still see expert weights
    assert all(is_moe_param(p) for p in low.parameters())
    model.save_pretrained(tmp_path)
    ids, mask, types = batch()
    torch.testing.assert_close(Student.from_pretrained(tmp_path).eval()(ids, mask, types).last_hidden_state,
                               model(ids, mask, types).last_hidden_state, atol=0, rtol=0)
    with pytest.raises(ValueError, match="ffn_ranks: 'layers.0.attention.query' is not an FFN Linear"):
        Student(tiny_config(ffn_ranks={"layers.0.attention.query": 2}))


def test_gathered_rows_take_their_gradients_back_to_their_rows():
    """Rows 5, 0, 3 of 6 (1, 2 and 4 left out, as padding is): the gradient of row r is the upstream gradient
    of the position r went to, and zero for rows not gathered."""
    from pipeline.models.moe import _GatherRows

    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([5, 0, 3])
    upstream = torch.randn(3, 4, dtype=torch.float64)
    _GatherRows.apply(x, rows).backward(upstream)
    expected = torch.zeros(6, 4, dtype=torch.float64)
    expected[5], expected[0], expected[3] = upstream[0], upstream[1], upstream[2]
    assert torch.equal(x.grad, expected)
    assert torch.equal(_GatherRows.apply(x, rows), x.detach()[[5, 0, 3]])


@pytest.mark.parametrize("noise", ["LogitJitter", "RSample", "Jitter", None])
def test_sorted_dispatch_equals_deepspeed_dispatch(noise):
    """Our local sort-based dispatch against DeepSpeed's own capacity-padded MoE.forward: same outputs,
    aux loss, counts and gradients, in training mode with the same router noise draws."""
    torch.manual_seed(0)
    model = Student(tiny_config(num_experts=4, router_noise=noise, relation_projection=False), deepspeed_moe=True).train()
    sorted_dispatch = training_step(model)
    use_deepspeeds_dispatch(model)
    assert_same_step(sorted_dispatch, training_step(model))


def use_deepspeeds_dispatch(model: Student) -> None:
    """Every MoE block of `model` runs DeepSpeed's own capacity-padded MoE.forward (which routes by the hidden
    states alone: no token ids)."""
    from deepspeed.moe.layer import MoE

    for layer in model.layers:
        layer.ffn.forward = lambda x, used, token_ids=None, block=layer.ffn: MoE.forward(block, x, used)


def training_step(model: Student) -> tuple:
    """(output, parameter gradients) of one training forward/backward on a fixed batch and router-noise seed."""
    ids, mask, types = batch(lengths=(16, 11, 13))
    torch.manual_seed(5)
    out = model(ids, mask, types)
    (out.last_hidden_state[mask.bool()].square().mean() + out.aux_loss).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out, grads, mask.bool()


def assert_same_step(a: tuple, b: tuple) -> None:
    (out_a, grads_a, real), (out_b, grads_b, _) = a, b  # (padding positions differ: MoE blocks skip them)
    torch.testing.assert_close(out_a.last_hidden_state[real], out_b.last_hidden_state[real], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_a.aux_loss, out_b.aux_loss)
    assert [c.tolist() for c in out_a.expert_counts] == [c.tolist() for c in out_b.expert_counts]
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


def test_hash_routing_by_hand(tmp_path):
    """routing "hash" (MoEBERT's hash-random): layer l's table is row l of one (layers, vocab) draw from hash_seed;
    each real token goes to its id's expert, unscaled; padding is neither computed nor counted; no router
    parameters; DeepSpeed's layer routes the same; the tables are saved with the weights; bad settings refused."""
    from pipeline.distill import RouterStats

    config = tiny_config(num_experts=4, routing="hash", hash_seed=7, relation_projection=False)
    tables = torch.randint(4, (2, 50), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    model = Student(config).eval()
    assert not any(".gate." in name for name, _ in model.named_parameters())
    ids, mask, types = batch()
    out = model(ids, mask, types)
    flat_ids, real = ids.reshape(-1), mask.reshape(-1).bool()
    for table, counts in zip(tables, out.expert_counts):
        assert counts.tolist() == torch.bincount(table[flat_ids[real]], minlength=4).tolist()

    block = model.layers[1].ffn
    x = torch.randn(*ids.shape, 24)
    y, _, _ = block(x, mask.reshape(-1), flat_ids)
    experts = block.deepspeed_moe.experts.deepspeed_experts
    with torch.no_grad():
        expected = torch.stack([experts[int(tables[1, token])](row) if used else torch.zeros(24)
                                for row, token, used in zip(x.reshape(-1, 24), flat_ids, real)])
    torch.testing.assert_close(y.reshape(-1, 24), expected, atol=1e-6, rtol=1e-5)

    deepspeed_path = Student(config, deepspeed_moe=True).eval()
    deepspeed_path.load_state_dict(model.state_dict())
    torch.testing.assert_close(deepspeed_path(ids, mask, types).last_hidden_state[mask.bool()],
                               out.last_hidden_state[mask.bool()], atol=1e-6, rtol=1e-5)
    assert RouterStats(deepspeed_path, torch.device("cpu")).sums.shape == (0, 2)  # no router to measure

    # The table travels with the weights: a changed one (the seed would redraw the old) comes back from disk.
    changed = (tables[1] + 1) % 4
    model.layers[1].ffn.deepspeed_moe.gate.expert_of_token.copy_(changed)
    model.save_pretrained(tmp_path)
    loaded = Student.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.layers[1].ffn.deepspeed_moe.gate.expert_of_token, changed)
    torch.testing.assert_close(loaded(ids, mask, types).last_hidden_state, model(ids, mask, types).last_hidden_state)
    with pytest.raises(ValueError, match=r"routing 'hash' routes top-1 without dropping tokens \(got top_k 2"):
        tiny_config(num_experts=4, routing="hash", top_k=2)
    with pytest.raises(ValueError, match=r"routing 'sentence' must be 'learned' or 'hash'"):
        tiny_config(num_experts=4, routing="sentence")


def test_deepspeed_optimizer_groups_separate_the_experts():
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    model = Student(tiny_config(num_experts=4), deepspeed_moe=True)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    expert_ids = {id(p) for n, p in model.named_parameters() if ".deepspeed_experts." in n}
    assert len(expert_ids) == 2 * 4 * 4  # 2 layers x 4 experts x (fc1, fc2) x (weight, bias)
    moe_groups = [g for g in groups if g.get("moe")]
    assert {id(p) for g in moe_groups for p in g["params"]} == expert_ids
    assert all(id(p) not in expert_ids for g in groups if not g.get("moe") for p in g["params"])


@pytest.mark.parametrize("noise", ["LogitJitter", "RSample", "Jitter", None])
def test_plain_torch_moe_equals_deepspeeds_moe_layer(noise):
    """The plain-torch MoE (what a loaded model runs) against DeepSpeed's own capacity-padded MoE.forward on the
    same weights: same outputs, aux loss, counts and gradients, in training mode with the same noise draws."""
    from deepspeed.moe.layer import MoE

    torch.manual_seed(0)
    config = tiny_config(num_experts=4, router_noise=noise, relation_projection=False)
    reference = Student(config, deepspeed_moe=True).train()
    use_deepspeeds_dispatch(reference)
    plain = Student(config).train()
    plain.load_state_dict(reference.state_dict())
    assert not any(isinstance(m, MoE) for m in plain.modules())
    assert_same_step(training_step(plain), training_step(reference))


NO_DEEPSPEED = """
import importlib.abc, sys, torch
class NoDeepSpeed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "deepspeed":
            raise ImportError("deepspeed is not installed here")
sys.meta_path.insert(0, NoDeepSpeed())
import pipeline  # registers the student with the Auto classes
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1]).eval()
ids, mask = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(ids, mask).last_hidden_state, sys.argv[3])
assert "deepspeed" not in sys.modules
"""


def test_a_saved_moe_student_runs_in_a_process_without_deepspeed(tmp_path):
    """AutoModel in a fresh process where `import deepspeed` fails, no trust_remote_code: the outputs of
    DeepSpeed's own MoE layer on the same weights (capacity-padded dispatch), within 1e-6."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = Student(tiny_config(num_experts=4, attention_experts=2), deepspeed_moe=True).eval()
    use_deepspeeds_dispatch(model)
    model.save_pretrained(tmp_path / "model")
    ids, mask, _ = batch()
    torch.save((ids, mask), tmp_path / "batch.pt")
    run = subprocess.run([sys.executable, "-c", NO_DEEPSPEED, str(tmp_path / "model"), str(tmp_path / "batch.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True)[real], expected[real],
                               atol=1e-6, rtol=1e-5)
