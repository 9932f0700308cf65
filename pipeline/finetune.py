"""Finetune a model dir on a GLUE task or CoNLL-2003 NER through the DeepSpeed engine.

    python -m pipeline.finetune --model DIR --task rte --data-dir ../shared/data/glue --output out/rte
    python -m pipeline.finetune suite --model DIR [DIR ...] --data-dir ../shared/data --output out/suite
    ./launch.sh finetune --num-procs 2 [suite] ...   # data parallel: N processes through the deepspeed launcher

The model dir is an exported student (config.json "model_type": "minimoe-student") or any Hugging Face
encoder dir (BERT, RoBERTa, MPNet, ...; the packaged teacher is the reference row). Both go through one
loop: the task loss is computed here from the logits, plus the student's MoE aux loss (0 for dense and HF
models), plus the task-specific KD term of the paper's KD rows when --teacher is given.
Each run writes results.json, the best-epoch model in model/ and TensorBoard logs in tensorboard/.
Under the launcher every process trains on its slice of each batch and scores the whole dev set (the
weights are equal on all ranks, so all ranks agree on the best epoch); rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from data_prep.config_cli import add_config_arguments, config_from_args
from data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint
from pipeline.metrics import METRICS
from pipeline.model import StudentForSequenceClassification, StudentForTokenClassification, is_student_dir
from pipeline.objectives import logit_kd_loss
from pipeline.optim import build_engine, read_deepspeed_config
from pipeline.tasks import PAPER_COLUMNS, TASKS, DataError, Task, find_task_dir, get_task, read_split

# `--grid` without explicit lists: the learning rates and batch sizes tried for every task.
GRID_LR = (2e-5, 5e-5, 1e-4)
GRID_BATCH_SIZE = (16, 32)


@dataclass
class FinetuneConfig:
    """One finetuning job: a task, a model and its hyperparameters (lists make a grid)."""

    model: str
    """Model dir: an exported student or a Hugging Face encoder dir."""
    task: str
    """Task: sst2, mrpc, stsb, qqp, mnli, qnli, rte, cola or conll2003 (case and '-' ignored: SST-2 = sst2)."""
    data_dir: str
    """The task's folder, or a folder holding it as TASK/ or glue/TASK/."""
    output: str
    """Output dir: results.json, model/ (the best epoch), tensorboard/; runs/ for a grid."""
    lr: list[float] = field(default_factory=lambda: [5e-5])
    """Peak learning rate(s) of AdamW; several values form a grid."""
    batch_size: list[int] = field(default_factory=lambda: [32])
    """Micro batch size(s) per process (overrides the ds_config's); under the launcher the global batch
    is this x processes."""
    seed: list[int] = field(default_factory=lambda: [42])
    """Random seed(s): head init, dropout, data order."""
    grid: bool = False
    """Grid over lr 2e-5, 5e-5, 1e-4 x batch 16, 32 x the seeds, unless --lr / --batch-size list values;
    keep the best dev run."""
    epochs: float = 3.0
    """Training epochs (fractions allowed); dev is scored after each epoch."""
    warmup: float = 0.1
    """Linear warmup, as a fraction of the steps; then linear decay to 0."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorm)."""
    max_seq_length: int = 128
    """Tokens per example after truncation."""
    max_train_examples: int | None = None
    """Use only the first N training examples (e.g. 20000 for SST-2); default: all."""
    teacher: str | None = None
    """Finetuned model dir for task-specific KD (the paper's KD rows)."""
    kd_alpha: float = 0.5
    """Weight of the KD term; 1 - kd_alpha weighs the task loss."""
    temperature: float = 1.0
    """Softmax temperature of the KD term."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON config (e.g. ds_configs/zero2.json); default: ZeRO-0 fp32."""

    def __post_init__(self) -> None:
        if self.grid:
            self.lr = self.lr if len(self.lr) > 1 else list(GRID_LR)
            self.batch_size = self.batch_size if len(self.batch_size) > 1 else list(GRID_BATCH_SIZE)
        if not 0 <= self.kd_alpha <= 1 or self.temperature <= 0 or self.epochs <= 0 or not 0 <= self.warmup < 1:
            raise ValueError("need 0 <= kd_alpha <= 1, temperature > 0, epochs > 0 and 0 <= warmup < 1")


