"""MiniDisc (Zhang et al. 2022, "MiniDisc: Minimal Distillation Schedule for Language Model Compression"),
task-specific, from a finetuned teacher: the teacher assistant chosen in one trial, then teacher -> TA -> student.

Facts from the authors' code (GeneZC/MiniDisc: run_sparsification_cls.py, run_minidisc_cls.py, models/sparsebert.py,
bert_scripts/run_minidisc_mrpc.sh):
- Sparsification: every layer's heads and FFN neurons sorted by first-order Taylor importance, each layer's scores
  L2-normalised, then ranked over all layers at once; sparsity s removes the lowest s% of the heads and of the
  neurons, so each sparsity's network keeps a prefix of every layer's units and the networks are nested. Levels
  0-90 by 10, 85 and 95; those under --trunc_sparsity 50 are never trained (their README).
- One iteration (run_minidisc_cls.py L240-490): the student starts as a copy of the teacher; for each batch, the
  sub-network of every trained sparsity (the "sandwich") runs and back-propagates its loss / the number of
  sparsities, the sum is clipped to norm 5 and AdamW steps (lr 3e-5, weight decay 0.01 but on biases and
  LayerNorms, 10% warmup then linear decay, batch 16, 10 epochs, dev every 10 steps, stop 5 epochs after the best
  evaluation). The loss (sparsebert.py loss_fn): (MSE of the hidden states at layers 0, L/6, 2L/6, .., L over real
  tokens + soft cross-entropy of the logits at T 1, MSE for regression) / 2; the labels are not used.
- Selection: at each evaluation every sparsity's dev metric m_s (a fraction). In a non-final iteration the
  lambda-tradeoff m_s + lambda x s / 100 (lambda 0.2) over the sparsities from the teacher's own up; in the final
  one the target sparsity's metric. The best evaluation's network, cut out at its sparsity, is kept: a TA
  becomes the next iteration's teacher and initialisation, which trains the sparsities from the TA's up. Two
  iterations (--target_iteration 2: one TA); a TA chosen at the target ends the schedule early.

Where we differ, and why:
- Sparsity s keeps (100 - s)% of the transformer-layer parameters (prune.budget: heads by count, as theirs, then
  neurons to the parameter share), so that the student at sparsity s has exactly the size of the KD_x% row at
  x = 100 - s. Theirs removes s% of the neurons, rounded per layer to a multiple of 8 (for GPU kernels): a
  few hundred parameters apart.
- The tradeoff is of the current evaluation, and what is kept is the network scored: theirs takes each sparsity's
  best metric of all evaluations so far but saves the current weights. Sparsities above the target are no
  candidates (theirs maps a winner above the target to the target, at its plain metric).
- Importance from the task's training data (prune.importance), not the dev set, which stays held out.
- KL(teacher || student) for their soft cross-entropy (objectives.logit_kd_loss): the same gradient.
- Hidden states every max(1, L // 6) layers: their L // 6 needs 6 layers or more.

Every finished iteration is written (OUT/iteration1, ..); a rerun with the same settings resumes after the last.

    python -m pipeline.baselines.minidisc --model RUN/model --output OUT --task rte --data-dir ../shared/data/glue
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minimoe_common.cli import (InputError, add_config_arguments, changed_fields, check_output_dir, command,
                                config_from_args)
from minimoe_common.files import write_json
from minimoe_common.tokenizer import load_tokenizer
from pipeline.baselines.prune import (Importance, TaskModel, batches, budget, importance, is_full, load_finetuned,
                                      loss_values, prefix_call, prefix_copy, rewired, sub_network, top_units,
                                      training_batches)
from pipeline.finetune.config import deepspeed_config
from pipeline.finetune.data import TaskData, load_task_data
from pipeline.finetune.run import log_scalars, save_model
from pipeline.finetune.scoring import evaluate
from pipeline.models.files import check_max_seq_length
from pipeline.objectives import _masked_mse, logit_kd_loss
from pipeline.optim import LinearSchedule, build_engine, init_distributed, init_single_process
from pipeline.tasks import Task, get_task

SPARSITIES = [50, 60, 70, 80, 85, 90, 95]  # run_sparsification_cls.py's levels from their --trunc_sparsity 50


@dataclasses.dataclass
class Level:
    """One sparsity's sub-network of the rewired teacher: the heads and FFN neurons each layer keeps (a prefix)."""

    sparsity: int
    heads: list[int]
    neurons: list[int]


