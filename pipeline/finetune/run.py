"""One finetuning run (one lr, batch size and seed): the DeepSpeed engine, dev scored on a step schedule,
the best evaluation's model kept, early stopping."""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from minimoe_common.cli import InputError
from minimoe_common.files import write_json, written_dir
from minimoe_common.tokenizer import load_tokenizer, tokenizer_fingerprint
from pipeline.finetune.config import FinetuneConfig, deepspeed_config
from pipeline.finetune.data import collate, load_task_data
from pipeline.finetune.scoring import evaluate, majority_baseline
from pipeline.models import StudentForSequenceClassification, StudentForTokenClassification, is_student_dir
from pipeline.models.files import check_max_seq_length, loading, read_model_config
from pipeline.objectives import logit_kd_loss, moebert_loss, patient_loss, task_loss
from pipeline.optim import LinearSchedule, build_engine, check_finite, init_distributed, init_single_process
from pipeline.tasks import Task, get_task

# How a config.json names a finetuned head: transformers' architectures suffix per task kind (our students'
# earlier format wrote a `task_head` kind instead).
HEAD_SUFFIX = {"classification": "ForSequenceClassification", "regression": "ForSequenceClassification",
               "token": "ForTokenClassification"}
LEGACY_HEAD_SUFFIX = {"sequence_classification": "ForSequenceClassification",
                      "token_classification": "ForTokenClassification"}


