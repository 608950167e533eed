"""The embedded multiple-choice set, built offline so the demo and the tests need no hub.

Knowledge items come from gensim's `questions-words.txt` (Mikolov et al.'s word-analogy test set,
shipped in gensim's test data): its labelled word pairs give questions with a known answer -
the capital or currency of a country, the US state of a city, a word's opposite, comparative,
plural or gender counterpart, a country's nationality adjective. Distractors are other answers of
the same category, never another valid answer for the same question. Reasoning items are simple
arithmetic written by a seeded generator (answers computed, distractors off by small amounts).
The set is fixed by its seed: 20 items from each of 8 categories plus 40 arithmetic items (200).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

LETTERS = "ABCD"


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question in the ARC shape: labelled options and the gold label."""

    item_id: str
    question: str
    labels: list[str]
    options: list[str]
    answer: str
    category: str = ""


# category -> (question template over the first word, which word is the answer)
_TEMPLATES = {
    "capital-world": ("What is the capital city of {}?", "first"),
    "currency": ("What is the currency of {}?", "second"),
    "city-in-state": ("In which US state is the city of {}?", "second"),
    "family": ("What is the female counterpart of the word '{}'?", "second"),
    "gram2-opposite": ("Which word means the opposite of '{}'?", "second"),
    "gram3-comparative": ("What is the comparative form of the adjective '{}'?", "second"),
    "gram6-nationality-adjective": ("What is the adjective for people or things from {}?", "second"),
    "gram8-plural": ("What is the plural of the noun '{}'?", "second"),
}
PER_CATEGORY = 20
ARITHMETIC = 40
SEED = 20240110


def _pairs() -> dict[str, list[tuple[str, str]]]:
    """(question word, answer) pairs per category, in file order, duplicates dropped."""
    from forgetscale.data.embedded import gensim_file

    pairs: dict[str, dict[tuple[str, str], None]] = defaultdict(dict)
    category = None
    for line in gensim_file("questions-words.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            category = line[1:].strip()
            continue
        words = line.split()
        if category not in _TEMPLATES or len(words) != 4:
            continue
        for first, second in ((words[0], words[1]), (words[2], words[3])):
            if _TEMPLATES[category][1] == "first":  # capital-world lines read "Capital Country"
                pairs[category][(second, first)] = None
            else:
                pairs[category][(first, second)] = None
    return {c: list(p) for c, p in pairs.items()}


def _item(item_id: str, question: str, answer: str, distractors: list[str], rng: random.Random,
          category: str, position: int) -> ChoiceItem:
    """Gold at `position` (cycled by the caller, so every letter is gold equally often)."""
    options = list(distractors)
    rng.shuffle(options)
    options.insert(position % (len(options) + 1), answer)
    return ChoiceItem(item_id, question, list(LETTERS[: len(options)]), options,
                      LETTERS[options.index(answer)], category)


def knowledge_items(seed: int = SEED) -> list[ChoiceItem]:
    rng = random.Random(seed)
    items = []
    for category, pairs in sorted(_pairs().items()):
        valid: dict[str, set[str]] = defaultdict(set)
        for q, a in pairs:
            valid[q].add(a)
        answers = sorted({a for _, a in pairs})
        # one question per question word: a word with two valid answers (e.g. a city name found in
        # two states) is dropped rather than guessed
        unique = sorted({q for q, _ in pairs if len(valid[q]) == 1})
        template = _TEMPLATES[category][0]
        for i, q in enumerate(rng.sample(unique, min(PER_CATEGORY, len(unique)))):
            (answer,) = valid[q]
            pool = [a for a in answers if a not in valid[q] and a.lower() != q.lower()]
            items.append(_item(f"{category}-{i}", template.format(q), answer, rng.sample(pool, 3), rng, category,
                               position=len(items)))
    return items


def arithmetic_items(n: int = ARITHMETIC, seed: int = SEED) -> list[ChoiceItem]:
    rng = random.Random(seed + 1)
    items = []
    for i in range(n):
        kind = ("add", "subtract", "multiply", "compare")[i % 4]
        if kind == "compare":
            values = rng.sample(range(10, 1000), 4)
            question = "Which of these numbers is the largest?"
            answer, distractors = str(max(values)), [str(v) for v in values if v != max(values)]
        else:
            a, b = rng.randint(11, 99), rng.randint(2, 60 if kind != "multiply" else 9)
            value = {"add": a + b, "subtract": a - b, "multiply": a * b}[kind]
            symbol = {"add": "+", "subtract": "-", "multiply": "x"}[kind]
            question = f"What is {a} {symbol} {b}?"
            offsets = rng.sample([-10, -2, -1, 1, 2, 10], 3)
            answer, distractors = str(value), [str(value + o) for o in offsets]
        items.append(_item(f"arithmetic-{i}", question, answer, distractors, rng, "arithmetic", position=i + 1))
    return items


def _interleave(items: list[ChoiceItem]) -> list[ChoiceItem]:
    """Round-robin over categories, so that the first N items (evals' `limit`) cover every category."""
    by_category: dict[str, list[ChoiceItem]] = defaultdict(list)
    for item in items:
        by_category[item.category].append(item)
    queues = list(by_category.values())
    out = []
    for i in range(max(len(q) for q in queues)):
        out += [q[i] for q in queues if i < len(q)]
    return out


def embedded_choice_items(name: str = "choice") -> list[ChoiceItem]:
    """`choice`: knowledge + arithmetic (200 items); `analogies` or `arithmetic` alone. Categories are
    interleaved, so any prefix is balanced."""
    if name == "analogies":
        return _interleave(knowledge_items())
    if name == "arithmetic":
        return arithmetic_items()
    return _interleave(knowledge_items() + arithmetic_items())
