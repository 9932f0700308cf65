"""Objectives against references written differently: per-example, per-head Python loops over the
unpadded part of each sequence, and hand formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pipeline.objectives as objectives
from pipeline.objectives import logit_kd_loss, minilm_relation_loss, tinybert_loss


def padded_inputs(seed, lengths, hidden, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    qkv = tuple((torch.randn(len(lengths), T, hidden, generator=g) * scale).to(dtype) for _ in range(3))
    return qkv, mask


def reference_relation_kl(s, t, length, heads):
    """KL(teacher || student) of one example's relation, averaged over its real rows and the heads."""
    total = 0.0
    for h in range(heads):
        ds, dt = s.size(-1) // heads, t.size(-1) // heads
        sh = s[:length, h * ds:(h + 1) * ds].double()
        th = t[:length, h * dt:(h + 1) * dt].double()
        for i in range(length):
            p_s = torch.softmax(sh[i] @ sh.T / math.sqrt(ds), 0)
            p_t = torch.softmax(th[i] @ th.T / math.sqrt(dt), 0)
            total += float((p_t * (p_t.log() - p_s.log())).sum())
    return total


def test_relation_loss_matches_per_example_per_head_loop_with_different_hidden_sizes():
    lengths, heads = (7, 3, 5), 4
    student, mask = padded_inputs(0, lengths, hidden=16)
    teacher, _ = padded_inputs(1, lengths, hidden=40, scale=2.0)
    loss, parts = minilm_relation_loss(student, teacher, mask, num_relation_heads=heads)
    expected = {}
    for name, s, t in zip(("qq", "kk", "vv"), student, teacher):
        kl = sum(reference_relation_kl(s[b], t[b], n, heads) for b, n in enumerate(lengths))
        expected[name] = kl / (sum(lengths) * heads)  # mean over real rows and relation heads
    for name in ("qq", "kk", "vv"):
        assert parts[name].item() == pytest.approx(expected[name], rel=1e-5)
    assert loss.item() == pytest.approx(sum(expected.values()) / 3, rel=1e-5)


def reference_relation_loss(student, teacher, lengths, heads):
    """The loss by another route, float64 and differentiable: per example and head, F.kl_div between the
    log-softmaxes of the unpadded (n, n) relations, summed, then divided by the real rows x heads."""
    parts = []
    for s, t in zip(student, teacher):
        total = 0.0
        for b, n in enumerate(lengths):
            for sh, th in zip(s[b, :n].double().chunk(heads, -1), t[b, :n].double().chunk(heads, -1)):
                log_s = F.log_softmax(sh @ sh.T / math.sqrt(sh.size(-1)), -1)
                log_t = F.log_softmax(th @ th.T / math.sqrt(th.size(-1)), -1)
                total = total + F.kl_div(log_s, log_t, reduction="sum", log_target=True)
        parts.append(total / (sum(lengths) * heads))
    return sum(parts) / 3, parts


@pytest.mark.parametrize("lengths, hidden, heads, chunk_pairs", [
    ((7, 3, 5), (16, 40), 4, 5),  # 12 (example, head) pairs in chunks of 5, 5, 2
    ((9, 4), (384, 768), 32, None),  # the paper's 384-wide student and 768-wide teacher, 32 relation heads
    ((512, 301), (32, 64), 2, 1),  # T = 512, one pair per chunk
])
def test_relation_loss_values_and_gradients_match_the_kl_div_reference(monkeypatch, lengths, hidden, heads,
                                                                        chunk_pairs):
    if chunk_pairs:
        monkeypatch.setitem(objectives.RELATION_CHUNK_ELEMENTS, "cpu", chunk_pairs * max(lengths) ** 2)
    student, mask = padded_inputs(0, lengths, hidden=hidden[0])
    teacher, _ = padded_inputs(1, lengths, hidden=hidden[1], scale=2.0)
    student = tuple(x.requires_grad_() for x in student)
    loss, parts = minilm_relation_loss(student, teacher, mask, num_relation_heads=heads)
    grads = torch.autograd.grad(loss, student)
    ref_student = tuple(x.detach().double().requires_grad_() for x in student)
    ref_loss, ref_parts = reference_relation_loss(ref_student, teacher, lengths, heads)
    ref_grads = torch.autograd.grad(ref_loss, ref_student)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, ref in zip(("qq", "kk", "vv"), ref_parts):
        assert parts[name].item() == pytest.approx(ref.item(), rel=1e-5)
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert torch.all(g[mask == 0] == 0)  # padded positions: no gradient


def test_relation_loss_keeps_no_relation_sized_tensor_and_gives_the_teacher_no_gradient():
    # Memory-flat: what autograd saves for backward is no larger than the (B, T, H) inputs, whatever T x T.
    student, mask = padded_inputs(0, (64, 40), hidden=16)
    teacher, _ = padded_inputs(1, (64, 40), hidden=24)
    student = tuple(x.requires_grad_() for x in student)
    teacher = tuple(x.requires_grad_() for x in teacher)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        loss, _ = minilm_relation_loss(student, teacher, mask, num_relation_heads=4)
    loss.backward()
    assert saved and max(saved) <= 2 * 64 * 24  # a (B, R, T, T) relation would be 2 * 4 * 64 * 64
    assert all(x.grad is not None for x in student) and all(x.grad is None for x in teacher)


