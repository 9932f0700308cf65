"""GLUE and CoNLL-2003 metrics, as the paper reports them (fractions in [0, 1]; tables show x100).

Written with numpy only; tests check them against scikit-learn, scipy and seqeval.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def binary_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of the positive class 1 (MRPC, QQP); 0 when there is no true or predicted positive."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    true_positives = np.sum((predictions == 1) & (labels == 1))
    denominator = np.sum(predictions == 1) + np.sum(labels == 1)
    return float(2 * true_positives / denominator) if denominator else 0.0


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing their mean rank (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # mean of ranks start+1 .. end
    return ranks


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman's rho = Pearson correlation of the (tie-averaged) ranks (STS-B)."""
    return pearson(_average_ranks(np.asarray(predictions)), _average_ranks(np.asarray(labels)))


def matthews(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (CoLA), multiclass form; 0 when undefined (one class predicted)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(predictions, labels)
    confusion = (labels[:, None] == classes)[:, :, None] & (predictions[:, None] == classes)[:, None, :]
    confusion = confusion.sum(axis=0).astype(np.float64)  # (true class, predicted class)
    n, correct = confusion.sum(), np.trace(confusion)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    numerator = correct * n - true_counts @ predicted_counts
    denominator = np.sqrt((n * n - predicted_counts @ predicted_counts) * (n * n - true_counts @ true_counts))
    return float(numerator / denominator) if denominator else 0.0


def _entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) chunks, with conlleval's chunk boundaries (also what seqeval's default mode does).

    A chunk starts at B-X, at I-X after a tag of another type or after O, and ends before the next
    start or O; so a stray I-X opens a chunk instead of being dropped (conlleval.pl startOfChunk)."""
    chunks, start, current = set(), None, None
    for i, tag in enumerate([*tags, "O"]):  # the sentinel O closes the last chunk
        prefix, kind = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        begins = prefix == "B" or (prefix == "I" and kind != current)
        if current is not None and (prefix == "O" or begins):
            chunks.add((current, start, i - 1))
            current = None
        if begins:
            start, current = i, kind
    return chunks


def entity_f1(predictions: Sequence[Sequence[str]], labels: Sequence[Sequence[str]]) -> float:
    """Micro entity-level F1 over sentences of IOB2 tag strings (CoNLL-2003, = conlleval's FB1 / 100)."""
    found = correct = gold = 0
    for predicted_tags, gold_tags in zip(predictions, labels, strict=True):
        predicted, expected = _entities(predicted_tags), _entities(gold_tags)
        found, gold, correct = found + len(predicted), gold + len(expected), correct + len(predicted & expected)
    return 2 * correct / (found + gold) if found + gold else 0.0


METRICS: dict[str, Callable[..., float]] = {
    "acc": accuracy, "f1": binary_f1, "pearson": pearson, "spearman": spearman, "mcc": matthews,
    "entity_f1": entity_f1,
}