def build_model(model_dir: str | Path, task: Task) -> tuple[torch.nn.Module, object]:
    """(model with the task's head, fast tokenizer) from a student dir or a Hugging Face dir."""
    model_dir = Path(model_dir)
    read_model_config(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    with loading(model_dir):
        if is_student_dir(model_dir):
            head = StudentForTokenClassification if task.kind == "token" else StudentForSequenceClassification
            model = head.from_pretrained(model_dir, num_labels=task.num_labels, deepspeed_moe=True)  # the training path
        else:
            from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

            auto = AutoModelForTokenClassification if task.kind == "token" else AutoModelForSequenceClassification
            model = auto.from_pretrained(str(model_dir), num_labels=task.num_labels, trust_remote_code=False)
    return model, tokenizer


def check_finetuned_for(teacher_dir: str, task: Task, flag: str = "--teacher") -> None:
    """A KD teacher (or a model to prune) must hold a head finetuned for the task: loaded without one, it would
    get a random head without a word (or fail on the shapes with another label count). Its run's results.json,
    when next to it (RUN/model), must name the task. `flag` names the dir in the errors."""
    config = read_model_config(teacher_dir)
    legacy = config.get("task_head")
    if legacy:
        heads, labels = [LEGACY_HEAD_SUFFIX.get(legacy.get("kind"), "")], legacy.get("num_labels")
    else:  # transformers leaves id2label out of config.json when it is the default of 2 labels
        heads, labels = config.get("architectures") or [], len(config.get("id2label") or {0: 0, 1: 1})
    suffix = HEAD_SUFFIX[task.kind]
    if not any(h.endswith(suffix) for h in heads):
        raise InputError(f"{flag} {teacher_dir}: not finetuned for {task.name} (no *{suffix} head in its "
                        f"config.json); finetune it first: minimoe-finetune --model {teacher_dir} --task {task.name} ...")
    if labels != task.num_labels:
        raise InputError(f"{flag} {teacher_dir}: its head has {labels} labels, task {task.name} has {task.num_labels}")
    run_results = Path(teacher_dir).parent / "results.json"
    trained_on = json.loads(run_results.read_text()).get("task") if run_results.is_file() else None
    if trained_on not in (None, task.name):
        raise InputError(f"{flag} {teacher_dir}: finetuned for {trained_on} ({run_results}), not {task.name}")


def load_teacher(teacher_dir: str | None, task: Task, tokenizer) -> torch.nn.Module | None:
    """The frozen finetuned teacher of task-specific KD (None without --teacher); it must share the tokenizer."""
    if teacher_dir is None:
        return None
    check_finetuned_for(teacher_dir, task)
    teacher, teacher_tokenizer = build_model(teacher_dir, task)
    if tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{teacher_dir}: the teacher's tokenizer differs from the student's; KD needs the same ids")
    return teacher.eval().requires_grad_(False)


def save_model(model: torch.nn.Module, tokenizer, path: Path, records: dict[str, dict] | None = None) -> None:
    """Write model + tokenizer (and `records`, JSON files by name) to `path` whole, readable by others."""
    with written_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        for name, record in (records or {}).items():
            write_json(tmp / name, record)


def predictions(task: Task, logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student logits (N, C), teacher logits (N, C), labels (N,)): a sequence task's rows, a token task's labelled
    positions (first sub-tokens) only."""
    classes = logits.size(-1)
    logits, teacher_logits, labels = logits.reshape(-1, classes), teacher_logits.reshape(-1, classes), labels.reshape(-1)
    if task.kind == "token":
        keep = labels != -100
        logits, teacher_logits, labels = logits[keep], teacher_logits[keep], labels[keep]
    return logits, teacher_logits, labels


def kd_loss(task: Task, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            alpha: float, temperature: float) -> torch.Tensor:
    """The paper's task-specific KD: alpha x soft (T^2 KL to the teacher, MSE for regression) +
    (1 - alpha) x task loss, on `predictions`."""
    logits, teacher_logits, labels = predictions(task, logits, teacher_logits, labels)
    return logit_kd_loss(logits, teacher_logits, temperature, labels=labels, alpha=alpha)[0]


def pkd_layer_pairs(student_layers: int, teacher_layers: int, strategy: str) -> list[tuple[int, int]]:
    """PKD's (student layer, teacher layer) pairs, 1-based as in hidden_states (0 is the embeddings): student
    layers 1 .. Ls-1, their last one being distilled through the logits, to teacher layers k x Lt / Ls
    (skip; rounded down where Lt / Ls is not whole) or Lt - Ls + k (last: the teacher's Ls-1 before its final
    one). Sun et al. 2019, Sec. 3.2: PKD-Skip and PKD-Last."""
    if not 2 <= student_layers <= teacher_layers:
        raise InputError(f"--pkd-beta maps student layers 1 .. Ls-1 to teacher layers: it needs 2 <= Ls <= Lt, got "
                         f"a student of {student_layers} layers and a teacher of {teacher_layers}")
    offset = teacher_layers - student_layers
    return [(k, k * teacher_layers // student_layers if strategy == "skip" else offset + k)
            for k in range(1, student_layers)]


def layer_pairs(config: FinetuneConfig, model: torch.nn.Module, teacher: torch.nn.Module | None) -> list[tuple[int, int]]:
    """The (student, teacher) hidden_states pairs of the layer-wise loss: PKD's mapped layers (--pkd-beta), or
    MoEBERT's every state, the embeddings' output included (--moebert-distill: student and teacher of one depth);
    [] for neither. The states are compared as they are, as in PKD (its students are BERT-base wide) and MoEBERT
    (its students are the teacher's shape): another width is refused, not bridged by a learned projection (that
    would be another method, TinyBERT's W_h)."""
    if not (config.pkd_beta or config.moebert_distill):
        return []
    flag, states = ("--pkd-beta", "[CLS] states") if config.pkd_beta else ("--moebert-distill", "hidden states")
    student, teacher = model.config, teacher.config
    if student.hidden_size != teacher.hidden_size:
        raise InputError(f"{flag} compares {states} of equal width: the student's hidden size is "
                         f"{student.hidden_size}, the teacher's {teacher.hidden_size} ({config.teacher})")
    if config.pkd_beta:
        return pkd_layer_pairs(student.num_hidden_layers, teacher.num_hidden_layers, config.pkd_strategy)
    if student.num_hidden_layers != teacher.num_hidden_layers:
        raise InputError(f"--moebert-distill pairs every layer's hidden state: the student has "
                         f"{student.num_hidden_layers} layers, the teacher {teacher.num_hidden_layers} ({config.teacher})")
    return [(i, i) for i in range(student.num_hidden_layers + 1)]


def distillation_loss(task: Task, out, teacher_out, labels: torch.Tensor, attention_mask: torch.Tensor,
                      config: FinetuneConfig, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (loss, its layer-wise terms by name, before their weight). With --moebert-distill, MoEBERT's task loss
    + weight x (hidden-state MSE of the pairs + symmetric KL of the predictions) (moebert_loss; "hidden_loss",
    "prediction_loss"); otherwise KD (kd_loss), plus with layer pairs PKD's beta x patient loss on their [CLS]
    states (Sun et al. 2019: (1 - alpha) CE + alpha T^2 KL + beta L_PT; "patient_loss"). `out` / `teacher_out`:
    model outputs with logits (and hidden_states, when there are pairs); attention_mask (B, T), 1 = real token."""
    if config.moebert_distill:
        logits, teacher_logits, _ = predictions(task, out.logits, teacher_out.logits, labels)
        distill, parts = moebert_loss([out.hidden_states[i] for i, _ in pairs],
                                      [teacher_out.hidden_states[j] for _, j in pairs], logits, teacher_logits,
                                      attention_mask)
        loss = task_loss(out.logits, labels) + config.moebert_distill * distill
        return loss, {"hidden_loss": parts["hidden"], "prediction_loss": parts["prediction"]}
    loss = kd_loss(task, out.logits, teacher_out.logits, labels, config.kd_alpha, config.temperature)
    if not pairs:
        return loss, {}
    student_cls = torch.stack([out.hidden_states[i][:, 0] for i, _ in pairs], 1)  # (B, M, H)
    teacher_cls = torch.stack([teacher_out.hidden_states[j][:, 0] for _, j in pairs], 1)
    patient = patient_loss(student_cls, teacher_cls)
    return loss + config.pkd_beta * patient, {"patient_loss": patient}


def is_main_process() -> bool:
    """Rank 0, or the only process; the launcher's RANK is known before torch.distributed is up."""
    return int(os.environ.get("RANK", "0")) == 0


def evaluation_steps(total_steps: int, steps_per_epoch: int, eval_every: int) -> set[int]:
    """The steps after which dev is scored: every `eval_every` steps (0: each epoch's end), and the last."""
    if eval_every:
        return {*range(eval_every, total_steps, eval_every), total_steps}
    return {*range(steps_per_epoch, total_steps, steps_per_epoch), total_steps}


@dataclass
class Selection:
    """The dev evaluations of a run and the best one by the paper's metric; a later evaluation replaces it
    only with a strictly higher score (as the authors' selection), so ties keep the earlier model."""

    patience: int
    """Evaluations in a row without improvement that stop the run; 0 = never."""
    history: list[dict] = field(default_factory=list)
    best_index: int | None = None

    def add(self, evaluation: dict) -> bool:
        """Record an evaluation; True when it is the new best."""
        self.history.append(evaluation)
        if self.best_index is not None and evaluation["score"] <= self.best["score"]:
            return False
        self.best_index = len(self.history) - 1
        return True

    @property
    def best(self) -> dict | None:
        return None if self.best_index is None else self.history[self.best_index]

    def should_stop(self) -> bool:
        return self.patience > 0 and len(self.history) - 1 - self.best_index >= self.patience


def training_batches(loader: DataLoader, sampler: DistributedSampler) -> Iterator[dict[str, torch.Tensor]]:
    """Batches epoch after epoch, each epoch in the sampler's order for that epoch (seed + epoch)."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def train_run(config: FinetuneConfig, lr: float, batch_size: int, seed: int, output: Path) -> dict:
    """Train one (lr, batch, seed), scoring dev on `evaluation_steps`; model/ holds the best evaluation's
    weights. Returns the results, also written to output/results.json."""
    from torch.utils.tensorboard import SummaryWriter

    task = get_task(config.task)
    for model_dir in filter(None, (config.model, config.teacher)):
        check_max_seq_length(config.max_seq_length, model_dir)
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    model, tokenizer = build_model(config.model, task)
    teacher = load_teacher(config.teacher, task, tokenizer)
    pairs = layer_pairs(config, model, teacher)
    data = load_task_data(task, config.data_dir, tokenizer, config.max_seq_length, config.max_train_examples)

    init_single_process()
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(data.train, batch_size=batch_size, sampler=sampler, collate_fn=lambda f: collate(f, tokenizer.pad_token_id))
    total_steps = max(1, math.ceil(config.epochs * len(loader)))
    engine = build_engine(model, deepspeed_config(config.deepspeed_config, batch_size, config.max_grad_norm), lr,
                          config.weight_decay, LinearSchedule(max(1, int(config.warmup * total_steps)), total_steps))
    if teacher is not None:
        teacher.to(engine.device)

    writer = SummaryWriter(str(output / "tensorboard")) if rank == 0 else None
    scored_at = evaluation_steps(total_steps, len(loader), config.eval_every)
    selection, examples, started = Selection(config.patience), 0, time.time()
    description = f"{task.name} lr={lr:g} bs={batch_size} seed={seed}"
    with tqdm(total=total_steps, desc=description, disable=rank != 0) as progress:  # closed before an error prints
        for step, batch in enumerate(training_batches(loader, sampler), start=1):
            engine.train()
            terms = train_step(engine, teacher, task, batch, config, pairs)
            losses = dict(zip(terms, torch.stack([t.detach().float() for t in terms.values()]).tolist()))  # one sync
            check_finite(losses, step)
            examples += len(batch["labels"]) * world
            progress.update()
            if writer and step % 10 == 0:
                log_scalars(writer, step, {**{f"train/{name}": value for name, value in losses.items()},
                                           "train/lr": engine.get_lr()[0]})
            if step in scored_at:
                evaluation = evaluate(engine.module, task, data, 2 * batch_size, tokenizer.pad_token_id, step)
                scores = {f"dev/{name}/{metric}": value for name, metrics in evaluation["metrics"].items()
                          for metric, value in metrics.items()}
                check_finite(scores, step, what="dev metric")
                if writer:
                    log_scalars(writer, step, scores)
                if selection.add(evaluation) and rank == 0:
                    save_model(engine.module, tokenizer, output / "model")
                progress.set_postfix(dev=f"{evaluation['score']:.2f}", best=f"{selection.best['score']:.2f}")
            if step == total_steps or (step in scored_at and selection.should_stop()):
                break
    seconds = time.time() - started
    best = selection.best
    results = {
        "task": task.name, "model": str(config.model), "teacher": config.teacher,
        "lr": lr, "batch_size": batch_size, "seed": seed, "world_size": world,
        "metrics": best["metrics"], "score": best["score"], "best_step": best["step"],
        "unlabelled_words": best["unlabelled_words"], "history": selection.history,
        "majority_baseline": majority_baseline(task, data), "train_examples": len(data.train),
        "steps": total_steps, "steps_trained": step, "stopped_early": step < total_steps,
        "seconds": round(seconds, 1),  # training and the dev evaluations
        "train_examples_per_second": round(examples / seconds, 1),
        "layer_pairs": pairs, "model_dir": str(output / "model"), "config": dataclasses.asdict(config),
    }
    if rank == 0:
        write_json(output / "results.json", results)
        writer.close()
        first = next(iter(task.dev_files))
        print(f"{task.name}: best dev {task.metrics[0]} {best['score']:.2f} at step {best['step']} (majority-class "
              f"baseline {results['majority_baseline'][first][task.metrics[0]]:.2f})", file=sys.stderr)
    torch.distributed.barrier()  # the other ranks see results.json before they look for it (suite resume)
    return results


def train_step(engine, teacher, task: Task, batch: dict[str, torch.Tensor], config: FinetuneConfig,
               pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """One optimizer step on task loss (or KD, PKD, MoEBERT) + the student's MoE aux loss (HF models have none).
    -> {"loss": the loss without aux, "aux_loss", and distillation_loss's layer-wise terms}."""
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    labels = batch.pop("labels")
    hidden = {"output_hidden_states": True} if pairs else {}  # our heads and transformers' alike
    out = engine(**batch, **hidden)
    aux = getattr(out, "aux_loss", None)
    aux = torch.zeros((), device=engine.device) if aux is None else aux.float()
    terms = {}
    if teacher is None:
        loss = task_loss(out.logits, labels)
    else:
        with torch.no_grad():
            teacher_out = teacher(**batch, **hidden)
        loss, terms = distillation_loss(task, out, teacher_out, labels, batch["attention_mask"], config, pairs)
    engine.backward(loss + aux)
    engine.step()
    return {"loss": loss, "aux_loss": aux, **terms}


def log_scalars(writer, step: int, values: dict[str, float]) -> None:
    for tag, value in values.items():
        writer.add_scalar(tag, value, step)
