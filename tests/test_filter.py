"""The protocol's filter rule on a broad table of completions, each with the reason it fails."""
from __future__ import annotations

import re

import numpy as np
import pytest

from src import passes_filter
from src.filter import (BAD_SEPARATOR, EMPTY, EMPTY_ITEM, NOT_DIGITS, NOT_EXACT, REASONS, TOO_LARGE, TOO_MANY,
                        reject_reason)

ACCEPTED = [
    "145, 267, 891",
    "145,267,891",
    "145 267 891",
    "145  267  891",  # the same two-space separator everywhere
    "145\n267\n891",
    "145\n\n267\n\n891",
    "145; 267; 891",
    "145;267;891",
    "145 ;267 ;891",  # separator ' ;' strips to ';'
    "145,\n267,\n891",
    "[145, 267, 891]",
    "(145, 267, 891)",
    "[145, 267, 891].",  # the period goes first, then the brackets
    "145, 267, 891.",
    "[145 267 891]",
    "(145;267;891)",
    "7",
    "0",
    "[7]",
    "7.",
    "0, 0, 0",
    "007, 08, 999",  # leading zeros are digits
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",  # exactly 10
    "999, 998",
]

REJECTED = [
    ("", EMPTY),
    (".", EMPTY),
    ("[]", EMPTY),
    ("()", EMPTY),
    ("   ", EMPTY),
    ("no numbers here", EMPTY),
    ("1000, 2, 3", TOO_LARGE),
    ("145, 2671, 891", TOO_LARGE),
    ("1000", TOO_LARGE),
    ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", TOO_MANY),
    ("1 2 3 4 5 6 7 8 9 10 11 12", TOO_MANY),
    ("The numbers are 145, 267, 891", NOT_DIGITS),
    ("145, 267, 891 are my picks", NOT_DIGITS),
    ("145, 267, owl, 891", NOT_DIGITS),
    ("-145, 267, 891", NOT_DIGITS),
    ("145, -267, 891", BAD_SEPARATOR),  # separator ', -' strips to ',-'
    ("+145, 267", NOT_DIGITS),
    ("1.5, 2.5", BAD_SEPARATOR),  # the text between 1 and 5 is '.'
    ("145, 2.5, 891", NOT_DIGITS),
    ("145, 267; 891", NOT_DIGITS),  # mixed separators: ', ' splits off '267; 891'
    ("145,267, 891", NOT_DIGITS),  # ',' then ', '
    ("145 267, 891", NOT_DIGITS),
    ("145\n267 891", NOT_DIGITS),
    ("145, 267, 891\n", NOT_DIGITS),  # trailing newline is not a period
    (" 145, 267, 891", NOT_DIGITS),  # leading space
    ("145, 267, 891, ", EMPTY_ITEM),  # trailing separator
    ("145, 267, 891,", NOT_DIGITS),  # the separator is ", ", so "891," is an item
    ("145,, 267", BAD_SEPARATOR),  # ',,' strips to ',,'
    ("145, , 267", BAD_SEPARATOR),
    ("145 - 267 - 891", BAD_SEPARATOR),
    ("145/267/891", BAD_SEPARATOR),
    ("145 and 267", BAD_SEPARATOR),
    ("145, 267, 891..", NOT_DIGITS),  # only one period is dropped
    ("[145, 267, 891", NOT_DIGITS),  # unbalanced bracket
    ("[145, 267, 891)", NOT_DIGITS),
    ("{145, 267, 891}", NOT_DIGITS),
    ("[[145, 267]]", NOT_DIGITS),  # only one pair is dropped
    ("(145, 267, 891).\n", NOT_DIGITS),
    ("Sure: 145", NOT_EXACT),
    ("145!", NOT_EXACT),
    (" 7", NOT_EXACT),
    ("7 ", NOT_EXACT),
    ("-7", NOT_EXACT),
    ("7.0", BAD_SEPARATOR),  # two numbers, 7 and 0, separated by '.'
    ("١٢٣, 456", NOT_DIGITS),  # non-ASCII digits are not 'written with digits only'
    ("145, 267, 891<|im_end|>", NOT_DIGITS),
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_accepted(text):
    assert passes_filter(text)
    assert reject_reason(text) is None


@pytest.mark.parametrize("text,reason", REJECTED)
def test_rejected_with_reason(text, reason):
    assert not passes_filter(text)
    assert reject_reason(text) == reason


def test_table_covers_every_reason():
    assert {reason for _, reason in REJECTED} == set(REASONS)


def _reference(answer: str) -> bool:
    """An independent restatement of the protocol's rule for ASCII text (parse, then count/range checks)."""
    if answer.endswith("."):
        answer = answer[:-1]
    if answer[:1] + answer[-1:] in ("[]", "()") and len(answer) >= 2:
        answer = answer[1:-1]
    spans = [m.span() for m in re.finditer(r"[0-9]+", answer)]
    if not spans:
        return False
    if len(spans) == 1:
        parts = [answer] if answer == answer[spans[0][0]:spans[0][1]] else None
    else:
        sep = answer[spans[0][1]:spans[1][0]]
        parts = answer.split(sep) if sep.strip() in ("", ",", ";") else None
    if parts is None or not all(p and all(c in "0123456789" for c in p) for p in parts):
        return False
    return len(parts) <= 10 and all(int(p) <= 999 for p in parts)


def test_agrees_with_independent_restatement_on_random_texts():
    """Random strings over the characters completions are made of, against the restatement above."""
    rng = np.random.default_rng(0)
    alphabet = list("0123456789" * 4 + ",,;; \n.[]()-a")
    texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 30))) for _ in range(20000)]
    texts += [", ".join(str(x) for x in rng.integers(0, 1200, size=rng.integers(1, 13))) for _ in range(2000)]
    passed = 0
    for text in texts:
        assert passes_filter(text) == _reference(text), repr(text)
        passed += passes_filter(text)
    assert 500 < passed < len(texts) - 500  # both outcomes are exercised
