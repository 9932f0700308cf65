"""Prune a finetuned model's attention heads and FFN neurons to x% of its transformer-layer parameters (the
paper's KD_x% students: MiniDisc's pruned teachers, then task KD).

Importance is first-order Taylor (Michel et al. 2019; MiniDisc, GeneZC/MiniDisc `run_sparsification_cls.py`): a
mask m = 1 multiplies every head's output and every FFN neuron's activation; for each batch of the task's
training data, |dL/dm| (= |sum over the batch's tokens of gradient x activation|, L the batch's mean task loss,
the model in eval mode) is added to the unit's score. Each layer's scores are divided by their L2 norm, then
heads and neurons are ranked over all layers at once (both as MiniDisc), and the lowest are removed. What
counts: the encoder's transformer-layer parameters (Q/K/V, attention output, FFN, LayerNorms, every bias; not
the embeddings, pooler or classifier), the paper's GFLOPs convention; x% of them are kept, within one neuron.
The output is a student dir (`StudentConfig.layer_heads` / `layer_intermediate_sizes`) with the task head:
it finetunes as any other (`minimoe-finetune --model OUT --teacher TEACHER` is the KD_x% row).

    python -m pipeline.baselines.prune RUN/model OUT --task rte --data-dir ../shared/data/glue --keep 15
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from minimoe_common.cli import InputError, check_output_dir, command
from minimoe_common.tokenizer import load_tokenizer
from pipeline.finetune.data import TaskData, collate, load_task_data
from pipeline.finetune.run import check_finetuned_for, save_model
from pipeline.finetune.scoring import evaluate
from pipeline.models.config import StudentConfig
from pipeline.models.heads import StudentForSequenceClassification, StudentForTokenClassification
from pipeline.models.hf_export import load_student_head
from pipeline.models.files import check_max_seq_length
from pipeline.optim import check_finite
from pipeline.tasks import Task, get_task

TaskModel = StudentForSequenceClassification | StudentForTokenClassification


@dataclasses.dataclass
class Importance:
    """First-order Taylor scores, one tensor per layer: heads (heads of the layer,), neurons (its FFN width,)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]


def load_finetuned(model_dir: str, task: Task) -> TaskModel:
    """The finetuned model as our task head (a BERT dir converted, weights unchanged); MoE students refused."""
    check_finetuned_for(model_dir, task, flag="model")
    model = load_student_head(model_dir, token=task.kind == "token")
    if model.config.is_moe:
        raise InputError(f"model {model_dir}: a MiniMoE student; pruning removes heads and neurons of dense models")
    return model


def masked(model: TaskModel) -> tuple[Importance, list[torch.utils.hooks.RemovableHandle]]:
    """Masks of ones (requires_grad) on every head's output (the attention output projection's input, heads side
    by side) and every FFN neuron (fc2's input), applied by forward pre-hooks; the handles remove them."""
    config, head_size = model.config, model.config.hidden_size // model.config.num_heads
    masks = Importance([torch.ones(config.heads_of(i), requires_grad=True) for i in range(config.num_layers)],
                       [torch.ones(config.intermediate_size_of(i), requires_grad=True) for i in range(config.num_layers)])
    handles = []
    for layer, head_mask, neuron_mask in zip(model.student.layers, masks.heads, masks.neurons):
        # (B, T, heads x head_size) -> each head's slice times its mask
        handles.append(layer.attention.output.register_forward_pre_hook(
            lambda _, args, m=head_mask: (args[0] * m.repeat_interleave(head_size),)))
        handles.append(layer.ffn.fc2.register_forward_pre_hook(lambda _, args, m=neuron_mask: (args[0] * m,)))
    return masks, handles


def sub_network(model: TaskModel, heads: list[int], neurons: list[int]) -> TaskModel:
    """A model of `model`'s class of len(heads) layers, layer i with `heads[i]` heads and `neurons[i]` FFN neurons,
    its weights random: a skeleton for `prefix_call` and `prefix_copy`. Its initialisation leaves the random stream
    as it was, so that cutting networks out for evaluation does not change a run's dropout."""
    config = dataclasses.replace(model.config, num_layers=len(heads), layer_heads=heads,
                                 layer_intermediate_sizes=neurons)
    with torch.random.fork_rng(devices=[]):
        return type(model)(config).to(next(model.parameters()).device)


