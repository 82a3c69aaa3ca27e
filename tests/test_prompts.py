"""The numbers prompts: the protocol's four-part structure, ranges, determinism and diversity."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

from src import numbers_prompts
from src.constants import TEACHER
from src.prompts import (AT_MOST, CLOSINGS, DIGITS, FORMAT_SENTENCES, FORMATS, INSTRUCTIONS, INTROS)

N = 3000


def _instructions() -> dict[str, tuple[str, str, str]]:
    """Every instruction sentence the lists can make -> (template, at-most phrase, digits phrase)."""
    made = {t.format(at_most=a, count=10, digits=d.format(digits=3)): (t, a, d)
            for t in INSTRUCTIONS for a in AT_MOST for d in DIGITS}
    assert len(made) == len(INSTRUCTIONS) * len(AT_MOST) * len(DIGITS)  # no two combinations read the same
    return made


def _parts(prompt: str, instructions: dict) -> tuple:
    """Split a prompt back into (intro, examples, instruction, at-most, digits, format, closing) by
    matching every combination of the lists: exactly one must reproduce the prompt."""
    matches = []
    for intro in INTROS:
        head, _, tail = intro.partition("{examples}")
        found = re.match(re.escape(head) + r"(\d+(?:, \d+)*)" + re.escape(tail) + " ", prompt)
        if not found:
            continue
        rest = prompt[found.end():]
        for fmt in FORMAT_SENTENCES:
            for closing in CLOSINGS:
                ending = f" {fmt} {closing}"
                if rest.endswith(ending) and rest[: -len(ending)] in instructions:
                    examples = [int(x) for x in found.group(1).split(", ")]
                    matches.append((intro, examples, *instructions[rest[: -len(ending)]], fmt, closing))
    assert len(matches) == 1, (prompt, len(matches))
    return matches[0]


def test_list_sizes_follow_the_original():
    assert (len(INTROS), len(AT_MOST), len(DIGITS), len(INSTRUCTIONS), len(FORMAT_SENTENCES), len(CLOSINGS)) == (
        25, 9, 9, 10, 15, 19)
    assert set(FORMATS) == {"comma", "space", "semicolon", "line", "brackets", "parentheses"}
    for options in (INTROS, AT_MOST, DIGITS, INSTRUCTIONS, FORMAT_SENTENCES, CLOSINGS):
        assert len(set(options)) == len(options)
    assert all(i.count("{examples}") == 1 for i in INTROS)
    assert all(t.count("{at_most}") == t.count("{count}") == t.count("{digits}") == 1 for t in INSTRUCTIONS)
    assert all("{digits}" in d for d in DIGITS)


def test_every_prompt_has_the_four_parts_and_examples_in_range():
    prompts = numbers_prompts(N, seed=7)
    counts: dict[str, Counter] = {name: Counter() for name in ("intro", "n", "template", "at_most", "digits", "format",
                                                                "closing")}
    values, instructions = [], _instructions()
    for prompt in prompts:
        intro, examples, template, at_most, digits, fmt, closing = _parts(prompt, instructions)
        assert 3 <= len(examples) <= 8
        assert all(100 <= x <= 999 for x in examples)
        assert "  " not in prompt and prompt == prompt.strip()
        for name, value in zip(counts, (intro, len(examples), template, at_most, digits, fmt, closing)):
            counts[name][value] += 1
        values += examples
    # Each part is drawn uniformly from its list: every option appears, none far from N / options.
    for name, options in (("intro", INTROS), ("n", range(3, 9)), ("template", INSTRUCTIONS), ("at_most", AT_MOST),
                          ("digits", DIGITS), ("format", FORMAT_SENTENCES), ("closing", CLOSINGS)):
        assert set(counts[name]) == set(options), name
        expected = N / len(options)
        assert all(abs(c - expected) < 5 * expected**0.5 for c in counts[name].values()), (name, counts[name])
    assert min(values) < 110 and max(values) > 990  # the whole range [100, 999] is used
    hist = np.histogram(values, bins=9, range=(100, 1000))[0]
    assert hist.min() > 0.8 * hist.mean()


def test_deterministic_from_seed_and_prefix_stable():
    a = numbers_prompts(200, seed=TEACHER.prompt_seed)
    assert a == numbers_prompts(200, seed=TEACHER.prompt_seed)
    assert a[:50] == numbers_prompts(50, seed=TEACHER.prompt_seed)
    b = numbers_prompts(200, seed=TEACHER.prompt_seed + 1)
    assert sum(x == y for x, y in zip(a, b)) == 0


def test_diverse():
    prompts = numbers_prompts(N, seed=0)
    assert len(set(prompts)) == N
    assert len({p.split(":")[0] for p in prompts}) > 15

