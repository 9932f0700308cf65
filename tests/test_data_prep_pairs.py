"""Pair builder (BERT create_pretraining_data.py) and the Arrow rows built from its pairs.

Token ids are chosen so that each token names its position (id = 1000 + position in the flat
array), which lets every check map a sample back to the document and sentences it came from."""
from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from data_prep.pairs import Pair, create_pairs, truncate_seq_pair
from data_prep.shards import pairs_to_batch, shard_schema, token_dtype

CLS, SEP, OFFSET = 101, 102, 1000


def make_documents(rng: random.Random, num_documents: int, max_sentences: int, max_sentence_length: int):
    return [[rng.randint(1, max_sentence_length) for _ in range(rng.randint(1, max_sentences))] for _ in range(num_documents)]


def build_rows(documents, seed=0, max_seq_length=32, short_seq_prob=0.1):
    tokens = np.arange(OFFSET, OFFSET + sum(map(sum, documents)), dtype=np.int32)
    pairs = list(create_pairs(documents, random.Random(seed), max_seq_length, short_seq_prob))
    return pairs, pairs_to_batch(tokens, pairs, CLS, SEP).to_pylist()


def sentence_spans(documents):
    """(document index, sentence start, sentence end) for every sentence in the flat array."""
    spans, position = [], 0
    for d, lengths in enumerate(documents):
        for n in lengths:
            spans.append((d, position, position + n))
            position += n
    return spans


@pytest.mark.parametrize("seed", range(5))
def test_rows_are_cls_a_sep_b_sep_with_segment_ids(seed):
    documents = make_documents(random.Random(seed), 30, 12, 20)
    pairs, rows = build_rows(documents, seed, max_seq_length=32)
    assert len(rows) == len(pairs) > 50
    for pair, row in zip(pairs, rows):
        ids, types = row["input_ids"], row["token_type_ids"]
        assert len(ids) <= 32 and len(types) == len(ids)
        assert ids[0] == CLS and ids[-1] == SEP and ids.count(SEP) == 2 and ids.count(CLS) == 1
        first_sep = ids.index(SEP)
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        a, b = ids[1:first_sep], ids[first_sep + 1:-1]
        assert a and b
        assert a == list(range(OFFSET + pair.a_start, OFFSET + pair.a_end))
        assert b == list(range(OFFSET + pair.b_start, OFFSET + pair.b_end))
        assert row["is_random_next"] == pair.is_random_next


def test_a_and_actual_next_b_are_consecutive_sentences_of_one_document_and_random_b_is_another():
    documents = make_documents(random.Random(1), 40, 10, 8)
    spans = sentence_spans(documents)
    doc_of = {p: d for d, s, e in spans for p in range(s, e)}
    pairs, _ = build_rows(documents, 1, max_seq_length=512)  # no truncation at this length
    for p in pairs:
        assert doc_of[p.a_start] == doc_of[p.a_end - 1]
        assert doc_of[p.b_start] == doc_of[p.b_end - 1]
        assert {p.a_start, p.a_end} <= {s for _, s, _ in spans} | {e for _, _, e in spans}  # whole sentences
        if p.is_random_next:
            assert doc_of[p.b_start] != doc_of[p.a_start]
        else:
            assert p.b_start == p.a_end


def test_every_sentence_is_used_once_as_a_or_actual_next_b():
    """Unused sentences of a chunk whose B was drawn at random are put back (BERT's `i -= num_unused_segments`)."""
    documents = make_documents(random.Random(2), 50, 15, 10)
    pairs, _ = build_rows(documents, 2, max_seq_length=512, short_seq_prob=0.5)
    used = np.zeros(sum(map(sum, documents)), dtype=int)
    for p in pairs:
        used[p.a_start:p.a_end] += 1
        if not p.is_random_next:
            used[p.b_start:p.b_end] += 1
    assert (used == 1).all()


def test_half_of_multi_sentence_chunks_get_a_random_next_b():
    documents = make_documents(random.Random(3), 600, 30, 6)  # many short sentences: chunks of several
    pairs, _ = build_rows(documents, 3, max_seq_length=64, short_seq_prob=0.0)
    share = sum(p.is_random_next for p in pairs) / len(pairs)
    assert len(pairs) > 1000 and 0.45 < share < 0.56


def test_short_seq_prob_gives_shorter_targets():
    documents = make_documents(random.Random(4), 300, 40, 6)
    full = [p.a_end - p.a_start + p.b_end - p.b_start for p in build_rows(documents, 4, 128, 0.0)[0]]
    short = [p.a_end - p.a_start + p.b_end - p.b_start for p in build_rows(documents, 4, 128, 1.0)[0]]
    assert np.mean(short) < 0.75 * np.mean(full)


def test_a_single_document_gives_only_actual_next_pairs():
    pairs, _ = build_rows([[5, 5, 5, 5, 5, 5]], 0, max_seq_length=16, short_seq_prob=0.0)
    assert pairs and not any(p.is_random_next for p in pairs)
    assert build_rows([[5]], 0)[0] == []  # one sentence, no other document: no pair


def bert_truncate_lengths(length_a: int, length_b: int, max_num_tokens: int) -> tuple[int, int]:
    """The reference loop of BERT's truncate_seq_pair, on lengths."""
    while length_a + length_b > max_num_tokens:
        if length_a > length_b:
            length_a -= 1
        else:
            length_b -= 1
    return length_a, length_b


@pytest.mark.parametrize("length_a,length_b,max_num_tokens", [
    (10, 3, 8), (3, 10, 8), (10, 10, 8), (10, 10, 7), (100, 1, 5), (1, 100, 5), (50, 49, 9), (49, 50, 9), (4, 4, 8), (7, 2, 9),
])
def test_truncate_seq_pair_matches_bert_lengths_and_keeps_contiguous_spans(length_a, length_b, max_num_tokens):
    pair = Pair(0, length_a, 1000, 1000 + length_b, False)
    fronts = set()
    for seed in range(40):
        out = truncate_seq_pair(pair, max_num_tokens, random.Random(seed))
        assert (out.a_end - out.a_start, out.b_end - out.b_start) == bert_truncate_lengths(length_a, length_b, max_num_tokens)
        assert 0 <= out.a_start <= out.a_end <= length_a and 1000 <= out.b_start <= out.b_end <= 1000 + length_b
        fronts.add(out.a_start + out.b_start)
    assert len(fronts) > 1 or length_a + length_b <= max_num_tokens  # cuts both at the front and at the back


def test_input_ids_dtype_follows_the_vocabulary():
    assert shard_schema(token_dtype(30522)).field("input_ids").type == pa.list_(pa.uint16())
    assert shard_schema(token_dtype(65536)).field("input_ids").type == pa.list_(pa.uint16())
    assert shard_schema(token_dtype(65537)).field("input_ids").type == pa.list_(pa.int32())
    assert shard_schema(token_dtype(30522)).field("token_type_ids").type == pa.list_(pa.uint8())
