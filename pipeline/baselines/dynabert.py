"""DynaBERT (Hou et al. 2020, "DynaBERT: Dynamic BERT with Adaptive Width and Depth"), task-specific, from a
finetuned teacher: rewire, train width-adaptively with distillation (DynaBERT_W), export a sub-network.

Facts from the authors' code (huawei-noah/Pretrained-Language-Model, DynaBERT/):
- Rewiring (run_glue.py L425-444, modeling_bert.py L288-312, L332-377): each layer's heads and FFN neurons are
  sorted by importance, most important first, so that a width's sub-network is the first units of every layer.
  Their importance: |dL/d head mask| and a Taylor term of each neuron's weights, on the dev set (run_glue.py
  L359-422). Here: pipeline.baselines.prune's first-order Taylor scores (|dL/d mask| of heads and neurons) on the task's
  training data, so that dev stays held out.
- Width w (modeling_bert.py L139-160, L231): round(w x heads) heads of every layer, and of its FFN
  int(round(w x heads) / heads x neurons) neurons (at least 1).
- Depth d (modeling_bert.py L422-428): round(d x L) layers kept, layer floor(i / d) for i = 0 .. round(d x L)-1
  (d = 0.5 of 12: 0, 2, .., 10); the hidden states compared are those at the inputs of the kept layers and the
  last one, the same indices in teacher and student (run_glue.py L136-141, L180-181).
- DynaBERT_W (run_glue.py L118-166, L198-206; README step 2): the teacher is the finetuned model, fixed; for each
  batch, for each width of 0.25, 0.5, 0.75, 1.0 from the widest, the sub-network's loss
  lambda1 x soft cross-entropy of the logits + lambda2 x sum of the MSE of the embeddings' output and every
  layer's hidden state (lambda1 1.0, lambda2 0.1: L504-507), gradients accumulated over the widths, clipped to
  norm 1, then one AdamW step (lr 2e-5, batch 32, 3 epochs, no warmup or weight decay: README, L469-481).

- DynaBERT (README step 3, here `train --depths 0.5,0.75,1.0` on a DynaBERT_W dir): DynaBERT_W is teacher and
  initialisation, no rewiring (L551); for each batch, each depth from the deepest, each width from the widest,
  the loss against the teacher, lambda1 = lambda2 = 1.0 (L494-499).

Where we differ, and why: the logit term is KL(teacher || student) (objectives.logit_kd_loss at T 1), which is
their soft cross-entropy less the teacher's entropy: the same gradient. The hidden-state MSE is over real tokens
(as objectives.moebert_loss; theirs counts padding to 128, ours pads to the longest example). They distil only
with data augmentation (`--data_aug`, TinyBERT's augmented set; without it L166 trains on the hard labels); we
distil on the task's own training set. In the depth stage their teacher stays at full width for every width
(its width_mult is never set, though L121-127 compute its outputs once per width); the paper distils each width
from DynaBERT_W at the same width, which we follow (the teacher cut as the student). Each sub-network runs on the
leading slices of the shared weights of its kept layers (prune.prefix_call), at its own cost, as theirs; it
computes exactly the exported sub-network (tests/test_dynabert.py); the engine accumulates their gradients
(gradient_accumulation_steps = widths x depths, summed, not averaged, as their loss.backward() per sub-network).

    python -m pipeline.baselines.dynabert train RUN/model OUT --task rte --data-dir ../shared/data/glue
    python -m pipeline.baselines.dynabert train OUT OUT2 --task rte --data-dir ../shared/data/glue --depths 0.5,0.75,1.0
    python -m pipeline.baselines.dynabert export OUT2 SUB --width 0.5 --depth 0.75
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minimoe_common.cli import InputError, check_output_dir, command
from minimoe_common.files import write_json
from minimoe_common.tokenizer import load_tokenizer
from pipeline.finetune.config import deepspeed_config
from pipeline.finetune.data import load_task_data
from pipeline.finetune.run import save_model
from pipeline.finetune.scoring import evaluate
from pipeline.models.hf_export import load_student_head
from pipeline.models.files import check_max_seq_length
from pipeline.objectives import _masked_mse, logit_kd_loss
from pipeline.optim import LinearSchedule, build_engine, init_distributed, init_single_process
from pipeline.baselines.prune import (TaskModel, batches, importance, is_full, load_finetuned, loss_values, prefix_call,
                                      prefix_copy, rewired, sub_network, training_batches)
from pipeline.tasks import get_task

WIDTHS = (0.25, 0.5, 0.75, 1.0)  # README step 2, --width_mult_list


def kept_units(heads: int, neurons: int, width: float) -> tuple[int, int]:
    """(heads, FFN neurons) of a layer of `heads` heads and `neurons` neurons at width multiplier `width`
    (modeling_bert.py round_to_nearest, L139-143, and L231)."""
    kept = round(width * heads)
    return kept, max(1, int(kept / heads * neurons))


def kept_layers(num_layers: int, depth: float) -> list[int]:
    """The layers kept at depth multiplier `depth` (modeling_bert.py L422-428): floor(i / depth) for the first
    round(depth x num_layers) i."""
    return [math.floor(i / depth) for i in range(round(depth * num_layers))]


def skeleton(model: TaskModel, width: float, depth: float) -> TaskModel:
    """A `prune.sub_network` of the shape of `model`'s sub-network at `width` and `depth`."""
    config = model.config
    units = [kept_units(config.heads_of(i), config.intermediate_size_of(i), width)
             for i in kept_layers(config.num_layers, depth)]
    return sub_network(model, [h for h, _ in units], [n for _, n in units])


