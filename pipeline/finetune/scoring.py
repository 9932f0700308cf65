"""Dev-set scoring: predictions of a model, the task's metrics, the majority baseline."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.finetune.data import TaskData, collate
from pipeline.metrics import METRICS
from pipeline.tasks import Task


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
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(features), batch_size):
        batch = collate(features[start:start + batch_size], pad_id)
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
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


def evaluate(model, task: Task, data: TaskData, batch_size: int, pad_id: int, step: int) -> dict:
    """Dev scores at `step`; `score` is the paper's metric on the first dev set (mnli-m for MNLI), the one
    that selects the kept model."""
    metrics, unlabelled = {}, 0
    for name, (examples, features) in data.dev.items():
        predictions, missing = predict(model, task, features, examples, batch_size, pad_id)
        metrics[name], unlabelled = score(task, examples, predictions), unlabelled + missing
    first = next(iter(task.dev_files))
    return {"step": step, "metrics": metrics, "score": metrics[first][task.metrics[0]], "unlabelled_words": unlabelled}
