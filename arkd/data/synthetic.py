"""Offline synthetic instruction tasks: every row has exactly one correct answer.

The families are short, deterministic string tasks over small vocabularies, written in the protocol's template,
so that a tiny GPT-2 learns them within minutes on a CPU and Rouge-L separates a good model from a poor one
(most answers are several words long, so partial answers earn partial credit). Each family has its own
instruction sentence; the row's ``topic`` is the family name.

========  =============================================  ==================  =====================
family    instruction                                    input               output
========  =============================================  ==================  =====================
reverse   Reverse the order of the words.                cat plum red        red plum cat
sort      Sort the words in alphabetical order.          pear cat dog        cat dog pear
numsort   Sort the numbers from smallest to largest.     7 2 9               2 7 9
count     Count the words.                               cat dog dog fox     4
opposite  Write the opposite of each word.               hot up              cold down
spell     Write each number as a word.                   3 7                 three seven
add       Add the two numbers.                           12 + 7              19
double    Repeat each word twice.                        cat dog             cat cat dog dog
ends      Give the first and the last word.              cat dog fox owl     cat owl
countup   Count from 3 to 7.                             (none)              3 4 5 6 7
========  =============================================  ==================  =====================

``generate_synthetic(n, seed)`` is a pure function of its arguments (its own ``random.Random(seed)``);
:func:`synthetic_splits` keeps validation and test prompts out of the training split.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from arkd.data.example import Example
from arkd.data.formats import write_jsonl
from arkd.data.template import format_prompt

WORDS = (
    "apple", "bird", "cake", "cat", "cow", "dog", "duck", "fish", "fox", "frog",
    "goat", "hat", "lamp", "lion", "moon", "owl", "pear", "plum", "rose", "star",
)  # fmt: skip
OPPOSITES = {
    "big": "small", "small": "big", "hot": "cold", "cold": "hot", "up": "down", "down": "up",
    "fast": "slow", "slow": "fast", "old": "new", "new": "old", "happy": "sad", "sad": "happy",
    "high": "low", "low": "high", "light": "dark", "dark": "light", "early": "late", "late": "early",
}  # fmt: skip
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

Row = tuple[str, str, str]  # instruction, input, output


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def _digits(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(10) for _ in range(rng.randint(low, high))]


def _reverse(rng: random.Random) -> Row:
    words = _words(rng, 3, 5)
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def _sort(rng: random.Random) -> Row:
    words = _words(rng, 3, 5)
    return "Sort the words in alphabetical order.", " ".join(words), " ".join(sorted(words))


def _numsort(rng: random.Random) -> Row:
    nums = _digits(rng, 3, 6)
    return "Sort the numbers from smallest to largest.", " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))


def _count(rng: random.Random) -> Row:
    words = _words(rng, 2, 8)
    return "Count the words.", " ".join(words), str(len(words))


def _opposite(rng: random.Random) -> Row:
    words = [rng.choice(sorted(OPPOSITES)) for _ in range(rng.randint(2, 4))]
    return "Write the opposite of each word.", " ".join(words), " ".join(OPPOSITES[w] for w in words)


def _spell(rng: random.Random) -> Row:
    nums = _digits(rng, 2, 5)
    return "Write each number as a word.", " ".join(map(str, nums)), " ".join(NUMBER_WORDS[d] for d in nums)


def _add(rng: random.Random) -> Row:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _double(rng: random.Random) -> Row:
    words = _words(rng, 2, 4)
    return "Repeat each word twice.", " ".join(words), " ".join(w for w in words for _ in range(2))


def _ends(rng: random.Random) -> Row:
    words = _words(rng, 3, 6)
    return "Give the first and the last word.", " ".join(words), f"{words[0]} {words[-1]}"


def _countup(rng: random.Random) -> Row:
    start = rng.randint(0, 50)
    stop = start + rng.randint(2, 6)
    return f"Count from {start} to {stop}.", "", " ".join(str(i) for i in range(start, stop + 1))


FAMILIES: dict[str, Callable[[random.Random], Row]] = {
    "reverse": _reverse,
    "sort": _sort,
    "numsort": _numsort,
    "count": _count,
    "opposite": _opposite,
    "spell": _spell,
    "add": _add,
    "double": _double,
    "ends": _ends,
    "countup": _countup,
}


def _check_families(families: Sequence[str] | None) -> list[str]:
    names = list(FAMILIES) if families is None else list(families)
    if not names:
        raise ValueError("families is empty; expected at least one of " + ", ".join(FAMILIES))
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown synthetic families {unknown}; expected names from {', '.join(FAMILIES)}")
    return names


def _make(family: str, rng: random.Random) -> Example:
    instruction, inp, output = FAMILIES[family](rng)
    return Example(
        instruction=instruction, input=inp, references=[output], prompt=format_prompt(instruction, inp), topic=family
    )


def generate_synthetic(n: int, seed: int = 0, families: Sequence[str] | None = None) -> list[Example]:
    """Generate ``n`` synthetic rows, as balanced across families as ``n`` allows, in a seeded random order.

    Args:
        n: the number of rows (rows may repeat; families with small input spaces repeat more).
        seed: the seed; equal arguments give equal rows.
        families: the families to draw from (None: all of :data:`FAMILIES`).

    Returns:
        ``n`` examples with ``topic`` set to their family.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of rows, got {n}")
    names = _check_families(families)
    rng = random.Random(seed)
    plan = [names[i % len(names)] for i in range(n)]
    rng.shuffle(plan)
    return [_make(family, rng) for family in plan]


