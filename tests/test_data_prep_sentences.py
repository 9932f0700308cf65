"""Sentence splitter on abbreviations, decimals, initials, quotes and paragraph breaks.

Expected splits written by hand (what a careful reader would cut)."""
from __future__ import annotations

import pytest

from data_prep.sentences import split_sentences

CASES = [
    ("Dr. Smith went to Washington. He arrived at 5 p.m. on Monday.",
     ["Dr. Smith went to Washington.", "He arrived at 5 p.m. on Monday."]),
    ("The U.S. Army was founded in 1775. It is the oldest branch.",
     ["The U.S. Army was founded in 1775.", "It is the oldest branch."]),
    ("Some fruits, e.g. apples and pears, grow in cold climates. Others do not.",
     ["Some fruits, e.g. apples and pears, grow in cold climates.", "Others do not."]),
    ("It costs $1.50 per item, i.e. cheap. Buy now!", ["It costs $1.50 per item, i.e. cheap.", "Buy now!"]),
    ("The value rose by 3.5 percent in 2010. Analysts were surprised.",
     ["The value rose by 3.5 percent in 2010.", "Analysts were surprised."]),
    ("J. R. R. Tolkien wrote The Hobbit. It was published in 1937.",
     ["J. R. R. Tolkien wrote The Hobbit.", "It was published in 1937."]),
    ("George W. Bush was president. He served two terms.", ["George W. Bush was president.", "He served two terms."]),
    ("Smith et al. found this. Others agree.", ["Smith et al. found this.", "Others agree."]),
    ("The U.S.S.R. collapsed in 1991. Russia followed.", ["The U.S.S.R. collapsed in 1991.", "Russia followed."]),
    ("Is it true? Yes! It is.", ["Is it true?", "Yes!", "It is."]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    # blingfire alone cuts after the initial: "He met J. Smith." / "T." / "Jones came later."
    ("He met J. Smith. T. Jones came later.", ["He met J. Smith.", "T. Jones came later."]),
    # every line is a paragraph: a heading without a full stop is its own sentence
    ("History\nThe town was founded in 1850. It grew fast.\nGeography",
     ["History", "The town was founded in 1850.", "It grew fast.", "Geography"]),
    ("R. S. P. Beekes has suggested a Pre-Greek origin.\n\nSecond paragraph here.",
     ["R. S. P. Beekes has suggested a Pre-Greek origin.", "Second paragraph here."]),
]


@pytest.mark.parametrize("text,expected", CASES, ids=[c[0][:30] for c in CASES])
def test_tricky_cases(text, expected):
    assert split_sentences(text) == expected


def test_no_empty_sentences_and_nothing_lost():
    text = "  First line.  \n\n\nSecond   line, with  spaces. Third.\n \n"
    sentences = split_sentences(text)
    assert sentences == ["First line.", "Second   line, with  spaces.", "Third."]
    assert "".join(sentences).replace(" ", "") == text.replace(" ", "").replace("\n", "")


def test_empty_document():
    assert split_sentences("\n \n") == []
