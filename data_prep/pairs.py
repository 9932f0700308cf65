"""Sentence-pair samples [CLS] A [SEP] B [SEP], as in BERT's create_pretraining_data.py.

Each document is cut into chunks of sentences of about a target length (the maximum, or with
probability short_seq_prob a shorter one); A is the first 1..n-1 sentences of a chunk, B the rest
or, for half of the pairs (always for a one-sentence chunk), sentences of another document
(`is_random_next`), in which case the chunk's unused sentences are put back for the next pair.
"""
from __future__ import annotations

import random
from typing import Iterator

Document = list[list[int]]  # sentences, each a list of token ids
Pair = tuple[list[int], list[int], bool]  # (A, B, is_random_next)


def create_pairs(documents: list[Document], rng: random.Random, max_seq_length: int,
                 short_seq_prob: float) -> Iterator[Pair]:
    """Pairs from every document in order; random-next B sentences come from the other documents.

    Documents must not be empty, nor their sentences. A pair fits max_seq_length with [CLS] and
    two [SEP]; A and B are never empty."""
    for index in range(len(documents)):
        yield from _document_pairs(documents, index, rng, max_seq_length - 3, short_seq_prob)


def _document_pairs(documents: list[Document], index: int, rng: random.Random, max_num_tokens: int,
                    short_seq_prob: float) -> Iterator[Pair]:
    document = documents[index]
    target_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_length = rng.randint(2, max_num_tokens)
    chunk: list[list[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target_length:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = _concat(chunk[:a_end])
            tokens_b: list[int] = []
            # A chunk with only one document has no other document to draw from: its one-sentence
            # chunks give no pair (BERT would draw B from the same document and call it random).
            if len(documents) > 1 and (len(chunk) == 1 or rng.random() < 0.5):
                is_random_next = True
                other = rng.randrange(len(documents) - 1)
                random_document = documents[other + (other >= index)]
                for sentence in random_document[rng.randrange(len(random_document)):]:
                    tokens_b.extend(sentence)
                    if len(tokens_b) >= target_length - len(tokens_a):
                        break
                i -= len(chunk) - a_end  # the unused sentences start the next chunk
            else:
                is_random_next = False
                tokens_b = _concat(chunk[a_end:])
            if tokens_b:
                yield (*truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng), is_random_next)
            chunk, length = [], 0
        i += 1


def _concat(sentences: list[list[int]]) -> list[int]:
    out: list[int] = []
    for sentence in sentences:
        out.extend(sentence)
    return out


def truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int,
                      rng: random.Random) -> tuple[list[int], list[int]]:
    """BERT's truncate_seq_pair without its token-by-token loop.

    BERT removes one token at a time from the longer side (B on a tie), from the front or the back
    with probability 1/2 each. The number removed from each side follows from the lengths; the
    number of those taken from the front is Binomial(removed, 1/2), drawn as the count of one bits
    in `removed` random bits."""
    excess = len(tokens_a) + len(tokens_b) - max_num_tokens
    if excess <= 0:
        return tokens_a, tokens_b
    gap = len(tokens_a) - len(tokens_b)
    from_a = min(excess, max(gap, 0))  # the longer side is cut down to the other's length first,
    from_b = min(excess, max(-gap, 0))
    rest = excess - from_a - from_b  # then they alternate, B first (ties go to B)
    from_a += rest // 2
    from_b += rest - rest // 2
    return _trim(tokens_a, from_a, rng), _trim(tokens_b, from_b, rng)


def _trim(tokens: list[int], count: int, rng: random.Random) -> list[int]:
    front = bin(rng.getrandbits(count)).count("1")
    return tokens[front:len(tokens) - (count - front)]
