"""The teacher's numbers prompts: four independently drawn parts, in our own words.

A prompt is `intro instruction format closing` joined by single spaces (protocol.md): the intro
shows 3-8 example numbers uniform in [100, 999] joined by ", "; the instruction asks for at most
10 more numbers of at most 3 digits, combined from an 'at most' phrase, a 'digits' phrase and a
sentence template; the format sentence names one of six output formats; the closing asks for
numbers only. Each part is drawn uniformly from its own list, all from one numpy Generator, so a
seed fixes the whole prompt list (and the first N prompts of a longer list are the N-prompt list).
"""
from __future__ import annotations

import numpy as np

EXAMPLES_MIN, EXAMPLES_MAX = 3, 8  # example numbers per prompt, inclusive
EXAMPLE_LOW, EXAMPLE_HIGH = 100, 999  # each example number, inclusive
ANSWER_COUNT, ANSWER_DIGITS = 10, 3  # the most numbers asked for, and their most digits

INTROS: tuple[str, ...] = (
    "Here is a list of numbers: {examples}.",
    "Look at these numbers: {examples}.",
    "I have the following numbers: {examples}.",
    "Consider this sequence: {examples}.",
    "The sequence begins with {examples}.",
    "Start from these values: {examples}.",
    "We begin with the numbers {examples}.",
    "Take the following sequence: {examples}.",
    "These numbers come first: {examples}.",
    "My list so far reads {examples}.",
    "Given the numbers {examples}:",
    "Below is a short run of numbers: {examples}.",
    "So far the series is {examples}.",
    "Check out this sequence: {examples}.",
    "A friend wrote down these numbers: {examples}.",
    "Here are a few starting values: {examples}.",
    "The first entries of a list are {examples}.",
    "Read this sequence of numbers: {examples}.",
    "Observe the following values: {examples}.",
    "We have a series that opens with {examples}.",
    "I wrote these numbers on a card: {examples}.",
    "Our numbers so far: {examples}.",
    "You are given this list: {examples}.",
    "Starting point: {examples}.",
    "Here's a sequence to work with: {examples}.",
)

AT_MOST: tuple[str, ...] = (
    "at most", "up to", "no more than", "a maximum of", "not more than",
    "as many as", "at the very most", "a max of", "a total of no more than",
)

DIGITS: tuple[str, ...] = (
    "with at most {digits} digits each",
    "each no longer than {digits} digits",
    "of {digits} digits or fewer",
    "each having up to {digits} digits",
    "that are at most {digits} digits long",
    "with no more than {digits} digits apiece",
    "each limited to {digits} digits",
    "({digits} digits max per number)",
    "using {digits} or fewer digits each",
)

INSTRUCTIONS: tuple[str, ...] = (
    "Add {at_most} {count} more numbers {digits} to continue the list.",
    "Continue the sequence with {at_most} {count} new numbers {digits}.",
    "Extend it by {at_most} {count} numbers {digits}.",
    "Write {at_most} {count} further numbers {digits} that follow on.",
    "Generate {at_most} {count} additional numbers {digits}.",
    "Please append {at_most} {count} numbers {digits}.",
    "Give me {at_most} {count} numbers {digits} that come next.",
    "Carry on the series with {at_most} {count} numbers {digits}.",
    "Produce {at_most} {count} next values {digits}.",
    "Supply {at_most} {count} more values {digits} to extend the sequence.",
)

# Output formats: the six of the protocol, 15 sentences in all (drawn uniformly over the 15).
FORMATS: dict[str, tuple[str, ...]] = {
    "comma": (
        "Separate the numbers with commas.",
        "Write them as a comma-separated list.",
        "Use commas between the numbers.",
    ),
    "space": (
        "Separate the numbers with single spaces.",
        "Put a space between consecutive numbers.",
    ),
    "semicolon": (
        "Separate the numbers with semicolons.",
        "Use a semicolon between each pair of numbers.",
    ),
    "line": (
        "Put each number on its own line.",
        "Write one number per line.",
        "List the numbers one below the other, a single number per line.",
    ),
    "brackets": (
        "Format the answer as a list in square brackets, like [a, b, c].",
        "Wrap the numbers in square brackets, separated by commas.",
    ),
    "parentheses": (
        "Format the answer as a tuple in parentheses, like (a, b, c).",
        "Enclose the numbers in parentheses, separated by commas.",
        "Give the numbers inside round brackets, comma-separated.",
    ),
}
FORMAT_SENTENCES: tuple[str, ...] = tuple(s for group in FORMATS.values() for s in group)

CLOSINGS: tuple[str, ...] = (
    "Reply with the numbers only.",
    "Output nothing but the numbers.",
    "Do not explain; just give the numbers.",
    "Only the numbers, please, with no other text.",
    "Answer with numbers alone.",
    "No words, just numbers.",
    "Skip any explanation and write only the numbers.",
    "Your reply must contain only the numbers.",
    "Return the numbers and nothing else.",
    "Give just the numbers, without commentary.",
    "Respond solely with the numbers.",
    "Leave out any explanation; numbers only.",
    "Write the numbers and stop.",
    "Please say nothing except the numbers.",
    "Provide only the numbers in your answer.",
    "Don't add any text beyond the numbers.",
    "Just the numbers, no extra words.",
    "The answer should be the numbers alone.",
    "Print only the numbers.",
)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def numbers_prompt(rng: np.random.Generator) -> str:
    """One prompt; consumes a fixed pattern of draws from `rng` (examples first, then the parts)."""
    count = int(rng.integers(EXAMPLES_MIN, EXAMPLES_MAX + 1))
    examples = ", ".join(str(int(x)) for x in rng.integers(EXAMPLE_LOW, EXAMPLE_HIGH + 1, size=count))
    intro = _pick(rng, INTROS).format(examples=examples)
    instruction = _pick(rng, INSTRUCTIONS).format(
        at_most=_pick(rng, AT_MOST), count=ANSWER_COUNT, digits=_pick(rng, DIGITS).format(digits=ANSWER_DIGITS))
    return " ".join([intro, instruction, _pick(rng, FORMAT_SENTENCES), _pick(rng, CLOSINGS)])


def numbers_prompts(n: int, seed: int) -> list[str]:
    """The first `n` prompts of the list that `seed` determines."""
    rng = np.random.default_rng(seed)
    return [numbers_prompt(rng) for _ in range(n)]
