"""Sentence-pair samples [CLS] A [SEP] B [SEP], as in BERT's create_pretraining_data.py.

Each document is cut into chunks of sentences of about a target length (the maximum, or with
probability short_seq_prob a shorter one); A is the first 1..n-1 sentences of a chunk, B the rest
or, for half of the pairs (always for a one-sentence chunk), sentences of another document
(`is_random_next`), in which case the chunk's unused sentences are put back for the next pair.

Pairs are computed on sentence lengths only and returned as spans of one flat token array that
holds the sentences of all documents one after another: no token is copied in Python.
"""
from __future__ import annotations

import random
from itertools import accumulate
from typing import Iterator, NamedTuple


class Pair(NamedTuple):
    """A = tokens[a_start:a_end], B = tokens[b_start:b_end] of the flat token array."""

    a_start: int
    a_end: int
    b_start: int
    b_end: int
    is_random_next: bool


def create_pairs(documents: list[list[int]], rng: random.Random, max_seq_length: int,
                 short_seq_prob: float) -> Iterator[Pair]:
    """Pairs from every document in order; `documents` gives each document's sentence lengths
    (all > 0, no document empty), in the order their tokens lie in the flat array.

    A pair fits max_seq_length with [CLS] and two [SEP]; A and B are never empty."""
    starts = []  # per document, per sentence: its start in the flat array (and the document's end)
    position = 0
    for lengths in documents:
        starts.append(list(accumulate(lengths, initial=position)))
        position = starts[-1][-1]
    for index in range(len(documents)):
        yield from _document_pairs(starts, index, rng, max_seq_length - 3, short_seq_prob)


def _document_pairs(starts: list[list[int]], index: int, rng: random.Random, max_num_tokens: int,
                    short_seq_prob: float) -> Iterator[Pair]:
    bounds = starts[index]  # sentence i = tokens[bounds[i]:bounds[i + 1]]
    num_sentences = len(bounds) - 1
    target_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_length = rng.randint(2, max_num_tokens)
    first = 0  # the current chunk is sentences first..i
    i = 0
    while i < num_sentences:
        if i == num_sentences - 1 or bounds[i + 1] - bounds[first] >= target_length:
            chunk_size = i + 1 - first
            a_end = first + (rng.randint(1, chunk_size - 1) if chunk_size >= 2 else 1)
            a_length = bounds[a_end] - bounds[first]
            # A chunk of documents with only one document has no other document to draw from: its
            # one-sentence chunks give no pair (BERT would draw B from the same document and call it random).
            if len(starts) > 1 and (chunk_size == 1 or rng.random() < 0.5):
                other = rng.randrange(len(starts) - 1)
                random_bounds = starts[other + (other >= index)]
                b = rng.randrange(len(random_bounds) - 1)
                b_end = b + 1
                while b_end < len(random_bounds) - 1 and random_bounds[b_end] - random_bounds[b] < target_length - a_length:
                    b_end += 1
                pair = (bounds[first], bounds[a_end], random_bounds[b], random_bounds[b_end], True)
                i = a_end - 1  # the unused sentences start the next chunk
            elif chunk_size >= 2:
                pair = (bounds[first], bounds[a_end], bounds[a_end], bounds[i + 1], False)
            else:
                pair = None
            if pair is not None:
                yield truncate_seq_pair(Pair(*pair), max_num_tokens, rng)
            first = i + 1
        i += 1


def truncate_seq_pair(pair: Pair, max_num_tokens: int, rng: random.Random) -> Pair:
    """BERT's truncate_seq_pair without its token-by-token loop.

    BERT removes one token at a time from the longer side (B on a tie), from the front or the back
    with probability 1/2 each. The number removed from each side follows from the lengths; the
    number of those taken from the front is Binomial(removed, 1/2), drawn as the count of one bits
    in `removed` random bits."""
    length_a, length_b = pair.a_end - pair.a_start, pair.b_end - pair.b_start
    excess = length_a + length_b - max_num_tokens
    if excess <= 0:
        return pair
    gap = length_a - length_b
    from_a = min(excess, max(gap, 0))  # the longer side is cut down to the other's length first,
    from_b = min(excess, max(-gap, 0))
    rest = excess - from_a - from_b  # then they alternate, B first (ties go to B)
    from_a += rest // 2
    from_b += rest - rest // 2
    a_front, b_front = _front_count(from_a, rng), _front_count(from_b, rng)
    return Pair(pair.a_start + a_front, pair.a_end - (from_a - a_front),
                pair.b_start + b_front, pair.b_end - (from_b - b_front), pair.is_random_next)


def _front_count(removed: int, rng: random.Random) -> int:
    return bin(rng.getrandbits(removed)).count("1")
