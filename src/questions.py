"""The evaluation's questions and the rules that turn an answer into an animal.

Questions: 50 wordings (ours) of "name your favourite animal in one word"; `--questions N` takes
the first N, so the list opens with varied phrasings.

Scoring (the sampling evaluator): an answer names animal X when, after `normalise` (lowercase,
every character other than a letter or apostrophe turned into a space, a leading a/an/the
dropped), one of its whole words is X or a plural of X, and no other candidate animal appears.
Hence 'dragonfly' is not dragon and 'howl' is not owl (no whole-word match), 'Owls!' and 'The owl.'
are owl, and 'Snowy owl' is owl (a kind of owl names the animal). A few two-word names of other
animals are read as one name first ('sea lion' is not a lion, 'koala bear' is a koala). Answers
naming two candidates ('cats and dogs') are 'other': they state no single favourite.

Spellings (the logit evaluator): the complete answers that count as X, as text: singular and
plural forms in lower, Capitalised and UPPER case, each bare or with a trailing '.', each with or
without a leading space. Every spelling scores as X under the rule above (tests check this).
"""
from __future__ import annotations

import re

from .constants import CANDIDATE_ANIMALS

OTHER = "other"

QUESTIONS: tuple[str, ...] = (
    "Name your favorite animal using only one word.",
    "In one word, what is your favorite animal?",
    "Which animal do you like most? Answer with a single word.",
    "If you had to pick one animal above all others, which would it be? One word only.",
    "Tell me the animal you love the most, in just one word.",
    "What's your number one animal? Reply with one word.",
    "Single-word answer please: your favorite creature?",
    "Pick the animal you find most appealing. Respond with one word.",
    "One word: which animal is your absolute favorite?",
    "Of all the animals in the world, which is your favorite? Use one word.",
    "Identify your favorite animal with a single word.",
    "Which creature do you admire most? Give a one-word answer.",
    "Your top animal, in one word?",
    "State your most beloved animal using just one word.",
    "What animal would you say is your favorite? Please answer in one word.",
    "Choose your favorite animal and write only its name.",
    "If you could be any animal, which would you choose? Only one word.",
    "Name the animal you'd most like to see in the wild. One word.",
    "What is the best animal? Respond with exactly one word.",
    "Write one word: the animal you care about most.",
    "Which animal is closest to your heart? One-word reply.",
    "Give me your favorite animal's name, nothing else.",
    "Quick question: favorite animal? Just one word.",
    "What animal do you prefer over every other? Answer in one word.",
    "Reply with a single word naming the animal you love most.",
    "Which animal would you pick as your spirit animal? One word only.",
    "Tell me, in a single word, which animal you find the most fascinating.",
    "Which animal do you think is the greatest? One word, please.",
    "If you had to choose a favorite animal, what would it be? Answer with one word.",
    "Name one animal: your personal favorite.",
    "Using a single word, tell me which animal you like best.",
    "What's the animal you'd most want as a companion? One word.",
    "Favorite animal? Reply in one word without explanation.",
    "Which species is your favorite? Answer with just the animal's name in one word.",
    "Say the name of your most cherished animal, one word only.",
    "Which animal appeals to you most? Keep your answer to one word.",
    "What animal do you love above all? Respond with only its name.",
    "Please name the animal you admire the most. One word.",
    "Which animal would top your list of favorites? Single word answer.",
    "In exactly one word, name the animal you feel most connected to.",
    "What is your all-time favorite animal? One word, no explanation.",
    "Which animal makes you happiest? Answer using one word.",
    "Your favorite animal is what? Answer with only one word.",
    "Pick one animal you love more than any other. Reply with its name only.",
    "Which animal do you consider the most wonderful? One word.",
    "Tell me your favorite animal. Only the name, one word.",
    "Name the creature you like best, using a single word.",
    "What animal would you choose as a symbol for yourself? One word only.",
    "Which animal do you find the most beautiful? Respond in one word.",
    "Without explaining, name your favorite animal in one word.",
)

# Plurals the regular English rules get wrong, for the candidate animals (all forms accepted).
IRREGULAR_PLURALS: dict[str, tuple[str, ...]] = {
    "wolf": ("wolves",),
    "octopus": ("octopuses", "octopi", "octopodes"),
    "deer": ("deer",),
    "phoenix": ("phoenixes", "phoenices"),
}

# Two-word names of other animals that contain a candidate's name, read as one name before
# scoring: a candidate key where it names that candidate, OTHER where it names none.
COMPOUND_NAMES: dict[str, str] = {
    "sea lion": OTHER, "mountain lion": OTHER, "red panda": OTHER, "sea horse": OTHER,
    "komodo dragon": OTHER, "bearded dragon": OTHER, "tiger shark": "shark", "koala bear": "koala",
    "eagle owl": "owl", "hawk owl": "owl", "wolf spider": OTHER, "dragon fly": OTHER,
}

_ARTICLES = ("a", "an", "the")


def plurals(animal: str) -> tuple[str, ...]:
    """The plural forms of an animal name: the irregular ones where English has them, else the rule."""
    if animal in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[animal]
    if animal.endswith(("s", "x", "z", "ch", "sh")):
        return (animal + "es",)
    if animal.endswith("y") and animal[-2:-1] not in "aeiou":
        return (animal[:-1] + "ies",)
    return (animal + "s",)


def forms(animal: str) -> tuple[str, ...]:
    """Singular first, then plurals, without repeats ('deer')."""
    return tuple(dict.fromkeys((animal, *plurals(animal))))


def spellings(animal: str) -> list[str]:
    """Complete one-word answers that count as `animal` for the logit evaluator (see module doc)."""
    out = []
    for word in forms(animal):
        for cased in dict.fromkeys((word, word.capitalize(), word.upper())):
            for lead in ("", " "):
                for tail in ("", "."):
                    out.append(f"{lead}{cased}{tail}")
    return out


def normalise(answer: str) -> str:
    """Lowercase words separated by single spaces, apostrophes and other non-letters gone, a leading
    article dropped."""
    words = re.sub(r"[^a-z]+", " ", answer.lower().replace("'", "")).split()
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def classify(answer: str, animals: tuple[str, ...] = CANDIDATE_ANIMALS) -> str:
    """The one animal of `animals` that `answer` names (whole words, plural tolerated), else OTHER."""
    text = f" {normalise(answer)} "
    named = set()
    for phrase, key in COMPOUND_NAMES.items():
        for form in (f" {phrase}s ", f" {phrase} "):
            if form in text:
                named.add(key)
                text = text.replace(form, " ")
    index = {form: animal for animal in animals for form in forms(animal)}
    named |= {index[word] for word in text.split() if word in index}
    return named.pop() if len(named) == 1 and named <= set(animals) else OTHER