def subnetwork(model: TaskModel, width: float, depth: float) -> TaskModel:
    """The rewired `model`'s sub-network at `width` and `depth` as a model of its own: the first heads and neurons
    of the kept layers."""
    return prefix_copy(model, skeleton(model, width, depth), kept_layers(model.config.num_layers, depth))


def dynabert_loss(out, teacher_out, teacher_states: list[int], attention_mask: torch.Tensor, lambda_logit: float,
                  lambda_hidden: float) -> torch.Tensor:
    """lambda_logit x KL(teacher || student) of the logits + lambda_hidden x the sum of the hidden states' MSE (real
    tokens): the student's embeddings' output and every layer's against the teacher's hidden_states
    `teacher_states` (the inputs of the kept layers and the last: run_glue.py L136-141, L180-185)."""
    logit = logit_kd_loss(out.logits, teacher_out.logits)[0]
    mask = attention_mask.bool()[..., None]  # (B, T, 1)
    teacher_hidden = [teacher_out.hidden_states[i] for i in teacher_states]
    hidden = torch.stack([_masked_mse(s, t, mask) for s, t in zip(out.hidden_states, teacher_hidden, strict=True)])
    return lambda_logit * logit + lambda_hidden * hidden.sum()


@dataclasses.dataclass
class Networks:
    """What a training step runs: the teacher (frozen), the skeletons of the student's sub-networks by (depth, width)
    from the largest (their L130, L145), the two loss weights."""

    teacher: TaskModel
    skeletons: dict[tuple[float, float], TaskModel]
    teacher_skeletons: dict[float, TaskModel] | None
    """None: the teacher stays full (DynaBERT_W); else it runs at each student width (DynaBERT's stage 2)."""
    lambdas: tuple[float, float]


def teacher_outputs(nets: Networks, batch: dict[str, torch.Tensor]) -> dict[float, object]:
    """The teacher's outputs (with hidden states) by student width."""
    with torch.no_grad():
        if nets.teacher_skeletons is None:
            out = nets.teacher(**batch, output_hidden_states=True)
            return dict.fromkeys([width for _, width in nets.skeletons], out)
        return {width: prefix_call(nets.teacher, sub, **batch, output_hidden_states=True)
                for width, sub in nets.teacher_skeletons.items()}