# ---------------------------------------------------------------- model


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


def save_model(model: torch.nn.Module, tokenizer, path: Path) -> None:
    """Write model + tokenizer to `path` through a temporary dir, so `path` is never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------- data


def encode(task: Task, examples: list, tokenizer, max_length: int) -> list[dict]:
    """Tokenized features: input_ids, attention_mask, (token_type_ids), labels; for CoNLL also `words`,
    the word index of each labelled position (only the first sub-token of a word is labelled)."""
    if task.kind == "token":
        encoded = tokenizer([s.words for s in examples], is_split_into_words=True, truncation=True, max_length=max_length)
    else:
        pairs = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
        encoded = tokenizer([e.text_a for e in examples], pairs, truncation=True, max_length=max_length)
    features = []
    for i, example in enumerate(examples):
        feature = {k: encoded[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
        if task.kind == "token":
            word_ids, labels, words = encoded.word_ids(i), [], []
            for position, word in enumerate(word_ids):
                first = word is not None and (position == 0 or word_ids[position - 1] != word)
                labels.append(example.labels[word] if first else -100)
                if first:
                    words.append(word)
            feature.update(labels=labels, words=words)
        else:
            feature["labels"] = example.label
        features.append(feature)
    return features


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of the batch; padded labels are -100 (ignored)."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key, pad in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] + [pad] * (length - len(f[key])) for f in features])
    labels = [f["labels"] for f in features]
    if isinstance(labels[0], list):
        batch["labels"] = torch.tensor([l + [-100] * (length - len(l)) for l in labels])
    else:
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
    return batch


@dataclass
class TaskData:
    """Encoded train set and dev sets of one task for one tokenizer."""

    train: list[dict]
    dev: dict[str, tuple[list, list[dict]]]  # result name -> (examples, features)


def load_task_data(task: Task, data_dir: str | Path, tokenizer, max_length: int, max_train: int | None) -> TaskData:
    folder = find_task_dir(data_dir, task)
    train = read_split(task, folder / task.train_file)[:max_train]
    dev = {name: read_split(task, folder / file) for name, file in task.dev_files.items()}
    return TaskData(encode(task, train, tokenizer, max_length),
                    {name: (examples, encode(task, examples, tokenizer, max_length)) for name, examples in dev.items()})


# ---------------------------------------------------------------- loss and scoring


def task_loss(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (classification, token: -100 ignored) or MSE (regression)."""
    if task.kind == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


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


def score(task: Task, examples: list, predictions: list) -> dict[str, float]:
    """The task's metrics in percent, predictions being class ids, floats, or tag-id lists per sentence."""
    if task.kind == "token":
        gold = [[task.labels[i] for i in s.labels] for s in examples]
        predicted = [[task.labels[i] for i in p] for p in predictions]
        return {m: 100 * METRICS[m](predicted, gold) for m in task.metrics}
    labels = [e.label for e in examples]
    return {m: 100 * METRICS[m](predictions, labels) for m in task.metrics}


def majority_baseline(task: Task, data: TaskData) -> dict[str, dict[str, float]]:
    """Scores of a constant prediction (the most frequent train label; the train mean for regression)."""
    train_labels = [f["labels"] for f in data.train]
    if task.kind == "token":
        constant = max(set(l for s in train_labels for l in s if l != -100), key=[l for s in train_labels for l in s].count)
    elif task.kind == "regression":
        constant = float(np.mean(train_labels))
    else:
        constant = max(set(train_labels), key=train_labels.count)
    return {name: score(task, examples, [[constant] * len(e.words) if task.kind == "token" else constant for e in examples])
            for name, (examples, _) in data.dev.items()}