def levels(model: TaskModel, scores: Importance, sparsities: list[int]) -> list[Level]:
    """Each sparsity's Level (ascending), by `scores` ranked over all layers; InputError unless they nest."""
    chosen = []
    for sparsity in sorted(sparsities):
        heads, neurons = budget(model.config, 100 - sparsity)
        chosen.append(Level(sparsity, [len(u) for u in top_units(scores.heads, heads)],
                            [len(u) for u in top_units(scores.neurons, neurons)]))
    for wider, narrower in itertools.pairwise(chosen):
        if any(a < b for a, b in zip(wider.heads + wider.neurons, narrower.heads + narrower.neurons)):
            raise InputError(f"--sparsities {wider.sparsity} and {narrower.sparsity}: too close for this model's "
                             f"units (the sparser one would keep more units in some layer); leave one out")
    return chosen


def cut(model: TaskModel, level: Level) -> TaskModel:
    """The rewired `model`'s sub-network at `level`, as a model of its own (their densify)."""
    return prefix_copy(model, sub_network(model, level.heads, level.neurons))


def hidden_layers(num_layers: int) -> list[int]:
    """The hidden states compared (sparsebert.py: every L // 6-th from the embeddings' output to the last)."""
    return list(range(0, num_layers + 1, max(1, num_layers // 6)))


def minidisc_loss(out, teacher_out, attention_mask: torch.Tensor) -> torch.Tensor:
    """(mean over the compared layers of the hidden states' MSE over real tokens + KL(teacher || student) of the
    logits, MSE for regression) / 2."""
    mask = attention_mask.bool()[..., None]  # (B, T, 1)
    hidden = torch.stack([_masked_mse(out.hidden_states[i], teacher_out.hidden_states[i], mask)
                          for i in hidden_layers(len(out.hidden_states) - 1)]).mean()
    return (hidden + logit_kd_loss(out.logits, teacher_out.logits)[0]) / 2


def train_step(engine, teacher: TaskModel, skeletons: list[tuple[Level, TaskModel]],
               batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One optimizer step over the sandwich: each level's sub-network (prefix_call) back-propagates its loss in
    turn, the engine averaging them (gradient_accumulation_steps = the number of levels) -> {"loss@S": each
    one's loss}."""
    batch = {k: v.to(engine.device) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        teacher_out = teacher(**batch, output_hidden_states=True)
    losses = {}
    for level, skeleton in skeletons:
        out = prefix_call(engine.module, skeleton, **batch, output_hidden_states=True)
        loss = minidisc_loss(out, teacher_out, batch["attention_mask"])
        engine.backward(loss)
        engine.step()  # the optimizer steps after the last level
        losses[f"loss@{level.sparsity}"] = loss.detach()
    return losses


def dev_scores(model: TaskModel, trained: list[Level], task: Task, data: TaskData, batch_size: int,
               pad_id: int) -> dict[int, float]:
    """The dev score of every level's sub-network, by sparsity."""
    return {level.sparsity: evaluate(cut(model, level), task, data, batch_size, pad_id, step=0)["score"]
            for level in trained}


def choose(scores: dict[int, float], target: int, lam: float, final: bool) -> tuple[int, float]:
    """(sparsity, value) of an evaluation: in the final iteration the target's metric, else the largest
    lambda-tradeoff metric + lambda x sparsity (fractions) up to the target; ties go to the denser network."""
    if final:
        return target, scores[target] / 100
    tradeoff = {s: score / 100 + lam * s / 100 for s, score in scores.items() if s <= target}
    best = max(tradeoff, key=tradeoff.get)  # scores are ascending by sparsity: the first of equals
    return best, tradeoff[best]


@dataclasses.dataclass
class MiniDiscConfig:
    """MiniDisc's settings (defaults: the authors' bert_scripts/run_minidisc_mrpc.sh and run_minidisc_cls.py)."""

    model: str
    """Finetuned teacher dir (minimoe-finetune's RUN/model: BERT or a dense student), a classification or
    regression task's."""
    output: str
    """Dir for the schedule: iteration1/, iteration2/ (model dirs: the TA, the student), minidisc.json and
    tensorboard/iterationN/ (each sparsity's loss and dev score, the choice)."""
    task: str
    """The task the teacher was finetuned on."""
    data_dir: str
    """The task's folder, or one holding it as TASK/ or glue/TASK/."""
    target_sparsity: int = 90
    """The student's sparsity: it keeps (100 - this)% of the teacher's transformer-layer parameters; one of
    --sparsities."""
    sparsities: list[int] = dataclasses.field(default_factory=lambda: list(SPARSITIES))
    """The nested sub-networks trained (their levels from --trunc_sparsity 50 up); the TA is one of them."""
    lam: float = 0.2
    """lambda of the lambda-tradeoff dev metric + lambda x sparsity that chooses the TA."""
    iterations: int = 2
    """Distillation iterations: 2 = teacher -> TA -> student (their --target_iteration); 1 = no TA."""
    epochs: float = 10.0
    """Training epochs of each iteration."""
    patience_epochs: float = 5.0
    """Stop an iteration this many epochs after its best evaluation."""
    eval_every: int = 10
    """Optimizer steps between dev evaluations (and after the last)."""
    lr: float = 3e-5
    """AdamW's peak learning rate."""
    weight_decay: float = 0.01
    """AdamW's weight decay (not on biases and LayerNorms)."""
    warmup: float = 0.1
    """Share of an iteration's steps warming the rate up, then linear decay to 0."""
    batch_size: int = 16
    """Examples per step."""
    max_seq_length: int = 128
    """Tokens per example after truncation."""
    max_examples: int | None = None
    """Train (and score importance) on the first N training examples (default: all)."""
    max_grad_norm: float = 5.0
    """Clipping of the gradient averaged over the sandwich."""
    seed: int = 776
    """Seed of the data order and dropout."""


def check_config(config: MiniDiscConfig) -> None:
    """InputError for a setting out of range, before any work."""
    if not config.sparsities or not all(0 < s < 100 for s in config.sparsities) or \
            len(set(config.sparsities)) < len(config.sparsities):
        raise InputError(f"--sparsities {' '.join(map(str, config.sparsities))}: distinct percentages in (0, 100)")
    if config.target_sparsity not in config.sparsities:
        raise InputError(f"--target-sparsity {config.target_sparsity}: not one of --sparsities "
                         f"{' '.join(map(str, config.sparsities))}")
    examples = 1 if config.max_examples is None else config.max_examples
    for flag, value in (("--iterations", config.iterations), ("--epochs", config.epochs), ("--lr", config.lr),
                        ("--eval-every", config.eval_every), ("--batch-size", config.batch_size),
                        ("--max-seq-length", config.max_seq_length), ("--max-examples", examples),
                        ("--max-grad-norm", config.max_grad_norm), ("--patience-epochs", config.patience_epochs)):
        if value <= 0:
            raise InputError(f"{flag} {value:g}: must be > 0")
    for flag, value in (("--lam", config.lam), ("--weight-decay", config.weight_decay)):
        if value < 0:
            raise InputError(f"{flag} {value:g}: must be >= 0")
    if not 0 <= config.warmup < 1:
        raise InputError(f"--warmup {config.warmup:g}: a share of the steps in [0, 1)")
    check_output_dir(config.output, "--output")


def iterate(config: MiniDiscConfig, teacher: TaskModel, trained: list[Level], data: TaskData, pad_id: int,
            final: bool, writer) -> tuple[TaskModel, dict]:
    """One iteration: a copy of `teacher` trained on the `trained` levels jointly, distilled from `teacher`, its
    losses and dev scores logged to the TensorBoard `writer`; -> (its best evaluation's network cut at the chosen
    level, the iteration's record)."""
    task = get_task(config.task)
    steps, total_steps, epoch_steps = training_batches(data, pad_id, config.batch_size, config.epochs, config.seed)
    patience_steps = math.ceil(config.patience_epochs * epoch_steps)
    ds_config = {**deepspeed_config(None, config.batch_size, config.max_grad_norm),
                 "gradient_accumulation_steps": len(trained)}
    schedule = LinearSchedule(int(config.warmup * total_steps), total_steps)
    engine = build_engine(copy.deepcopy(teacher).train(), ds_config, config.lr, config.weight_decay, schedule)
    teacher.to(engine.device).eval().requires_grad_(False)
    skeletons = [(level, sub_network(engine.module, level.heads, level.neurons)) for level in trained]
    by_sparsity = {level.sparsity: level for level in trained}
    best, kept, evaluations, losses = None, None, [], []
    for step, batch in enumerate(tqdm(steps, total=total_steps, desc="minidisc"), start=1):
        engine.train()
        step_losses = loss_values(train_step(engine, teacher, skeletons, batch), step)
        losses.append({"step": step, **step_losses})
        log_scalars(writer, step, {f"train/{name}": value for name, value in step_losses.items()})
        if step % config.eval_every == 0 or step == total_steps:
            scores = dev_scores(engine.module, trained, task, data, 2 * config.batch_size, pad_id)
            sparsity, value = choose(scores, config.target_sparsity, config.lam, final)
            evaluations.append({"step": step, "dev": scores, "choice": sparsity, "value": value})
            log_scalars(writer, step, {**{f"dev/score@{s}": score for s, score in scores.items()},
                                       "dev/chosen_sparsity": sparsity, "dev/value": value})
            if best is None or value > best["value"]:
                best, kept = evaluations[-1], cut(engine.module, by_sparsity[sparsity]).eval()
        if best and step - best["step"] >= patience_steps:
            break
    record = {"levels": sorted(by_sparsity), "sparsity": best["choice"], "step": best["step"],
              "dev": best["dev"][best["choice"]], "dev_by_sparsity": best["dev"], "value": best["value"],
              "steps": step, "evaluations": evaluations, "losses": losses}
    return kept, record


def plan(config: MiniDiscConfig, teacher: TaskModel, task: Task, data: TaskData, pad_id: int) -> dict:
    """The output's minidisc.json so far: a new run's settings, importance, levels and teacher score (written), or
    those of the run being resumed (InputError if its settings differ)."""
    path = Path(config.output) / "minidisc.json"
    settings = dataclasses.asdict(config)
    if path.is_file():
        earlier = json.loads(path.read_text())
        changed = changed_fields(earlier["config"], settings, paths=("model", "output", "data_dir"))
        if changed:
            raise InputError(f"--output {config.output}: holds a MiniDisc run with other settings "
                             f"({'; '.join(changed)}); rerun it with them or choose a new --output")
        return earlier
    scores = importance(teacher, batches(data.train, pad_id, config.batch_size))
    teacher_dev = evaluate(teacher, task, data, 2 * config.batch_size, pad_id, step=0)["score"]
    record = {"config": settings, "teacher_dev": teacher_dev,
              "levels": [dataclasses.asdict(level) for level in levels(teacher, scores, config.sparsities)],
              "importance": {"heads": [s.tolist() for s in scores.heads],
                             "neurons": [s.tolist() for s in scores.neurons]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record


def minidisc(config: MiniDiscConfig) -> dict:
    """Schedule and run teacher -> TA -> student (or as many iterations as set), each finished iteration written to
    OUT/iterationN and skipped by a rerun; -> the summary (OUT/minidisc.json)."""
    task = get_task(config.task)
    if task.kind == "token":
        raise InputError(f"--task {task.name}: a token task; MiniDisc here distils sequence classification and "
                         f"regression")
    check_max_seq_length(config.max_seq_length, config.model)
    teacher, tokenizer = load_finetuned(config.model, task), load_tokenizer(config.model)
    if not is_full(teacher.config):
        raise InputError(f"--model {config.model}: a pruned model; MiniDisc starts from a full finetuned model")
    data = load_task_data(task, config.data_dir, tokenizer, config.max_seq_length, config.max_examples)
    summary = plan(config, teacher, task, data, tokenizer.pad_token_id)
    scores = Importance(*([torch.tensor(s) for s in summary["importance"][kind]] for kind in ("heads", "neurons")))
    all_levels = [Level(**level) for level in summary["levels"]]
    init_single_process()
    init_distributed()
    network, schedule = rewired(teacher, scores), [0]  # each iteration's network teaches the next
    for iteration in range(1, config.iterations + 1):
        trained = [level for level in all_levels if level.sparsity >= schedule[-1]]
        network, record = run_iteration(config, iteration, network, schedule[-1], trained, data, tokenizer)
        schedule.append(record["sparsity"])
        if record["sparsity"] == config.target_sparsity:
            break
    summary.update(schedule=schedule, student=str(Path(config.output) / f"iteration{iteration}"), dev=record["dev"],
                   params=sum(p.numel() for p in network.parameters()),
                   layer_params=sum(p.numel() for p in network.student.layers.parameters()))
    write_json(Path(config.output) / "minidisc.json", summary)
    return summary


def run_iteration(config: MiniDiscConfig, iteration: int, teacher: TaskModel, teacher_sparsity: int,
                  trained: list[Level], data: TaskData, tokenizer) -> tuple[TaskModel, dict]:
    """Iteration `iteration`'s chosen network and record: read back from OUT/iterationN where a run finished it,
    else trained (from the seed, so that a resumed schedule repeats an uninterrupted one) and written there."""
    from torch.utils.tensorboard import SummaryWriter

    done = Path(config.output) / f"iteration{iteration}"
    if (done / "minidisc.json").is_file():
        return load_finetuned(str(done), get_task(config.task)), json.loads((done / "minidisc.json").read_text())
    random.seed(config.seed), np.random.seed(config.seed), torch.manual_seed(config.seed)
    logs = Path(config.output) / "tensorboard" / f"iteration{iteration}"
    shutil.rmtree(logs, ignore_errors=True)  # an interrupted attempt's: the iteration starts over
    with SummaryWriter(str(logs)) as writer:
        model, record = iterate(config, teacher, trained, data, tokenizer.pad_token_id,
                                iteration == config.iterations, writer)
    record = {"iteration": iteration, "teacher_sparsity": teacher_sparsity, **record}
    save_model(model, tokenizer, done, {"minidisc.json": record})
    return model, record


@command
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="minimoe-minidisc", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, MiniDiscConfig, config_file=True)
    config = config_from_args(MiniDiscConfig, parser.parse_args(argv))
    check_config(config)
    summary = minidisc(config)
    chain = " -> ".join(f"{s}%" for s in summary["schedule"])
    print(f"schedule (sparsity) {chain}: dev {summary['dev']:.2f} (teacher {summary['teacher_dev']:.2f}), "
          f"{summary['params'] / 1e6:.2f} M params; student: {summary['student']}")


if __name__ == "__main__":
    sys.exit(main())