def train_step(engine, nets: Networks, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One optimizer step: each (depth, width)'s sub-network (prune.prefix_call) back-propagates its loss in turn,
    the engine accumulating (summing) over them -> {"loss@wW_dD": each one's loss}. The hard labels are not used
    (their L164, L185)."""
    batch = {k: v.to(engine.device) for k, v in batch.items() if k != "labels"}
    teacher_out, num_layers, losses = teacher_outputs(nets, batch), nets.teacher.config.num_layers, {}
    for (depth, width), sub in nets.skeletons.items():
        layers = kept_layers(num_layers, depth)
        out = prefix_call(engine.module, sub, layers, **batch, output_hidden_states=True)
        loss = dynabert_loss(out, teacher_out[width], [*layers, num_layers], batch["attention_mask"], *nets.lambdas)
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()  # the optimizer steps (and clips) after the last sub-network
        losses[f"loss@{name(width, depth)}"] = loss.detach()
    return losses


def name(width: float, depth: float) -> str:
    return f"w{width:g}_d{depth:g}"


def dev_scores(model: TaskModel, nets: Networks, task, data, batch_size: int, pad_id: int, step: int) -> dict[str, float]:
    """Dev score of every (width, depth)'s sub-network, by name."""
    return {name(width, depth): evaluate(subnetwork(model, width, depth), task, data, batch_size, pad_id, step)["score"]
            for depth, width in nets.skeletons}


@dataclasses.dataclass
class TrainConfig:
    """DynaBERT_W's settings, or with depths DynaBERT's (defaults: the authors' README steps 2 and 3)."""

    model: str
    """Finetuned teacher dir (minimoe-finetune's RUN/model), the student's initialisation too; with depths other
    than 1.0, a dir written by DynaBERT_W's training (their step 3: teacher and initialisation)."""
    output: str
    """Dir for the trained model (rewired, all sub-networks in one) and dynabert.json."""
    task: str
    """The task the model was finetuned on (a classification task)."""
    data_dir: str
    """The task's folder, or one holding it as TASK/ or glue/TASK/."""
    widths: list[float] = dataclasses.field(default_factory=lambda: list(WIDTHS))
    """Width multipliers trained, each in (0, 1]."""
    depths: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    """Depth multipliers trained: [1.0] is DynaBERT_W (stage 1); others, e.g. 0.5, 0.75, 1.0, DynaBERT (stage 2)."""
    epochs: float = 3.0
    lr: float = 2e-5
    """AdamW's peak rate, decayed linearly to 0 (no warmup, as theirs with --warmup_steps 0)."""
    batch_size: int = 32
    max_seq_length: int = 128
    max_examples: int | None = None
    """Train (and score importance) on the first N training examples; None = all."""
    lambda_logit: float = 1.0
    """Their width_lambda1 / depth_lambda1."""
    lambda_hidden: float | None = None
    """None: their width_lambda2 0.1 for DynaBERT_W, depth_lambda2 1.0 with depths."""
    max_grad_norm: float = 1.0
    seed: int = 42

    @property
    def adapts_depth(self) -> bool:
        return self.depths != [1.0]


def train_loop(engine, nets: Networks, steps: Iterator[dict[str, torch.Tensor]], total_steps: int) -> list[dict]:
    """A train_step on each of the `total_steps` batches of `steps`; -> each step's losses."""
    history = []
    for step, batch in enumerate(tqdm(steps, total=total_steps, desc="dynabert"), start=1):
        engine.train()
        history.append({"step": step, **loss_values(train_step(engine, nets, batch), step)})
    return history


def check_teacher(config: TrainConfig, teacher: TaskModel, task) -> None:
    if task.kind != "classification":
        raise InputError(f"--task {task.name}: a {task.kind} task; DynaBERT distils classification logits here")
    if not is_full(teacher.config):
        raise InputError(f"{config.model}: a pruned model; DynaBERT starts from a full finetuned model")
    if config.adapts_depth and not (Path(config.model) / "dynabert.json").is_file():
        raise InputError(f"--depths {config.depths}: DynaBERT's depth stage starts from a DynaBERT_W dir; train one "
                         f"first (minimoe-dynabert train {config.model} DIR --task {task.name} ...)")
    for width in config.widths:
        check_multiplier("--widths", width, teacher.config.num_heads, "head")
    for depth in config.depths:
        check_multiplier("--depths", depth, teacher.config.num_layers, "layer")


def train(config: TrainConfig) -> dict:
    """DynaBERT_W: score, rewire and train width-adaptively; with depths, DynaBERT: train a DynaBERT_W dir
    width- and depth-adaptively (no rewiring: their L551). Writes config.output (model, tokenizer,
    dynabert.json); -> the summary."""
    task = get_task(config.task)
    check_max_seq_length(config.max_seq_length, config.model)
    random.seed(config.seed), np.random.seed(config.seed), torch.manual_seed(config.seed)
    teacher, tokenizer = load_finetuned(config.model, task), load_tokenizer(config.model)
    check_teacher(config, teacher, task)
    pad = tokenizer.pad_token_id
    data = load_task_data(task, config.data_dir, tokenizer, config.max_seq_length, config.max_examples)
    if config.adapts_depth:
        scores, student = None, load_finetuned(config.model, task)
    else:
        scores = importance(teacher, batches(data.train, pad, config.batch_size))  # teacher: eval, frozen
        student = rewired(teacher, scores)
    teacher.eval().requires_grad_(False)

    init_single_process()
    init_distributed()
    steps, total_steps, _ = training_batches(data, pad, config.batch_size, config.epochs, config.seed)
    widths, depths = sorted(config.widths, reverse=True), sorted(config.depths, reverse=True)
    ds_config = {**deepspeed_config(None, config.batch_size, config.max_grad_norm),
                 "gradient_accumulation_steps": len(widths) * len(depths)}
    engine = build_engine(student.train(), ds_config, config.lr, 0.0, LinearSchedule(0, total_steps))
    teacher.to(engine.device)
    lambda_hidden = config.lambda_hidden if config.lambda_hidden is not None else 1.0 if config.adapts_depth else 0.1
    skeletons = {(depth, width): skeleton(engine.module, width, depth) for depth in depths for width in widths}
    teacher_skeletons = {width: skeleton(teacher, width, 1.0) for width in widths} if config.adapts_depth else None
    nets = Networks(teacher, skeletons, teacher_skeletons, (config.lambda_logit, lambda_hidden))
    before = dev_scores(engine.module, nets, task, data, 2 * config.batch_size, pad, 0)
    history = train_loop(engine, nets, steps, total_steps)
    after = dev_scores(engine.module, nets, task, data, 2 * config.batch_size, pad, total_steps)
    summary = {"config": dataclasses.asdict(config), "lambda_hidden": lambda_hidden, "steps": total_steps,
               "dev_before": before, "dev_after": after, "losses": history,
               "importance": None if scores is None else {"heads": [s.tolist() for s in scores.heads],
                                                           "neurons": [s.tolist() for s in scores.neurons]}}
    save_model(engine.module, tokenizer, Path(config.output))
    write_json(Path(config.output) / "dynabert.json", summary)
    return summary


def export(model_dir: str, output: str, width: float, depth: float) -> dict:
    """Write the sub-network of the trained DynaBERT dir at `width` and `depth` as a student dir (with
    dynabert.json: what was kept); -> that record."""
    model, tokenizer = load_student_head(model_dir, token=False), load_tokenizer(model_dir)
    config = model.config
    check_multiplier("--width", width, min(config.heads_of(i) for i in range(config.num_layers)), "head")
    check_multiplier("--depth", depth, config.num_layers, "layer")
    small = subnetwork(model.eval(), width, depth)
    record = {"model": model_dir, "width": width, "depth": depth,
              "layers": kept_layers(config.num_layers, depth), "layer_heads": small.config.layer_heads,
              "layer_intermediate_sizes": small.config.layer_intermediate_sizes,
              "params": sum(p.numel() for p in small.parameters())}
    save_model(small, tokenizer, Path(output))
    write_json(Path(output) / "dynabert.json", record)
    return record


def check_multiplier(flag: str, value: float, units: int, unit: str) -> None:
    """InputError unless `value` is in (0, 1] and keeps at least one of `units` (round(value x units) >= 1)."""
    if not 0 < value <= 1 or round(value * units) < 1:
        raise InputError(f"{flag} {value:g}: must be in (0, 1] and keep at least one {unit} of {units}")


def parse_multipliers(flag: str, text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise InputError(f"{flag} {text}: comma-separated numbers, e.g. 0.25,0.5,0.75,1.0") from None


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="minimoe-dynabert", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="rewire a finetuned model and train it width-adaptively "
                                       "(DynaBERT_W) with distillation from it")
    defaults = TrainConfig("", "", "", "")
    train_parser.add_argument("model", help="finetuned model dir (minimoe-finetune's RUN/model: BERT or a dense student)")
    train_parser.add_argument("output", help="output dir for the width-adaptive model")
    train_parser.add_argument("--task", required=True, help="the task the model was finetuned on (a classification task)")
    train_parser.add_argument("--data-dir", required=True, help="the task's folder, or one holding it as TASK/ or glue/TASK/")
    train_parser.add_argument("--widths", default=",".join(f"{w:g}" for w in WIDTHS),
                              help="width multipliers trained, comma-separated (default: DynaBERT's 0.25,0.5,0.75,1.0)")
    train_parser.add_argument("--depths", default="1",
                              help="depth multipliers trained, comma-separated (default 1.0: DynaBERT_W; DynaBERT's "
                              "stage 2: 0.5,0.75,1.0, from a DynaBERT_W dir)")
    for flag, kind, help_text in (
            ("--epochs", float, "training epochs (DynaBERT: 3)"), ("--lr", float, "AdamW learning rate (DynaBERT: 2e-5)"),
            ("--batch-size", int, "examples per step (DynaBERT: 32)"),
            ("--max-seq-length", int, "tokens per example after truncation (DynaBERT: 128)"),
            ("--max-examples", int, "train and score importance on the first N training examples (default: all)"),
            ("--lambda-logit", float, "weight of the logit distillation loss (DynaBERT's width_lambda1: 1.0)"),
            ("--lambda-hidden", float, "weight of the hidden-state MSE (default: DynaBERT's width_lambda2 0.1, with "
             "--depths its depth_lambda2 1.0)"),
            ("--max-grad-norm", float, "gradient clipping of the accumulated gradient (DynaBERT: 1.0)"),
            ("--seed", int, "seed of the data order, dropout and initialisation (DynaBERT: 42)")):
        name = flag.removeprefix("--").replace("-", "_")
        train_parser.add_argument(flag, type=kind, default=getattr(defaults, name), help=help_text)
    export_parser = commands.add_parser("export", help="write one sub-network of a trained DynaBERT dir as a student dir")
    export_parser.add_argument("model", help="a dir written by `minimoe-dynabert train`")
    export_parser.add_argument("output", help="output dir for the sub-network")
    export_parser.add_argument("--width", type=float, required=True, help="width multiplier in (0, 1], e.g. 0.5")
    export_parser.add_argument("--depth", type=float, default=1.0, help="depth multiplier in (0, 1] (default 1.0)")
    return top


def check_train(config: TrainConfig) -> None:
    """InputError for a width outside (0, 1] or a count or rate out of range, before any work."""
    for flag, values in (("--widths", config.widths), ("--depths", config.depths)):
        if not values or not all(0 < v <= 1 for v in values):
            raise InputError(f"{flag} {','.join(f'{v:g}' for v in values)}: each must be in (0, 1]")
    for flag, value in (("--epochs", config.epochs), ("--lr", config.lr), ("--batch-size", config.batch_size),
                        ("--max-seq-length", config.max_seq_length), ("--max-grad-norm", config.max_grad_norm),
                        ("--max-examples", 1 if config.max_examples is None else config.max_examples)):
        if value <= 0:
            raise InputError(f"{flag} {value:g}: must be > 0")
    for flag, value in (("--lambda-logit", config.lambda_logit), ("--lambda-hidden", config.lambda_hidden or 0)):
        if value < 0:
            raise InputError(f"{flag} {value:g}: must be >= 0")
    check_output_dir(config.output, "output")


@command
def main(argv: list[str] | None = None) -> None:
    args = vars(parser().parse_args(argv))
    if args.pop("command") == "train":
        config = TrainConfig(**{**args, "widths": parse_multipliers("--widths", args["widths"]),
                                "depths": parse_multipliers("--depths", args["depths"])})
        check_train(config)
        summary = train(config)
        print(f"dev by width, before -> after: {json.dumps(summary['dev_before'])} -> "
              f"{json.dumps(summary['dev_after'])}; wrote {config.output}")
    else:
        check_output_dir(args["output"], "output")
        record = export(args["model"], args["output"], args["width"], args["depth"])
        print(f"width {record['width']:g}, depth {record['depth']:g}: layers {record['layers']}, heads "
              f"{record['layer_heads']}, FFN {record['layer_intermediate_sizes']}, {record['params'] / 1e6:.2f} M "
              f"params; wrote {args['output']}")


if __name__ == "__main__":
    sys.exit(main())
