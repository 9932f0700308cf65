"""Metrics against hand-computed cases and against scikit-learn, scipy and seqeval."""
import numpy as np
import pytest
import scipy.stats
import seqeval.metrics
import sklearn.metrics

from pipeline.metrics import _average_ranks, _entities, accuracy, binary_f1, entity_f1, matthews, pearson, spearman


def test_hand_computed_cases():
    predictions, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert accuracy(predictions, labels) == pytest.approx(3 / 5)
    assert binary_f1(predictions, labels) == pytest.approx(2 * 2 / (3 + 3))  # tp=2, 3 predicted, 3 gold
    # tp=2 tn=1 fp=1 fn=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert matthews(predictions, labels) == pytest.approx(1 / 6)
    assert matthews([1, 1, 1], [0, 1, 1]) == 0.0  # undefined: one class predicted
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert list(_average_ranks(np.array([10, 20, 10, 30]))) == [1.5, 3.0, 1.5, 4.0]


def test_against_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels, predictions = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
        assert accuracy(predictions, labels) == pytest.approx(sklearn.metrics.accuracy_score(labels, predictions))
        assert binary_f1(predictions, labels) == pytest.approx(sklearn.metrics.f1_score(labels, predictions))
        assert matthews(predictions, labels) == pytest.approx(sklearn.metrics.matthews_corrcoef(labels, predictions))
        three_labels, three_predictions = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
        assert matthews(three_predictions, three_labels) == pytest.approx(
            sklearn.metrics.matthews_corrcoef(three_labels, three_predictions))
        scores = rng.integers(0, 6, 40) + 0.0  # many ties, as STS-B's 0..5 scores
        guesses = scores + rng.normal(0, 1.5, 40)
        assert pearson(guesses, scores) == pytest.approx(scipy.stats.pearsonr(guesses, scores)[0])
        assert spearman(guesses, scores) == pytest.approx(scipy.stats.spearmanr(guesses, scores)[0])
        assert spearman(np.round(guesses), scores) == pytest.approx(scipy.stats.spearmanr(np.round(guesses), scores)[0])


def test_entities_follow_conlleval_boundaries():
    # B-PER I-PER | I-ORG opens a chunk after O | B-LOC B-LOC are two | I-MISC after B-LOC opens a new chunk
    tags = ["B-PER", "I-PER", "O", "I-ORG", "I-ORG", "B-LOC", "B-LOC", "I-MISC"]
    assert _entities(tags) == {("PER", 0, 1), ("ORG", 3, 4), ("LOC", 5, 5), ("LOC", 6, 6), ("MISC", 7, 7)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]  # PER truncated: 2 of 3 predicted are right
    assert entity_f1(predicted, gold) == pytest.approx(2 * 2 / (3 + 3))


def test_entity_f1_equals_seqeval_on_random_tag_sequences():
    rng = np.random.default_rng(1)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    for _ in range(30):
        lengths = rng.integers(1, 12, 15)
        gold = [[str(t) for t in rng.choice(tags, n)] for n in lengths]
        predicted = [[t if rng.random() < 0.7 else str(rng.choice(tags)) for t in sentence] for sentence in gold]
        assert entity_f1(predicted, gold) == pytest.approx(seqeval.metrics.f1_score(gold, predicted))