def test_relation_loss_of_bf16_inputs_is_the_fp32_loss_of_the_same_values():
    student, mask = padded_inputs(0, (6, 4), hidden=32, dtype=torch.bfloat16)
    teacher, _ = padded_inputs(1, (6, 4), hidden=48, dtype=torch.bfloat16)
    half = tuple(x.requires_grad_() for x in student)
    full = tuple(x.detach().float().requires_grad_() for x in student)
    (a, _), (b, _) = (minilm_relation_loss(x, teacher, mask, num_relation_heads=4) for x in (half, full))
    a.backward()
    b.backward()
    assert a.dtype == torch.float32 and a.item() == pytest.approx(b.item(), rel=1e-6)
    for h, f in zip(half, full):
        assert h.grad.dtype == torch.bfloat16
        torch.testing.assert_close(h.grad.float(), f.grad.to(torch.bfloat16).float())  # fp32 gradient, rounded once


def test_relation_loss_ignores_padding_values_and_is_zero_for_equal_inputs():
    qkv, mask = padded_inputs(0, (6, 2), hidden=24)
    loss, _ = minilm_relation_loss(qkv, qkv, mask, num_relation_heads=3)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    teacher, _ = padded_inputs(1, (6, 2), hidden=24)
    noisy = tuple(x.masked_fill(mask[..., None] == 0, 1e4) for x in qkv)
    a, _ = minilm_relation_loss(qkv, teacher, mask, num_relation_heads=3)
    b, _ = minilm_relation_loss(noisy, teacher, mask, num_relation_heads=3)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_relation_loss_is_finite_in_half_precision_with_large_activations(dtype):
    # The third example is all padding: its rows and keys are masked out entirely, and must not give NaN.
    student, mask = padded_inputs(0, (8, 3, 0), hidden=32, dtype=dtype, scale=30.0)
    teacher, _ = padded_inputs(1, (8, 3, 0), hidden=64, dtype=dtype, scale=30.0)
    student = tuple(x.requires_grad_() for x in student)
    loss, parts = minilm_relation_loss(student, teacher, mask, num_relation_heads=4, aux_loss=torch.tensor(0.02))
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(torch.isfinite(x.grad).all() for x in student)
    assert torch.all(student[0].grad[1, 3:] == 0) and torch.all(student[0].grad[2] == 0)  # padding: no gradient
    assert parts["aux"].item() == pytest.approx(0.02)
    assert parts["loss"].item() == pytest.approx((parts["qq"] + parts["kk"] + parts["vv"]).item() / 3 + 0.02, rel=1e-5)


def test_relation_heads_must_divide_hidden():
    qkv, mask = padded_inputs(0, (4,), hidden=30)
    with pytest.raises(ValueError, match="hidden size 30 is not divisible by 32 heads"):
        minilm_relation_loss(qkv, qkv, mask)


def unpadded_mse(student, teacher, lengths, pairs: bool):
    """F.mse_loss of example b's first n tokens cut out by hand (with pairs, its n x n real (query, key) scores of
    every head), the examples joined."""
    cut = [(x[b, :, :n, :n] if pairs else x[b, :n]).flatten() for x in (student, teacher) for b, n in enumerate(lengths)]
    return F.mse_loss(torch.cat(cut[:len(lengths)]), torch.cat(cut[len(lengths):]))


def tinybert_reference(s_scores, t_scores, s_hidden, t_hidden, projection, lengths):
    """TinyBERT's loss as a plain per-layer loop: (embedding, attention summed over layers, hidden summed)."""
    attention = sum(unpadded_mse(s, t, lengths, pairs=True) for s, t in zip(s_scores, t_scores))
    hidden = [unpadded_mse(projection(s), t, lengths, pairs=False) for s, t in zip(s_hidden, t_hidden)]
    return hidden[0], attention, sum(hidden[1:])