def _draw_splits(
    names: list[str],
    rng: random.Random,
    n_train: int,
    n_validation: int,
    n_test: int,
    held_row: Callable[[str, random.Random], Example],
    train_row: Callable[[str, random.Random], tuple[str, Callable[[], Example]]],
    hint: str,
) -> dict[str, list[Example]]:
    """Distinct held-out prompts first (families in turn), then training rows whose prompts are not among them.

    ``held_row(family, rng)`` makes a held-out example; ``train_row(family, rng)`` returns a training row's prompt
    and a function that builds the row, called only when the prompt is kept (so a rejected row draws nothing more).
    """
    held_out: dict[str, Example] = {}
    need = n_validation + n_test
    attempts = 0
    while len(held_out) < need:
        attempts += 1
        if attempts > 100 * need:
            raise ValueError(
                f"could only find {len(held_out)} distinct held-out prompts of {need} for families {names}; "
                f"expected {hint}"
            )
        ex = held_row(names[len(held_out) % len(names)], rng)
        held_out.setdefault(ex.prompt, ex)
    held = list(held_out.values())
    rng.shuffle(held)
    train: list[Example] = []
    attempts = 0
    while len(train) < n_train:
        attempts += 1
        if attempts > 100 * n_train:
            raise ValueError(f"could not draw {n_train} training rows outside the held-out prompts of {names}")
        prompt, build = train_row(names[len(train) % len(names)], rng)
        if prompt not in held_out:
            train.append(build())
    rng.shuffle(train)
    return {"train": train, "validation": held[:n_validation], "test": held[n_validation:]}


def synthetic_splits(
    n_train: int,
    n_validation: int,
    n_test: int,
    *,
    seed: int = 0,
    families: Sequence[str] | None = None,
) -> dict[str, list[Example]]:
    """Train / validation / test splits whose held-out prompts never occur in the training split.

    Validation and test rows are distinct prompts (no prompt in both); training rows are drawn from the same
    generator with every held-out prompt rejected, so training rows may repeat among themselves but never leak.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}`` with the requested sizes.

    Raises:
        ValueError: non-positive sizes, or families too small to provide enough distinct held-out prompts.
    """
    for name, size in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)):
        if size < 1:
            raise ValueError(f"{name} must be at least 1, got {size}")
    names = _check_families(families)
    rng = random.Random(seed)

    def train_row(family: str, rng: random.Random) -> tuple[str, Callable[[], Example]]:
        ex = _make(family, rng)
        return ex.prompt, lambda: ex

    return _draw_splits(
        names, rng, n_train, n_validation, n_test, _make, train_row, "fewer validation / test rows or more families"
    )


