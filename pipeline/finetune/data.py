"""Task data for finetuning: examples tokenized into features, and features padded into batches."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.tasks import Task, find_task_dir, read_split


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
    """The task's first `max_train` training examples (all when None) and its dev sets, encoded."""
    folder = find_task_dir(data_dir, task)
    train = read_split(task, folder / task.train_file)[:max_train]
    dev = {name: read_split(task, folder / file) for name, file in task.dev_files.items()}
    return TaskData(encode(task, train, tokenizer, max_length),
                    {name: (examples, encode(task, examples, tokenizer, max_length)) for name, examples in dev.items()})