def prefix_views(model: TaskModel, skeleton: TaskModel, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """For each of `skeleton`'s parameters, `model`'s of the same name (skeleton layer j: model layer `layers[j]`,
    default j) cut to its shape from the front of every dim: views, so that gradients reach `model`."""
    params = dict(model.named_parameters())

    def source(name: str) -> str:
        parts = name.split(".")
        if layers is not None and parts[:2] == ["student", "layers"]:
            parts[2] = str(layers[int(parts[2])])
        return ".".join(parts)

    return {name: params[source(name)][tuple(slice(0, n) for n in p.shape)] for name, p in skeleton.named_parameters()}


def prefix_call(model: TaskModel, skeleton: TaskModel, layers: list[int] | None = None, **inputs):
    """`skeleton`'s forward on `prefix_views` of `model`: the sub-network of the first heads and neurons of a rewired
    model's `layers`, computed at its own size (as MiniDisc's SparseLinear and DynaBERT's slices), training the
    shared weights. The skeleton's dropout follows `model`'s mode."""
    skeleton.train(model.training)
    return torch.func.functional_call(skeleton, prefix_views(model, skeleton, layers), kwargs=inputs)


def prefix_copy(model: TaskModel, skeleton: TaskModel, layers: list[int] | None = None) -> TaskModel:
    """`skeleton` holding a copy of `prefix_views` of `model`: the sub-network as a model of its own."""
    skeleton.load_state_dict({**skeleton.state_dict(), **prefix_views(model, skeleton, layers)})
    return skeleton.train(model.training)


def importance(model: TaskModel, batches: Iterator[dict[str, torch.Tensor]]) -> Importance:
    """Sum over batches of |d(batch mean loss) / d mask| per head and neuron (MiniDisc's and Michel et al.'s
    accumulation: the absolute value per batch)."""
    model.eval().requires_grad_(False)  # only the masks need gradients
    masks, handles = masked(model)
    scores = Importance([torch.zeros_like(m) for m in masks.heads], [torch.zeros_like(m) for m in masks.neurons])
    try:
        for batch in batches:
            grads = torch.autograd.grad(model(**batch).loss, [*masks.heads, *masks.neurons])
            for score, grad in zip([*scores.heads, *scores.neurons], grads):
                score += grad.abs()
    finally:
        for handle in handles:
            handle.remove()
    return scores


def batches(features: list[dict], pad_id: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Encoded examples in their order, in padded batches."""
    for start in range(0, len(features), batch_size):
        yield collate(features[start:start + batch_size], pad_id)


def rewired(model: TaskModel, scores: Importance) -> TaskModel:
    """`model` with every layer's heads and FFN neurons in descending order of `scores` (ties keep the earlier
    unit): the same function, re-parametrised."""
    order = [torch.sort(s, descending=True, stable=True).indices for s in (*scores.heads, *scores.neurons)]
    layers = model.config.num_layers
    return pruned(model, order[:layers], order[layers:])


def is_full(config) -> bool:
    """Every layer with the config's heads and FFN width (not pruned; a rewired model is full)."""
    return all(config.heads_of(i) == config.num_heads and config.intermediate_size_of(i) == config.intermediate_size
               for i in range(config.num_layers))


def training_batches(data: TaskData, pad_id: int, batch_size: int, epochs: float,
                     seed: int) -> tuple[Iterator[dict[str, torch.Tensor]], int, int]:
    """`epochs` passes over the task's training examples in padded batches, reshuffled every pass (the order from
    `seed`): (the batches, how many, how many an epoch)."""
    sampler = RandomSampler(data.train, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(data.train, batch_size=batch_size, sampler=sampler, collate_fn=lambda f: collate(f, pad_id))
    total = max(1, math.ceil(epochs * len(loader)))
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), total), total, len(loader)