@torch.no_grad()
def predict(model, task: Task, features: list[dict], examples: list, batch_size: int, pad_id: int) -> tuple[list, int]:
    """Predictions for `examples`, and for CoNLL the number of words left unlabelled by truncation
    (they are predicted O, so they still count in the entity F1)."""
    model.eval()
    outputs = []
    for start in range(0, len(features), batch_size):
        batch = collate(features[start:start + batch_size], pad_id)
        labels = batch.pop("labels")
        logits = model(**{k: v.to(model_device(model)) for k, v in batch.items()}).logits.float().cpu()
        if task.kind == "regression":
            outputs.extend(logits.squeeze(-1).tolist())
        elif task.kind == "classification":
            outputs.extend(logits.argmax(-1).tolist())
        else:
            for row, label_row in zip(logits.argmax(-1), labels):
                outputs.append(row[label_row != -100].tolist())
    if task.kind != "token":
        return outputs, 0
    tags, unlabelled = [], 0
    for example, feature, predicted in zip(examples, features, outputs):
        sentence = [task.labels.index("O")] * len(example.words)
        for word, tag in zip(feature["words"], predicted):
            sentence[word] = tag
        tags.append(sentence)
        unlabelled += len(example.words) - len(feature["words"])
    return tags, unlabelled


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def is_main_process() -> bool:
    """Rank 0, or the only process; the launcher's RANK is known before torch.distributed is up."""
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------- engine


def init_single_process() -> None:
    """Without a launcher, make this process rank 0 of 1 (DeepSpeed would otherwise look for MPI)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# ds_config keys that finetune's flags own: a config setting them is refused rather than ignored.
OWNED_DS_KEYS = {
    "train_batch_size": "--batch-size", "train_micro_batch_size_per_gpu": "--batch-size",
    "gradient_accumulation_steps": "--batch-size", "optimizer": "--lr / --weight-decay", "scheduler": "--lr / --warmup",
}


def deepspeed_config(path: str | None, batch_size: int) -> dict:
    """The ds_config (ZeRO stage, precision; default ZeRO-0 fp32) with the batch set from --batch-size."""
    config = read_deepspeed_config(path, OWNED_DS_KEYS, "minimoe-finetune") if path else {
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    return {**config, "train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": config.get("gradient_clipping", 1.0)}


# ---------------------------------------------------------------- one run


def train_run(config: FinetuneConfig, lr: float, batch_size: int, seed: int, output: Path) -> dict:
    """Train one (lr, batch, seed) and return its results (also written to output/results.json)."""
    import deepspeed
    from torch.utils.tensorboard import SummaryWriter

    task = get_task(config.task)
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    model, tokenizer = build_model(config.model, task)
    teacher = None
    if config.teacher:
        teacher, teacher_tokenizer = build_model(config.teacher, task)
        if tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"{config.teacher}: the teacher's tokenizer differs from {config.model}'s; KD needs the same ids")
        teacher.eval().requires_grad_(False)
    data = load_task_data(task, config.data_dir, tokenizer, config.max_seq_length, config.max_train_examples)
    if not data.train:
        raise DataError(f"{config.data_dir}: task {task.name} has no training examples")

    init_single_process()
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(data.train, batch_size=batch_size, sampler=sampler, collate_fn=lambda f: collate(f, tokenizer.pad_token_id))
    total_steps = max(1, math.ceil(config.epochs * len(loader)))
    warmup_steps = max(1, int(config.warmup * total_steps))
    engine = build_engine(model, deepspeed_config(config.deepspeed_config, batch_size), lr, config.weight_decay,
                          warmup_steps, total_steps)
    if teacher is not None:
        teacher.to(engine.device)

    writer = SummaryWriter(str(output / "tensorboard")) if rank == 0 else None
    history, best, step, started = [], None, 0, time.time()
    epoch_ends = sorted({min(total_steps, math.ceil(e * len(loader))) for e in range(1, math.ceil(config.epochs) + 1)})
    progress = tqdm(total=total_steps, desc=f"{task.name} lr={lr:g} bs={batch_size} seed={seed}", disable=rank != 0)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        engine.train()
        for batch in loader:
            loss, aux = train_step(engine, teacher, task, batch, config)
            step += 1
            progress.update()
            if writer and step % 10 == 0:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/aux_loss", aux.item(), step)
                writer.add_scalar("train/lr", engine.get_lr()[0], step)
            if step in epoch_ends:
                history.append(evaluate(engine.module, task, data, batch_size, tokenizer.pad_token_id, step, writer))
                progress.set_postfix(dev=f"{history[-1]['score']:.2f}")
                if best is None or history[-1]["score"] > best["score"]:
                    best = history[-1]
                    if rank == 0:
                        save_model(engine.module, tokenizer, output / "model")
                engine.train()
            if step == total_steps:
                break
        if step == total_steps:
            break
    progress.close()
    seconds = time.time() - started
    results = {
        "task": task.name, "model": str(config.model), "teacher": config.teacher,
        "lr": lr, "batch_size": batch_size, "seed": seed, "world_size": world,
        "metrics": best["metrics"] if best else None, "score": best["score"] if best else None,
        "best_step": best["step"] if best else None, "unlabelled_words": best["unlabelled_words"] if best else None,
        "history": history, "majority_baseline": majority_baseline(task, data),
        "train_examples": len(data.train), "steps": total_steps,
        "seconds": round(seconds, 1),  # training and the dev evaluations after each epoch
        "train_examples_per_second": round(config.epochs * len(data.train) / seconds, 1),
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
        loss = task_loss(task, out.logits, labels)
    else:
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits
        loss = kd_loss(task, out.logits, teacher_logits, labels, config.kd_alpha, config.temperature)
    engine.backward(loss + aux)
    engine.step()
    return loss, aux


def evaluate(model, task: Task, data: TaskData, batch_size: int, pad_id: int, step: int, writer) -> dict:
    """Dev scores at `step`; `score` is the paper's metric on the first dev set (mnli-m for MNLI)."""
    metrics, unlabelled = {}, 0
    for name, (examples, features) in data.dev.items():
        predictions, missing = predict(model, task, features, examples, 2 * batch_size, pad_id)
        metrics[name], unlabelled = score(task, examples, predictions), unlabelled + missing
        for metric, value in metrics[name].items():
            if writer:
                writer.add_scalar(f"dev/{name}/{metric}", value, step)
    first = next(iter(task.dev_files))
    return {"step": step, "metrics": metrics, "score": metrics[first][task.metrics[0]], "unlabelled_words": unlabelled}


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- grid and suite


