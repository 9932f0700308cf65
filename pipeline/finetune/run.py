"""One finetuning run (one lr, batch size and seed): the DeepSpeed engine, dev scored on a step schedule,
the best evaluation's model kept, early stopping."""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from data_prep.shards import write_json
from data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint
from pipeline.finetune.config import FinetuneConfig, deepspeed_config
from pipeline.finetune.data import collate, load_task_data
from pipeline.finetune.scoring import evaluate, majority_baseline
from pipeline.model import StudentForSequenceClassification, StudentForTokenClassification, is_student_dir
from pipeline.objectives import logit_kd_loss, task_loss
from pipeline.optim import build_engine
from pipeline.tasks import DataError, Task, get_task


def build_model(model_dir: str | Path, task: Task) -> tuple[torch.nn.Module, object]:
    """(model with the task's head, fast tokenizer) from a student dir or a Hugging Face dir."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (expected an exported student or a Hugging Face model dir)")
    tokenizer = load_tokenizer(str(model_dir))
    if is_student_dir(model_dir):
        head = StudentForTokenClassification if task.kind == "token" else StudentForSequenceClassification
        model = head.from_pretrained(model_dir, num_labels=task.num_labels)
    else:
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

        auto = AutoModelForTokenClassification if task.kind == "token" else AutoModelForSequenceClassification
        model = auto.from_pretrained(str(model_dir), num_labels=task.num_labels, trust_remote_code=False)
    return model, tokenizer


def load_teacher(teacher_dir: str | None, task: Task, tokenizer) -> torch.nn.Module | None:
    """The frozen finetuned teacher of task-specific KD (None without --teacher); it must share the tokenizer."""
    if teacher_dir is None:
        return None
    teacher, teacher_tokenizer = build_model(teacher_dir, task)
    if tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{teacher_dir}: the teacher's tokenizer differs from the student's; KD needs the same ids")
    return teacher.eval().requires_grad_(False)


def save_model(model: torch.nn.Module, tokenizer, path: Path) -> None:
    """Write model + tokenizer to `path` through a temporary dir, so `path` is never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def kd_loss(task: Task, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            alpha: float, temperature: float) -> torch.Tensor:
    """The paper's task-specific KD: alpha x soft (T^2 KL to the teacher, MSE for regression) +
    (1 - alpha) x task loss; token tasks on their labelled positions (first sub-tokens) only."""
    classes = logits.size(-1)
    logits, teacher_logits, labels = logits.reshape(-1, classes), teacher_logits.reshape(-1, classes), labels.reshape(-1)
    if task.kind == "token":
        keep = labels != -100
        logits, teacher_logits, labels = logits[keep], teacher_logits[keep], labels[keep]
    return logit_kd_loss(logits, teacher_logits, temperature, labels=labels, alpha=alpha)[0]


def is_main_process() -> bool:
    """Rank 0, or the only process; the launcher's RANK is known before torch.distributed is up."""
    return int(os.environ.get("RANK", "0")) == 0


def init_single_process() -> None:
    """Without a launcher, make this process rank 0 of 1 (DeepSpeed would otherwise look for MPI)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


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
    import deepspeed
    from torch.utils.tensorboard import SummaryWriter

    task = get_task(config.task)
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    model, tokenizer = build_model(config.model, task)
    teacher = load_teacher(config.teacher, task, tokenizer)
    data = load_task_data(task, config.data_dir, tokenizer, config.max_seq_length, config.max_train_examples)
    if not data.train:
        raise DataError(f"{config.data_dir}: task {task.name} has no training examples")

    init_single_process()
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(data.train, batch_size=batch_size, sampler=sampler, collate_fn=lambda f: collate(f, tokenizer.pad_token_id))
    total_steps = max(1, math.ceil(config.epochs * len(loader)))
    engine = build_engine(model, deepspeed_config(config.deepspeed_config, batch_size, config.max_grad_norm), lr,
                          config.weight_decay, max(1, int(config.warmup * total_steps)), total_steps)
    if teacher is not None:
        teacher.to(engine.device)

    writer = SummaryWriter(str(output / "tensorboard")) if rank == 0 else None
    scored_at = evaluation_steps(total_steps, len(loader), config.eval_every)
    selection, examples, started = Selection(config.patience), 0, time.time()
    progress = tqdm(total=total_steps, desc=f"{task.name} lr={lr:g} bs={batch_size} seed={seed}", disable=rank != 0)
    for step, batch in enumerate(training_batches(loader, sampler), start=1):
        engine.train()
        loss, aux = train_step(engine, teacher, task, batch, config)
        examples += len(batch["labels"]) * world
        progress.update()
        if writer and step % 10 == 0:
            log_scalars(writer, step, {"train/loss": loss.item(), "train/aux_loss": aux.item(), "train/lr": engine.get_lr()[0]})
        if step in scored_at:
            evaluation = evaluate(engine.module, task, data, 2 * batch_size, tokenizer.pad_token_id, step)
            if writer:
                log_scalars(writer, step, {f"dev/{name}/{metric}": value for name, metrics in evaluation["metrics"].items()
                                           for metric, value in metrics.items()})
            if selection.add(evaluation) and rank == 0:
                save_model(engine.module, tokenizer, output / "model")
            progress.set_postfix(dev=f"{evaluation['score']:.2f}", best=f"{selection.best['score']:.2f}")
        if step == total_steps or (step in scored_at and selection.should_stop()):
            break
    progress.close()
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
        "model_dir": str(output / "model"), "config": dataclasses.asdict(config),
    }
    if rank == 0:
        write_json(output / "results.json", results)
        writer.close()
    torch.distributed.barrier()  # the other ranks see results.json before they look for it (suite resume)
    return results


def train_step(engine, teacher, task: Task, batch: dict[str, torch.Tensor], config: FinetuneConfig):
    """One optimizer step on task loss (or KD) + the student's MoE aux loss (HF models have none)."""
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    labels = batch.pop("labels")
    out = engine(**batch)
    aux = getattr(out, "aux_loss", None)
    aux = torch.zeros((), device=engine.device) if aux is None else aux.float()
    if teacher is None:
        loss = task_loss(out.logits, labels)
    else:
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits
        loss = kd_loss(task, out.logits, teacher_logits, labels, config.kd_alpha, config.temperature)
    engine.backward(loss + aux)
    engine.step()
    return loss, aux


def log_scalars(writer, step: int, values: dict[str, float]) -> None:
    for tag, value in values.items():
        writer.add_scalar(tag, value, step)
