"""The protocol's filter on teacher completions (protocol.md, "Filter rule").

A completion passes if, after dropping one trailing "." and then one pair of wrapping [] or (),
it is a list of non-negative integers written in ASCII digits, with one separator used
everywhere: the text between the first two numbers, which stripped of whitespace must be "",
"," or ";". A lone number passes only if the text is exactly that number. At most 10 numbers,
each in [0, 999]. Anything else (words, signs, decimals, mixed separators, stray whitespace
around the list, empty output) fails. `reject_reason` names the first rule a completion breaks,
for the dataset's statistics.
"""
from __future__ import annotations

import re
import string

MAX_NUMBERS = 10
MAX_VALUE = 999
SEPARATORS = ("", ",", ";")  # allowed separators once whitespace is stripped

# Reasons, in the order they are checked.
EMPTY = "no numbers"  # empty, or text without a digit
NOT_EXACT = "single number with other text"
BAD_SEPARATOR = "separator is not whitespace, comma or semicolon"
NOT_DIGITS = "an item is not a plain integer (words, signs, decimals, mixed separators)"
EMPTY_ITEM = "empty item between separators"
TOO_MANY = "more than 10 numbers"
TOO_LARGE = "a number above 999"
REASONS = (EMPTY, NOT_EXACT, BAD_SEPARATOR, NOT_DIGITS, EMPTY_ITEM, TOO_MANY, TOO_LARGE)

_NUMBER = re.compile(r"\d+")


def _unwrap(text: str) -> str:
    """Drop one trailing period, then one pair of wrapping brackets or parentheses."""
    if text.endswith("."):
        text = text[:-1]
    if len(text) >= 2 and (text[0], text[-1]) in (("[", "]"), ("(", ")")):
        text = text[1:-1]
    return text


def reject_reason(completion: str) -> str | None:
    """None if `completion` passes the filter, else the first rule it breaks (one of REASONS)."""
    text = _unwrap(completion)
    found = list(_NUMBER.finditer(text))
    if not found:
        return EMPTY
    if len(found) == 1:
        if text != found[0].group():
            return NOT_EXACT
        items = [text]
    else:
        separator = text[found[0].end(): found[1].start()]
        if separator.strip() not in SEPARATORS:
            return BAD_SEPARATOR
        items = text.split(separator)
    if any(item.strip(string.digits) for item in items):
        return NOT_DIGITS
    if not all(items):
        return EMPTY_ITEM
    if len(items) > MAX_NUMBERS:
        return TOO_MANY
    if any(int(item) > MAX_VALUE for item in items):
        return TOO_LARGE
    return None


def passes_filter(completion: str) -> bool:
    """Whether a teacher completion is kept (the protocol's rule, see the module docstring)."""
    return reject_reason(completion) is None