def finetune(config: FinetuneConfig) -> dict:
    """Run the (lr x batch x seed) grid; the best dev run's results become output/results.json."""
    output = Path(config.output)
    grid = list(itertools.product(config.lr, config.batch_size, config.seed))
    if len(grid) == 1:
        return train_run(config, *grid[0], output)
    runs = [train_run(config, lr, bs, seed, output / "runs" / f"lr{lr:g}-bs{bs}-seed{seed}") for lr, bs, seed in grid]
    best = max(runs, key=lambda r: r["score"])
    summary = {**best, "grid": [{k: r[k] for k in ("lr", "batch_size", "seed", "score")} for r in runs]}
    if is_main_process():
        write_json(output / "results.json", summary)
    return summary


SUITE_ORDER = ("sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "conll2003", "cola")
COLUMN_TITLES = {"sst2": "SST-2 Acc", "mrpc": "MRPC F1", "stsb": "STS-B SpCorr", "qqp": "QQP F1",
                 "mnli": "MNLI-m/mm Acc", "qnli": "QNLI Acc", "rte": "RTE Acc", "glue": "GLUE Score",
                 "conll2003": "CoNLL F1", "cola": "CoLA Mcc"}


def paper_numbers(results: dict[str, dict]) -> dict[str, float]:
    """Task results (name -> results.json) -> the paper's numbers by column: sst2, mrpc, ..., conll2003, cola."""
    numbers = {}
    for name, result in results.items():
        task = TASKS[name]
        for dev_name, metrics in result["metrics"].items():
            numbers[dev_name] = metrics[task.metrics[0]]
    return numbers


def glue_score(numbers: dict[str, float]) -> tuple[float | None, list[str]]:
    """The paper's GLUE score: the mean of the 8 numbers of PAPER_COLUMNS that are present (and which)."""
    present = [c for c in PAPER_COLUMNS if c in numbers]
    return (sum(numbers[c] for c in present) / len(present) if present else None), present


def results_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table in the paper's column order (Table 2), one row per model; '-' = not run."""
    columns = ("sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "glue", "conll2003", "cola")
    lines = ["| Model | " + " | ".join(COLUMN_TITLES[c] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    notes = []
    for name, numbers in rows.items():
        glue, used = glue_score(numbers)
        cells = {**{c: f"{v:.1f}" for c, v in numbers.items()}, "glue": "-" if glue is None else f"{glue:.1f}"}
        cells["mnli"] = "/".join(cells.get(c, "-") for c in ("mnli-m", "mnli-mm"))
        cells["mnli"] = "-" if cells["mnli"] == "-/-" else cells["mnli"]
        lines.append(f"| {name} | " + " | ".join(cells.get(c, "-") for c in columns) + " |")
        missing = [c for c in PAPER_COLUMNS if c not in used]
        notes.append(f"- {name}: GLUE score = mean of {len(used)} of 8 ({', '.join(used) or 'none'})"
                     + (f"; missing: {', '.join(missing)}" if missing else ""))
    return "\n".join(lines + [""] + notes + ["", "CoLA is not part of the paper's GLUE score."]) + "\n"


def suite(config: FinetuneConfig, models: list[str], tasks: list[str] | None) -> str:
    """Finetune every model on every task whose data is present (existing results.json are reused,
    so an interrupted suite resumes), then write results.md and results.json under config.output."""
    output, rows, summary = Path(config.output), {}, {}
    for spec in models:
        name, _, model = spec.rpartition("=")  # "NAME=DIR" names the row; a bare DIR is named after its folder
        name = name or Path(model).name
        results = {}
        for task_name in tasks or SUITE_ORDER:
            task = get_task(task_name)
            try:
                folder = find_task_dir(config.data_dir, task)
            except FileNotFoundError:
                continue
            if not all((folder / f).is_file() for f in (task.train_file, *task.dev_files.values())):
                continue  # e.g. QNLI: dev only
            run_dir = output / name / task.name
            if (run_dir / "results.json").is_file():
                results[task.name] = json.loads((run_dir / "results.json").read_text())
                continue
            run = dataclasses.replace(config, model=model, task=task.name, data_dir=str(folder), output=str(run_dir))
            results[task.name] = finetune(run)
        rows[name] = paper_numbers(results)
        summary[name] = {"numbers": rows[name], "glue_score": glue_score(rows[name])[0]}
    table = results_table(rows)
    if is_main_process():
        (output / "results.md").write_text(table)
        write_json(output / "results.json", summary)
    return table


# ---------------------------------------------------------------- command line


def build_parser(suite_command: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimoe-finetune" + (" suite" if suite_command else ""),
        description=("Finetune one or more models on every task whose data is under --data-dir and write "
                     "results.md in the paper's column order." if suite_command else __doc__.split("\n\n")[0]))
    add_config_arguments(parser, FinetuneConfig, config_file=True, exclude=("model", "task") if suite_command else ())
    if suite_command:
        parser.add_argument("--model", nargs="+", required=True, help="model dirs, one table row each: DIR or NAME=DIR")
        parser.add_argument("--tasks", nargs="+", default=None, help=f"tasks to run (default: all present of {SUITE_ORDER})")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher's, put before `suite`
    suite_command = bool(argv) and argv[0] == "suite"
    args = build_parser(suite_command).parse_args(argv[1:] if suite_command else argv)
    try:
        if suite_command:
            models, tasks = args.model, args.tasks
            del args.model, args.tasks
            for name in tasks or []:
                get_task(name)
            table = suite(config_from_args(FinetuneConfig, args, model="", task=""), models, tasks)
            if is_main_process():
                print(table)
        else:
            get_task(args.task)
            results = finetune(config_from_args(FinetuneConfig, args))
            if is_main_process():
                print(json.dumps({"task": results["task"], "metrics": results["metrics"], "model_dir": results["model_dir"]}, indent=2))
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