def test_tinybert_loss_matches_a_per_layer_loop_values_and_gradients():
    torch.manual_seed(0)
    lengths, heads, layers = (6, 3, 5), 2, 3
    B, T = len(lengths), max(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    s_scores = [torch.randn(B, heads, T, T, requires_grad=True) for _ in range(layers)]
    t_scores = [torch.randn(B, heads, T, T) * 3 for _ in range(layers)]
    s_hidden = [torch.randn(B, T, 8, requires_grad=True) for _ in range(layers + 1)]  # the embeddings' first
    t_hidden = [torch.randn(B, T, 12) for _ in range(layers + 1)]
    projection = torch.nn.Linear(8, 12)
    loss, parts = tinybert_loss(s_scores, t_scores, s_hidden, t_hidden, projection, mask, aux_loss=torch.tensor(0.5))
    embedding, attention, hidden = tinybert_reference(s_scores, t_scores, s_hidden, t_hidden, projection, lengths)
    for name, expected in (("embedding", embedding), ("attention", attention), ("hidden", hidden)):
        assert parts[name].item() == pytest.approx(expected.item(), rel=1e-6), name
    assert loss.item() == pytest.approx((embedding + attention + hidden).item() + 0.5, rel=1e-6)
    leaves = [*s_scores, *s_hidden, projection.weight, projection.bias]
    ours = torch.autograd.grad(loss, leaves)
    for got, expected in zip(ours, torch.autograd.grad(embedding + attention + hidden, leaves)):
        torch.testing.assert_close(got, expected)
    assert all(torch.all(g[1, :, 3:] == 0) and torch.all(g[1, :, :, 3:] == 0) for g in ours[:layers])  # padding
    # Padded entries count for nothing: changing them changes no part.
    t_scores[0][1, :, 3:] += 100.0
    t_hidden[1][1, 3:] -= 100.0
    again = tinybert_loss(s_scores, t_scores, s_hidden, t_hidden, projection, mask)[1]
    assert all(again[k].item() == parts[k].item() for k in ("embedding", "attention", "hidden"))


def test_tinybert_loss_refuses_mismatched_inputs():
    scores, hidden, mask = [torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 3, 4)] * 2, torch.ones(1, 3)
    projection = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"student \(1, 2, 3, 3\), teacher \(1, 4, 3, 3\) \(TinyBERT needs equal head"):
        tinybert_loss(scores, [torch.zeros(1, 4, 3, 3)], hidden, hidden, projection, mask)
    with pytest.raises(ValueError, match="M attention scores and M \\+ 1 hidden states"):
        tinybert_loss(scores, scores, hidden[:1], hidden[:1], projection, mask)


def test_tinybert_projection_in_bf16_is_applied_in_fp32():
    # A bf16 engine casts W_h to bf16 and feeds bf16 hidden states: the loss equals the fp32 loss of the same values.
    torch.manual_seed(0)
    scores, mask = [torch.randn(1, 2, 4, 4)], torch.ones(1, 4, dtype=torch.long)
    s_hidden, t_hidden = torch.randn(2, 1, 4, 8).bfloat16(), torch.randn(2, 1, 4, 12).bfloat16()
    projection = torch.nn.Linear(8, 12).bfloat16()
    _, parts = tinybert_loss(scores, scores, list(s_hidden), list(t_hidden), projection, mask)
    expected = ((s_hidden[1].float() @ projection.weight.float().T + projection.bias.float() - t_hidden[1].float()) ** 2).mean()
    assert parts["hidden"].dtype == torch.float32 and parts["hidden"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_logit_kd_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    p_t, p_s = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    soft = float((p_t * (p_t.log() - p_s.log())).sum(-1).mean()) * T * T
    loss, parts = logit_kd_loss(s, t, temperature=T)
    assert loss.item() == pytest.approx(soft, rel=1e-6) and set(parts) == {"soft", "loss"}
    labels = torch.tensor([1, 2])
    hard = float(-(torch.log_softmax(s, -1)[0, 1] + torch.log_softmax(s, -1)[1, 2]) / 2)
    loss, parts = logit_kd_loss(s, t, temperature=T, labels=labels, alpha=0.7)
    assert parts["hard"].item() == pytest.approx(hard, rel=1e-6)
    assert loss.item() == pytest.approx(0.7 * soft + 0.3 * hard, rel=1e-6)
    # regression: MSE to the teacher's outputs and to the labels
    loss, _ = logit_kd_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [3.0]]), labels=torch.tensor([0.0, 1.0]),
                            alpha=0.5)
    assert loss.item() == pytest.approx(0.5 * 0.5 + 0.5 * (1 + 4) / 2)


def test_distilling_the_real_teacher_lowers_the_relation_loss(teacher_dir):
    """A tiny MiniMoE student fitted to the packaged teacher's last-layer relations on real sentences:
    the loss falls, the teacher does not change, and every parameter group of the student moves."""
    from pipeline.models import Student, StudentConfig
    from pipeline.models.teacher import Teacher

    torch.manual_seed(0)
    teacher = Teacher.from_pretrained(teacher_dir)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = Student(StudentConfig.from_preset("3L384H", tokenizer=teacher.tokenizer, num_layers=2, hidden_size=48,
                                                num_heads=4, num_experts=4, dropout=0.0))
    start = {k: v.clone() for k, v in student.state_dict().items()}
    enc = teacher.tokenizer(["The quick brown fox jumps over the lazy dog.", "Experts share the work of one FFN.",
                             "Relation distillation matches attention patterns."], padding=True, return_tensors="pt")
    targets = teacher(**enc)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        out = student(**enc)
        loss, _ = minilm_relation_loss(out.relation_qkv, targets, enc["attention_mask"], num_relation_heads=12,
                                       aux_loss=out.aux_loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]  # (0.84 -> 0.42 when written)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    moved = {k.split(".")[0] for k, v in student.state_dict().items() if not torch.equal(v, start[k])}
    assert moved == {"embeddings", "layers", "relation_projection"}  # MiniMoE distils through its projection
    router = "layers.0.ffn.deepspeed_moe.gate.wg.weight"
    assert not torch.equal(student.state_dict()[router], start[router])  # the aux loss trains the router