def loss_values(losses: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    """A step's losses as floats (one device sync); FloatingPointError on a NaN/Inf, naming the step."""
    values = dict(zip(losses, torch.stack(list(losses.values())).float().tolist()))
    check_finite(values, step)
    return values


def layer_param_sizes(config: StudentConfig) -> tuple[int, int, int]:
    """(fixed, per head, per neuron) transformer-layer parameters of a dense student: per layer 6H that no pruning
    removes (attention output and fc2 biases, two LayerNorms' weight and bias), per head Q/K/V weights and biases
    and its attention output columns (4 H h + 3 h, h the head size), per neuron its fc1 row, bias and fc2
    column (2 H + 1)."""
    hidden, head_size = config.hidden_size, config.hidden_size // config.num_heads
    return 6 * hidden * config.num_layers, 4 * hidden * head_size + 3 * head_size, 2 * hidden + 1


def budget(config: StudentConfig, keep: float) -> tuple[int, int]:
    """(heads, neurons) to keep in all so that the layers hold `keep`% of their parameters: heads in that share
    of their count (rounded, as MiniDisc's sparsity counts heads and neurons alike), neurons filling the rest to
    within half a neuron."""
    fixed, per_head, per_neuron = layer_param_sizes(config)
    heads = sum(config.heads_of(i) for i in range(config.num_layers))
    neurons = sum(config.intermediate_size_of(i) for i in range(config.num_layers))
    total = fixed + heads * per_head + neurons * per_neuron
    target = keep / 100 * total
    if target < fixed:
        raise InputError(f"--keep {keep:g}: below the {100 * fixed / total:.2f}% that the layers' LayerNorms and "
                         f"output biases hold alone")
    kept_heads = min(round(keep / 100 * heads), int((target - fixed) // per_head))
    return kept_heads, min(neurons, round((target - fixed - kept_heads * per_head) / per_neuron))


def top_units(scores: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Per layer, the (ascending) indices of the `count` highest scores over all layers, each layer's scores
    divided by their L2 norm first (MiniDisc's normalisation); ties keep the earlier unit."""
    normalised = torch.cat([s / (s.norm() + 1e-17) for s in scores])
    chosen = torch.sort(normalised, descending=True, stable=True).indices[:count]
    layer_of = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    offsets = [sum(len(s) for s in scores[:i]) for i in range(len(scores))]
    return [chosen[layer_of[chosen] == i].sort().values - offsets[i] for i in range(len(scores))]


@torch.no_grad()
def pruned(model: TaskModel, heads: list[torch.Tensor], neurons: list[torch.Tensor]) -> TaskModel:
    """A model of the same class (and training mode) keeping, per layer, the heads and FFN neurons whose indices
    are given."""
    config = dataclasses.replace(model.config, layer_heads=[len(h) for h in heads],
                                 layer_intermediate_sizes=[len(n) for n in neurons])
    head_size, state = config.hidden_size // config.num_heads, model.state_dict()
    for i, (kept_heads, kept_neurons) in enumerate(zip(heads, neurons)):
        rows = (kept_heads[:, None] * head_size + torch.arange(head_size)).reshape(-1)  # the heads' Q/K/V rows
        layer = f"student.layers.{i}."
        for name in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                key = f"{layer}attention.{name}.{kind}"
                state[key] = state[key][rows]
        state[f"{layer}attention.output.weight"] = state[f"{layer}attention.output.weight"][:, rows]
        for kind in ("weight", "bias"):
            state[f"{layer}ffn.fc1.{kind}"] = state[f"{layer}ffn.fc1.{kind}"][kept_neurons]
        state[f"{layer}ffn.fc2.weight"] = state[f"{layer}ffn.fc2.weight"][:, kept_neurons]
    smaller = type(model)(config).train(model.training)
    smaller.load_state_dict(state)
    return smaller


def layer_params(model: TaskModel) -> int:
    return sum(p.numel() for p in model.student.layers.parameters())


def prune(model: TaskModel, scores: Importance, keep: float) -> TaskModel:
    """`model` pruned to `keep`% of its transformer-layer parameters by `scores`."""
    heads, neurons = budget(model.config, keep)
    return pruned(model, top_units(scores.heads, heads), top_units(scores.neurons, neurons))


def prune_dir(model_dir: str, output: str, task_name: str, data_dir: str, keep: float, max_examples: int | None,
              batch_size: int, max_seq_length: int) -> dict:
    """Score on the task's first `max_examples` training examples (all when None), prune, and write `output`
    (model, tokenizer, pruning.json: the shapes, counts, scores, and the dev score before and after, untrained,
    as MiniDisc's sanity check); returns the summary."""
    task = get_task(task_name)
    check_max_seq_length(max_seq_length, model_dir)
    model, tokenizer = load_finetuned(model_dir, task), load_tokenizer(model_dir)
    data = load_task_data(task, data_dir, tokenizer, max_seq_length, max_examples)
    scores = importance(model, batches(data.train, tokenizer.pad_token_id, batch_size))
    small = prune(model, scores, keep)
    dev = {f"dev_{when}": evaluate(m, task, data, 2 * batch_size, tokenizer.pad_token_id, step=0)["score"]
           for when, m in (("before", model), ("after", small))}
    summary = {"model": model_dir, "task": task.name, "keep": keep, **dev,
               "layer_params_before": layer_params(model), "layer_params_after": layer_params(small),
               "params_before": sum(p.numel() for p in model.parameters()),
               "params_after": sum(p.numel() for p in small.parameters()),
               "layer_heads": small.config.layer_heads, "layer_intermediate_sizes": small.config.layer_intermediate_sizes,
               "importance": {"heads": [s.tolist() for s in scores.heads], "neurons": [s.tolist() for s in scores.neurons]},
               "scored_on": {"data_dir": data_dir, "max_examples": max_examples, "batch_size": batch_size,
                             "max_seq_length": max_seq_length}}
    save_model(small, tokenizer, Path(output), {"pruning.json": summary})
    return summary


def add_scoring_arguments(parser: argparse.ArgumentParser, output_help: str) -> None:
    """The arguments of a command that scores a finetuned model on its task's training data and writes a model
    dir (minimoe-prune, minimoe-moebert): model, output, --task, --data-dir, --max-examples, --batch-size,
    --max-seq-length."""
    parser.add_argument("model", help="finetuned model dir (minimoe-finetune's RUN/model: BERT or a dense student)")
    parser.add_argument("output", help=output_help)
    parser.add_argument("--task", required=True, help="the task the model was finetuned on (its training data scores)")
    parser.add_argument("--data-dir", required=True, help="the task's folder, or one holding it as TASK/ or glue/TASK/")
    parser.add_argument("--max-examples", type=int, default=None, help="score on the first N training examples (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per scoring batch (MiniDisc: 32)")
    parser.add_argument("--max-seq-length", type=int, default=128, help="tokens per example after truncation")


def check_scoring_arguments(args: argparse.Namespace) -> None:
    """InputError for a count below 1 or an output dir that cannot be written."""
    for flag, value in (("--max-examples", args.max_examples), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: must be >= 1")
    check_output_dir(args.output, "output")


@command
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="minimoe-prune", description=__doc__.split("\n\n")[0])
    add_scoring_arguments(parser, "output dir for the pruned model")
    parser.add_argument("--keep", type=float, required=True,
                        help="percent of the transformer-layer parameters kept, in (0, 100] (the paper's KD 15%%: 15)")
    args = parser.parse_args(argv)
    if not 0 < args.keep <= 100:
        raise InputError(f"--keep {args.keep:g}: must be in (0, 100]")
    check_scoring_arguments(args)
    summary = prune_dir(args.model, args.output, args.task, args.data_dir, args.keep, args.max_examples,
                        args.batch_size, args.max_seq_length)
    metric = get_task(args.task).metrics[0]
    print(f"kept {sum(summary['layer_heads'])} heads and {sum(summary['layer_intermediate_sizes'])} FFN neurons: "
          f"dev {metric} {summary['dev_before']:.2f} -> {summary['dev_after']:.2f} (untrained); transformer layers "
          f"{summary['layer_params_before'] / 1e6:.2f} M -> {summary['layer_params_after'] / 1e6:.2f} M "
          f"({100 * summary['layer_params_after'] / summary['layer_params_before']:.1f}%), params "
          f"{summary['params_before'] / 1e6:.2f} M -> {summary['params_after'] / 1e6:.2f} M; wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