def write_synthetic_splits(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 20000,
    n_validation: int = 200,
    n_test: int = 500,
    seed: int = 0,
    families: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write :func:`synthetic_splits` as ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (MiniLLM schema).

    Returns:
        The path of each split's file.
    """
    splits = synthetic_splits(n_train, n_validation, n_test, seed=seed, families=families)
    out = Path(out_dir)
    return {name: write_jsonl(rows, out / f"{name}.jsonl") for name, rows in splits.items()}


def synthetic_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts (prompt followed by the answer) of ``n`` synthetic rows, e.g. to train the offline tokenizer."""
    return [ex.prompt + ex.response for ex in generate_synthetic(n, seed)]


# --------------------------------------------------------------------------------------------------------------------
# The trade-off testbed: tasks with several correct answers of a known, skewed distribution (config=tiny_tradeoff).
#
# Every family below answers a prompt with one of several valid answers, drawn from a distribution with a dominant
# mode and a long tail (Zipf weights 1 / rank^1.5 over the candidates). Training rows carry ONE answer sampled from
# that distribution, so a teacher trained on them learns the distribution itself; held-out rows carry EVERY valid
# answer as a reference, most probable first, so Rouge-L (the maximum over references) rewards any valid answer and
# the teacher-forced metrics see the whole answer set. A student too small to copy the teacher's distribution must
# choose between covering its mass (forward KL) and committing to its mode (reverse KL).

ADJECTIVES = tuple(sorted(OPPOSITES))
ZIPF_EXPONENT = 1.5
# "Say it another way": paraphrase templates of a (noun, adjective) pair, the first the most common.
PARAPHRASES = (
    "the {n} is {a}",
    "a {a} {n}",
    "this {n} is {a}",
    "the {n} looks {a}",
    "that {n} is very {a}",
    "what a {a} {n}",
    "my {n} is {a}",
)

TradeoffRow = tuple[str, str, list[tuple[str, float]]]  # instruction, input, [(answer, probability)], most likely first


def zipf_weights(k: int, exponent: float = ZIPF_EXPONENT) -> list[float]:
    """Probabilities proportional to 1 / rank^exponent over ranks 1..k."""
    raw = [1.0 / (rank**exponent) for rank in range(1, k + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _pick(rng: random.Random) -> TradeoffRow:
    words = rng.sample(WORDS, rng.randint(5, 7))
    return "Pick one of the words.", " ".join(words), list(zip(words, zipf_weights(len(words))))


def _pick_two(rng: random.Random) -> TradeoffRow:
    # Two of the words in any order: an ordered draw without replacement (Plackett-Luce with the Zipf weights).
    words = rng.sample(WORDS, rng.randint(4, 6))
    weights = zipf_weights(len(words))
    answers = []
    for i, first in enumerate(words):
        rest = 1.0 - weights[i]
        for j, second in enumerate(words):
            if i != j:
                answers.append((f"{first} {second}", weights[i] * weights[j] / rest))
    answers.sort(key=lambda a: -a[1])
    return "Name two of the words.", " ".join(words), answers


def _paraphrase(rng: random.Random) -> TradeoffRow:
    noun, adjective = rng.choice(WORDS), rng.choice(ADJECTIVES)
    weights = zipf_weights(len(PARAPHRASES))
    answers = [(t.format(n=noun, a=adjective), w) for t, w in zip(PARAPHRASES, weights)]
    return "Say it another way.", f"{noun} {adjective}", answers


TRADEOFF_FAMILIES: dict[str, Callable[[random.Random], TradeoffRow]] = {
    "pick": _pick,
    "pick_two": _pick_two,
    "paraphrase": _paraphrase,
}


def _tradeoff_row(family: str, rng: random.Random) -> tuple[str, str, list[tuple[str, float]]]:
    instruction, inp, answers = TRADEOFF_FAMILIES[family](rng)
    return instruction, inp, answers


def tradeoff_splits(
    n_train: int,
    n_validation: int,
    n_test: int,
    *,
    seed: int = 0,
    families: Sequence[str] | None = None,
) -> dict[str, list[Example]]:
    """Train / validation / test splits of the trade-off families (:data:`TRADEOFF_FAMILIES`).

    Training rows have one reference, an answer *sampled* from the row's skewed answer distribution; validation and
    test rows have every valid answer as a reference, the most probable first. Held-out prompts never occur in the
    training split, and no prompt is in both validation and test.

    Raises:
        ValueError: non-positive sizes, unknown families, or too few distinct prompts for the held-out splits.
    """
    for name, size in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)):
        if size < 1:
            raise ValueError(f"{name} must be at least 1, got {size}")
    names = list(TRADEOFF_FAMILIES) if families is None else list(families)
    unknown = [f for f in names if f not in TRADEOFF_FAMILIES]
    if not names or unknown:
        raise ValueError(
            f"unknown or no trade-off families {unknown or names}; expected names from {', '.join(TRADEOFF_FAMILIES)}"
        )
    rng = random.Random(seed)

    def example(family: str, instruction: str, inp: str, refs: list[str]) -> Example:
        return Example(instruction, inp, refs, format_prompt(instruction, inp), topic=family)

    def held_row(family: str, rng: random.Random) -> Example:
        instruction, inp, answers = _tradeoff_row(family, rng)
        return example(family, instruction, inp, [a for a, _ in answers])

    def train_row(family: str, rng: random.Random) -> tuple[str, Callable[[], Example]]:
        instruction, inp, answers = _tradeoff_row(family, rng)

        def finish() -> Example:  # the answer is drawn only for a row that is kept
            (sampled,) = rng.choices([a for a, _ in answers], weights=[w for _, w in answers])
            return example(family, instruction, inp, [sampled])

        return format_prompt(instruction, inp), finish

    return _draw_splits(names, rng, n_train, n_validation, n_test, held_row, train_row, "fewer validation / test rows")
