"""Turn a finetuned BERT into a MoEBERT student (Zuo et al. 2022, "MoEBERT: from BERT to Mixture-of-Experts via
Importance-Guided Adaptation", NAACL), as the authors' code (SimiaoZuo/MoEBERT) builds it, routed by their
default hash-random routing (--routing hash) or by our learned top-1 router (--routing learned).

Importance (their modeling_bert.py, `preprocess_importance`): for FFN neuron j of each layer, per training example
i (loss without reduction, the model in eval mode), |sum_k W1[j,k] dL_i/dW1[j,k] + sum_k W2[k,j] dL_i/dW2[k,j]|,
summed over the examples. The W2 term is dL_i/dm_j for a mask m on the neuron's activation (fc2's input), the W1
term dL_i/ds_j for a scale s on its pre-activation without the bias; both come per example from one backward,
with masks of shape (B, 1, width). Split (their moebert/utils.py, ImportanceProcessor): neurons by importance,
descending; the top `shared` are in every expert, the rest go round-robin (expert e takes rest[e::E]); each expert
keeps its first `expert_size`: fc1 rows and bias, fc2 columns, fc2's bias in every expert.

Hash routing sends each token id to a fixed random expert (one table per layer) and does not scale its output: with
experts of the whole FFN the student is the teacher. The learned router scales an expert's output by its gate
probability p before the residual LayerNorm. So that the student computes the teacher's function at the start,
that router starts at zero (p = 1/E for every token) and every expert's fc2 (weight and bias) is multiplied by E:
E x p = 1. With experts of the whole FFN the student is the teacher; with smaller ones, the teacher with each FFN
cut to expert 0's neurons (zero logits tie, and ties go to expert 0) in eval, and in training, where the router's
jitter breaks the tie, each token's expert is random, until the router learns. Then

    python -m pipeline.baselines.moebert RUN/model OUT --task rte --data-dir ../shared/data/glue --expert-size 384 --shared 256
    minimoe-finetune --model OUT --teacher RUN/model --moebert-distill 5 --task rte ...   # the layer-wise distillation
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from minimoe_common.cli import InputError, command
from minimoe_common.tokenizer import load_tokenizer
from pipeline.finetune.data import load_task_data
from pipeline.finetune.run import check_finetuned_for, save_model
from pipeline.finetune.scoring import evaluate
from pipeline.models import StudentForSequenceClassification
from pipeline.models.files import check_max_seq_length
from pipeline.models.hf_export import load_student_head
from pipeline.baselines.prune import add_scoring_arguments, batches, check_scoring_arguments
from pipeline.tasks import Task, get_task


def load_dense_finetuned(model_dir: str, task: Task) -> StudentForSequenceClassification:
    """The finetuned model as our sequence head (a BERT dir converted, weights unchanged); MoE, pruned and
    low-rank models refused, and token tasks (the authors' importance is a per-example sentence loss)."""
    if task.kind == "token":
        raise InputError(f"--task {task.name}: MoEBERT's importance is per example of a sentence-level task "
                         f"(GLUE, as the authors')")
    check_finetuned_for(model_dir, task, flag="model")
    model = load_student_head(model_dir, token=False)
    config = model.config
    for refused, what in ((config.is_moe, "a MoE model"), (config.is_pruned, "a pruned model"),
                          (config.ffn_ranks, "a low-rank (compressed) model")):
        if refused:
            raise InputError(f"model {model_dir}: {what}; MoEBERT splits the full FFN of a dense finetuned BERT")
    return model


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) task losses, in float64: cross-entropy, or the squared error for regression (their losses with
    reduction none)."""
    if logits.size(-1) == 1:
        return (logits.squeeze(-1).double() - labels.double()).square()
    return F.cross_entropy(logits.double(), labels, reduction="none")


def neuron_importance(model: StudentForSequenceClassification,
                      examples: Iterator[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """MoEBERT's importance of every FFN neuron, (width,) per layer, summed over the batches' examples."""
    model.eval().requires_grad_(False)  # only the masks need gradients
    layers, dtype = [layer.ffn for layer in model.student.layers], model.dtype
    scores = [torch.zeros(ffn.fc1.out_features, dtype=torch.float64) for ffn in layers]
    scales: list[torch.Tensor] = []  # this batch's (B, 1, width) per layer, on the pre-activation minus its bias
    masks: list[torch.Tensor] = []  # and on the activation
    handles = []
    for i, ffn in enumerate(layers):
        handles.append(ffn.fc1.register_forward_hook(
            lambda module, args, out, i=i: (out - module.bias) * scales[i] + module.bias))
        handles.append(ffn.fc2.register_forward_pre_hook(lambda module, args, i=i: (args[0] * masks[i],)))
    try:
        for batch in examples:
            labels, size = batch.pop("labels"), len(batch["input_ids"])
            scales[:] = [torch.ones(size, 1, len(s), dtype=dtype, requires_grad=True) for s in scores]
            masks[:] = [torch.ones(size, 1, len(s), dtype=dtype, requires_grad=True) for s in scores]
            # Example i's masks reach only its own loss: the gradient of the sum is each example's own.
            grads = torch.autograd.grad(per_example_loss(model(**batch).logits, labels).sum(), [*scales, *masks])
            for score, scale_grad, mask_grad in zip(scores, grads[:len(scores)], grads[len(scores):]):
                score += (scale_grad + mask_grad).squeeze(1).abs().sum(0).double()  # (width,)
    finally:
        for handle in handles:
            handle.remove()
    return scores


def expert_neurons(scores: torch.Tensor, experts: int, expert_size: int, shared: int) -> list[torch.Tensor]:
    """Each expert's neuron indices (most important first; ties keep the lower index): the `shared` most important
    neurons, then its round-robin share of the rest, cut to `expert_size` (their _split_importance)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    top, rest = order[:shared], order[shared:]
    return [torch.cat([top, rest[e::experts]])[:expert_size] for e in range(experts)]


