"""The MiniMoE student as the authors built it (GeneZC/MiniMoE): the relation projection, the router and its
noise, the balance loss averaged over layers, the moefy expert initialisation and attention experts. The
expected values are computed here by hand, from the authors' definitions."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import layers, moe
from pipeline.distill import build_student
from pipeline.models import Student, StudentConfig
from pipeline.objectives import minilm_relation_loss


def tiny_moe(**overrides) -> StudentConfig:
    values = dict(num_layers=2, hidden_size=24, num_heads=2, vocab_size=50, max_position_embeddings=16, dropout=0.0,
                  num_experts=4)
    return StudentConfig(**{**values, **overrides})


def batch(lengths=(16, 11, 13), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def experts_of(layer) -> list:
    return list(layer.ffn.deepspeed_moe.experts.deepspeed_experts)


def test_relation_projection_is_on_for_moe_students_only():
    assert tiny_moe().relation_projection and not tiny_moe(num_experts=1).relation_projection
    assert tiny_moe(num_experts=1, relation_projection=True).relation_projection  # available for dense ones


def test_relations_come_from_the_projection_of_the_last_hidden_state():
    torch.manual_seed(0)
    model = Student(tiny_moe()).eval()
    ids, mask = batch()
    out = model(ids, mask)
    projection = model.relation_projection
    for got, linear in zip(out.relation_qkv, (projection.query, projection.key, projection.value)):
        torch.testing.assert_close(got, linear(out.last_hidden_state))


@pytest.mark.parametrize("projection", [True, False])
def test_the_last_layers_experts_get_relation_gradient_only_with_the_projection(projection):
    torch.manual_seed(0)
    model = Student(tiny_moe(relation_projection=projection, aux_loss_weight=0.0)).train()
    ids, mask = batch()
    out = model(ids, mask)
    teacher = tuple(torch.randn(3, 16, 32) for _ in range(3))
    loss, _ = minilm_relation_loss(out.relation_qkv, teacher, mask, num_relation_heads=4)
    loss.backward()
    last_expert_grads = [e.fc1.weight.grad for e in experts_of(model.layers[-1])]
    routed = out.expert_counts[-1] > 0
    if projection:
        assert all(model.relation_projection.query.weight.grad.abs().sum() > 0 for _ in [0])
        assert all(g is not None and g.abs().sum() > 0 for g, r in zip(last_expert_grads, routed) if r)
    else:  # the last layer's own Q/K/V come before its FFN: the FFN's experts get no gradient at all
        assert all(g is None for g in last_expert_grads)


def test_router_is_a_biased_linear_with_pytorch_default_init():
    torch.manual_seed(0)
    gate = Student(tiny_moe(hidden_size=384, num_heads=12)).layers[0].ffn.deepspeed_moe.gate.wg
    assert gate.bias is not None and gate.weight.shape == (4, 384)
    bound = 1 / 384 ** 0.5  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
    assert gate.weight.abs().max() <= bound and gate.weight.abs().max() > 0.95 * bound
    assert gate.bias.abs().max() <= bound and gate.bias.abs().max() > 0
    assert not Student(tiny_moe(router_bias=False)).layers[0].ffn.deepspeed_moe.gate.wg.bias


def test_logit_jitter_is_uniform_within_the_dropout_width():
    torch.manual_seed(0)
    gate = Student(tiny_moe(router_jitter=0.1)).layers[0].ffn.deepspeed_moe.gate
    x = torch.randn(20000, 24)
    noise = gate.train().logits(x) - gate.eval().logits(x)
    assert noise.abs().max() <= 0.1 and noise.abs().max() > 0.099
    assert noise.mean().abs() < 2e-3  # U(-0.1, 0.1): mean 0, variance 0.2^2 / 12
    assert noise.var().item() == pytest.approx(0.04 / 12, rel=0.03)


def agreement(noise: str | None, logit_std: float = 1.0, tokens: int = 20000) -> float:
    """Share of tokens whose training-time expert equals the eval-time argmax, for router logits of the given std."""
    torch.manual_seed(0)
    gate = Student(tiny_moe(router_noise=noise, router_bias=False)).layers[0].ffn.deepspeed_moe.gate
    x = torch.randn(tokens, 24)
    with torch.no_grad():
        gate.wg.weight.normal_(std=logit_std / 24 ** 0.5)  # logits x W^T have std logit_std
    eval_choice = gate.eval().choose(gate.logits(x))[1]
    train_choice = gate.train().choose(gate.logits(x))[1]
    return (train_choice == eval_choice).float().mean().item()


def test_training_choice_agrees_with_eval_far_more_under_logit_jitter_than_under_rsample():
    # By hand: with a +-0.1 jitter only near-ties flip (~97% agree); Gumbel noise makes the choice a sample
    # of softmax(logits), whose top class has ~52% probability for 4 standard-normal logits.
    assert agreement("LogitJitter") > 0.95
    assert 0.45 < agreement("RSample") < 0.6
    assert agreement(None) == 1.0


def test_balance_loss_is_the_mean_over_layers_by_hand():
    torch.manual_seed(3)
    model = Student(tiny_moe(num_layers=3, aux_loss_weight=0.5)).eval()
    ids, mask = batch()
    seen = []
    for layer in model.layers:
        layer.ffn.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0].reshape(-1, 24)))
    out = model(ids, mask)
    real = mask.reshape(-1).float()
    per_layer = []
    for layer, x in zip(model.layers, seen):
        wg = layer.ffn.deepspeed_moe.gate.wg
        probs = torch.softmax(x @ wg.weight.T + wg.bias, -1)
        routed = F.one_hot(probs.argmax(-1), 4).float() * real[:, None]  # padding is not routed
        per_layer.append(4 * (probs.mean(0) * routed.mean(0)).sum())  # E * sum_e me_e * ce_e
    torch.testing.assert_close(out.aux_loss, 0.5 * sum(per_layer) / 3)


def test_moefy_experts_share_two_thirds_of_their_neurons():
    torch.manual_seed(0)
    model = Student(tiny_moe(hidden_size=24, intermediate_size=12))  # 12 neurons per expert: 8 shared, 4 own
    for layer in model.layers:
        experts = experts_of(layer)
        for a, b in itertools.combinations(experts, 2):
            same_rows = (a.fc1.weight == b.fc1.weight).all(1)  # (12,) neuron i of a == neuron i of b
            same_cols = (a.fc2.weight == b.fc2.weight).all(0)
            assert same_rows.tolist() == [True] * 8 + [False] * 4
            assert same_cols.tolist() == [True] * 8 + [False] * 4
        own = torch.cat([e.fc1.weight[8:] for e in experts])  # 4 experts x 4 own neurons, all distinct
        assert len({tuple(row.tolist()) for row in own}) == 16
    other_layer = experts_of(model.layers[1])[0].fc1.weight
    assert not torch.equal(experts_of(model.layers[0])[0].fc1.weight, other_layer)
    independent = Student(tiny_moe(intermediate_size=12, expert_init="independent"))
    a, b = experts_of(independent.layers[0])[:2]
    assert not (a.fc1.weight == b.fc1.weight).all(1).any()


def test_moefy_neuron_cut_matches_the_authors_strided_slices():
    # The authors' moefy on a wide layer of E x n = 4 x 6 neurons: shared = rows[:4]; expert e takes
    # rows[4:][e::4] and keeps the first n - 4 = 2 of them, i.e. rows 4 + e and 8 + e.
    cuts = moe.moefy_neurons(4, 6)
    assert [c.tolist() for c in cuts] == [[0, 1, 2, 3, 4 + e, 8 + e] for e in range(4)]


@pytest.mark.parametrize("rank", [0, 1])
def test_moefy_init_is_the_same_whatever_ep_size(monkeypatch, rank):
    config = tiny_moe(intermediate_size=12)
    full = build_student(config, seed=7).state_dict()
    monkeypatch.setattr(moe, "_expert_parallel_rank", lambda ep_size: rank)
    local = build_student(config, seed=7, ep_size=2).state_dict()
    for key, value in local.items():  # rank r holds global experts 2r and 2r + 1
        match = moe.EXPERT_KEY.match(key)
        global_key = key if match is None else f"{match[1]}{2 * rank + int(match[2])}{match[3]}"
        assert torch.equal(value, full[global_key]), key


def test_attention_experts_route_each_token_through_one_experts_projections():
    torch.manual_seed(0)
    model = Student(tiny_moe(num_layers=1, attention_experts=2, num_heads=2)).eval()
    attention = model.layers[0].attention
    ids, mask = batch()
    seen = {}
    attention.register_forward_hook(lambda m, inputs, output: seen.update(x=inputs[0], out=output))
    model(ids, mask)
    x = seen["x"].reshape(-1, 24)
    out, (q, k, v), (l_aux, counts) = seen["out"]
    wg = attention.router.wg
    probs = torch.softmax(x @ wg.weight.T + wg.bias, -1)
    choice = probs.argmax(-1)
    real = mask.reshape(-1).bool()
    assert counts.tolist() == torch.bincount(choice[real], minlength=2).tolist() and (counts > 0).all()
    for s in range(x.size(0)):  # Q, K and V of token s are those of its expert
        expert = attention.experts[choice[s]]
        torch.testing.assert_close(q.reshape(-1, 24)[s], expert.query(x[s]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v.reshape(-1, 24)[s], expert.value(x[s]), atol=1e-6, rtol=1e-5)
    # Attention over all tokens with the mixed Q/K/V, then the token's expert output scaled by its gate value.
    context = layers.attend(q, k, v, mask.bool()[:, None, None, :], 2, 0.0).reshape(-1, 24)
    for s in torch.nonzero(real).flatten().tolist():
        expected = probs[s, choice[s]] * attention.experts[choice[s]].output(context[s])
        torch.testing.assert_close(out.reshape(-1, 24)[s], expected, atol=1e-5, rtol=1e-5)
    # Attention experts share 2/3 of their heads at init (12 heads: 8 shared), like the FFN experts.
    wide = Student(tiny_moe(num_layers=1, attention_experts=2, num_heads=12)).layers[0].attention.experts
    same_heads = (wide[0].query.weight == wide[1].query.weight).all(1).view(12, 2).all(1)
    assert same_heads.tolist() == [True] * 8 + [False] * 4


def test_attention_and_ffn_balance_losses_are_averaged_separately_then_together():
    torch.manual_seed(0)
    model = Student(tiny_moe(num_layers=2, attention_experts=2, aux_loss_weight=1.0)).eval()
    ids, mask = batch()
    aux = {"attention": [], "ffn": []}
    for layer in model.layers:
        layer.attention.register_forward_hook(lambda m, i, o: aux["attention"].append(o[2][0]))
        layer.ffn.register_forward_hook(lambda m, i, o: aux["ffn"].append(o[1]))
    out = model(ids, mask)
    expected = (sum(aux["attention"]) / 2 + sum(aux["ffn"]) / 2) / 2
    torch.testing.assert_close(out.aux_loss, expected)


def test_old_model_dirs_keep_the_router_they_were_trained_with(tmp_path):
    config = tiny_moe().to_dict()
    for field in ("router_bias", "expert_init", "relation_projection"):  # a config.json written before them
        config.pop(field)
    old = StudentConfig.from_dict(config)
    assert (old.router_bias, old.expert_init, old.relation_projection) == (False, "independent", False)
    hand_written = {k: v for k, v in config.items() if k != "model_type"}  # a user's file: today's defaults
    assert StudentConfig.from_dict(hand_written).router_bias