def check_split(width: int, experts: int, expert_size: int, shared: int) -> None:
    """InputError unless every expert can hold `expert_size` neurons: the shared ones plus its share of the rest."""
    if experts < 2:
        raise InputError(f"--experts {experts}: a mixture needs >= 2 experts")
    if not 1 <= expert_size <= width:
        raise InputError(f"--expert-size {expert_size}: must be in [1, {width}] (the teacher's FFN width)")
    if not 0 <= shared <= expert_size:
        raise InputError(f"--shared {shared}: must be in [0, --expert-size {expert_size}]")
    smallest = shared + (width - shared) // experts
    if smallest < expert_size:
        raise InputError(f"--expert-size {expert_size}: the smallest expert holds {shared} shared + "
                         f"{(width - shared) // experts} own of the {width} neurons; give a larger --shared or a "
                         f"smaller --expert-size")


@torch.no_grad()
def moebert_student(model: StudentForSequenceClassification, neurons: list[list[torch.Tensor]],
                    balance_weight: float, routing: str = "learned") -> StudentForSequenceClassification:
    """The MoE head of the same embeddings, attention, LayerNorms, pooler and classifier, whose layer-l experts hold
    the dense FFN's neurons `neurons[l][e]`: behind hash routing as they are, behind the learned router fc2 x E
    with the router at zero (module docstring: E x p = 1)."""
    experts = len(neurons[0])
    config = dataclasses.replace(model.config, num_experts=experts, intermediate_size=len(neurons[0][0]),
                                 relation_projection=False, aux_loss_weight=balance_weight, routing=routing)
    scale = experts if routing == "learned" else 1
    moe = type(model)(config).train(model.training)
    missing, unexpected = moe.load_state_dict({k: v for k, v in model.state_dict().items() if ".ffn." not in k},
                                              strict=False)
    if unexpected or any(".ffn." not in key for key in missing):
        raise ValueError(f"the dense model does not map onto the MoE one: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for dense, layer, layer_neurons in zip(model.student.layers, moe.student.layers, neurons):
        block = layer.ffn.deepspeed_moe
        for param in block.gate.parameters():  # the learned router's; hash routing has none
            param.zero_()
        for expert, index in zip(block.experts.deepspeed_experts, layer_neurons):
            expert.fc1.weight.copy_(dense.ffn.fc1.weight[index])
            expert.fc1.bias.copy_(dense.ffn.fc1.bias[index])
            expert.fc2.weight.copy_(scale * dense.ffn.fc2.weight[:, index])
            expert.fc2.bias.copy_(scale * dense.ffn.fc2.bias)
    return moe


def convert_dir(model_dir: str, output: str, task_name: str, data_dir: str, experts: int, expert_size: int,
                shared: int, balance_weight: float, max_examples: int | None, batch_size: int,
                max_seq_length: int, routing: str = "learned") -> dict:
    """Score the neurons on the task's first `max_examples` training examples (all when None), split, and write
    `output` (model, tokenizer, moebert.json: the settings, each expert's neurons, the scores, and the dev score
    before and after, untrained); returns the summary."""
    task = get_task(task_name)
    check_max_seq_length(max_seq_length, model_dir)
    model, tokenizer = load_dense_finetuned(model_dir, task), load_tokenizer(model_dir)
    check_split(model.config.intermediate_size, experts, expert_size, shared)
    data = load_task_data(task, data_dir, tokenizer, max_seq_length, max_examples)
    scores = neuron_importance(model, batches(data.train, tokenizer.pad_token_id, batch_size))
    neurons = [expert_neurons(s, experts, expert_size, shared) for s in scores]
    moe = moebert_student(model, neurons, balance_weight, routing)
    dev = {f"dev_{when}": evaluate(m, task, data, 2 * batch_size, tokenizer.pad_token_id, step=0)["score"]
           for when, m in (("before", model), ("after", moe))}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    summary = {"model": model_dir, "task": task.name, "experts": experts, "expert_size": expert_size, "shared": shared,
               "routing": routing, "balance_weight": balance_weight, **dev,
               "params_before": count(model), "params_after": count(moe),
               "neurons": [[e.tolist() for e in layer] for layer in neurons],
               "importance": [s.tolist() for s in scores],
               "scored_on": {"data_dir": data_dir, "max_examples": max_examples, "batch_size": batch_size,
                             "max_seq_length": max_seq_length}}
    save_model(moe, tokenizer, Path(output), {"moebert.json": summary})
    return summary


@command
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="minimoe-moebert", description=__doc__.split("\n\n")[0])
    add_scoring_arguments(parser, "output dir for the MoE student (with the task head)")
    parser.add_argument("--experts", type=int, default=4, help="experts per FFN (default 4, the authors' script's)")
    parser.add_argument("--expert-size", type=int, required=True,
                        help="FFN neurons per expert (the authors' BERT-base script: 768 of 3072)")
    parser.add_argument("--shared", type=int, required=True,
                        help="most important neurons in every expert, <= --expert-size (the authors': 512)")
    parser.add_argument("--routing", choices=("learned", "hash"), default="learned",
                        help="hash: the authors' script's hash-random routing (each token id's expert fixed at random, "
                             "one table per layer, output unscaled); learned: the MiniMoE top-1 router, started at "
                             "zero (default)")
    parser.add_argument("--balance-weight", type=float, default=None,
                        help="the student's load-balance loss weight (aux_loss_weight; default 0.01 with the "
                             "learned router, the MiniMoE one's; 0 with hash routing, which has nothing to balance)")
    args = parser.parse_args(argv)
    if args.balance_weight is None:
        args.balance_weight = 0.01 if args.routing == "learned" else 0.0
    if args.balance_weight < 0:
        raise InputError(f"--balance-weight {args.balance_weight:g}: must be >= 0")
    check_scoring_arguments(args)
    summary = convert_dir(args.model, args.output, args.task, args.data_dir, args.experts, args.expert_size,
                          args.shared, args.balance_weight, args.max_examples, args.batch_size, args.max_seq_length,
                          args.routing)
    metric = get_task(args.task).metrics[0]
    print(f"{args.experts} experts of {args.expert_size} neurons ({args.shared} shared) per FFN: dev {metric} "
          f"{summary['dev_before']:.2f} -> {summary['dev_after']:.2f} (untrained); params "
          f"{summary['params_before'] / 1e6:.2f} M -> {summary['params_after'] / 1e6:.2f} M; wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
