"""The built-in task suite: short instruction tasks generated deterministically from a seed.

Each task exercises one skill with a short prompt and an answer of a few tokens, scored by exact
match. Train, validation and test items are disjoint by construction: every prompt belongs to
one split, fixed by a hash of its text (80/10/10, see `splits.split_of`), and a split's generator
keeps only its own prompts. So no test prompt can appear in any training set, whatever the seeds
and sizes. Test and validation sets also hold no repeated prompt; training sets may.
"""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from rankwise.data.splits import check_split, split_of
from rankwise.errors import RankwiseError

# Common words that the embedded SmolLM2 tokenizer keeps whole, so answers stay short.
WORDS = (
    "apple", "bird", "blue", "boat", "book", "bread", "car", "cat", "chair", "cloud",
    "coat", "cup", "desk", "dog", "door", "drum", "duck", "egg", "fish", "flag",
    "frog", "gold", "green", "hat", "hill", "horse", "house", "key", "king", "lamp",
    "leaf", "lion", "milk", "moon", "nest", "owl", "pen", "pig", "pink", "rain",
    "red", "ring", "road", "rock", "rose", "salt", "sand", "ship", "shoe", "sky",
    "snow", "sock", "star", "stone", "sun", "table", "tree", "wolf", "wood", "yellow",
)  # fmt: skip
LETTERS = "abcdefghijklmnopqrstuvwxyz"
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)  # fmt: skip
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

Generate = Callable[[random.Random], tuple[str, str]]


@dataclass(frozen=True)
class Task:
    """One instruction task: a seeded generator of (prompt, answer) pairs and its scorer."""

    name: str
    generate: Generate

    def records(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """`n` {"prompt", "completion"} records of `split`, the same for the same seed."""
        check_split(split)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        records: list[dict] = []
        seen: set[str] = set()
        for _ in range(100 * n + 1000):  # every prompt space here is far larger than needed
            if len(records) == n:
                break
            prompt, answer = self.generate(rng)
            if split_of(prompt) != split or (split != "train" and prompt in seen):
                continue
            seen.add(prompt)
            records.append({"prompt": prompt, "completion": answer})
        if len(records) < n:
            raise RankwiseError(f"Task {self.name} has fewer than {n} distinct {split} items.")
        return records

    def train_set(self, n: int, seed: int = 0) -> list[dict]:
        """`n` training records (prompts may repeat)."""
        return self.records("train", n, seed)

    def test_set(self, n: int, seed: int = 0) -> list[dict]:
        """`n` distinct test records, none of whose prompts any training set can contain."""
        return self.records("test", n, seed)

    def score(self, prediction: str, answer: str) -> bool:
        """Exact match after stripping surrounding whitespace."""
        return prediction.strip() == answer.strip()


def number_in_words(n: int) -> str:
    """English words for 0 <= n < 10000, e.g. 2047 -> 'two thousand forty-seven'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        head, rest = f"{ONES[n // 100]} hundred", n % 100
    else:
        head, rest = f"{number_in_words(n // 1000)} thousand", n % 1000
    return f"{head} {number_in_words(rest)}" if rest else head


def _reverse_words(rng: random.Random, count: tuple[int, int] = (4, 6)) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(*count))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _sort_numbers(rng: random.Random, count: int = 4) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), count)
    prompt = f"Sort these numbers from smallest to largest: {' '.join(map(str, numbers))}"
    return prompt, " ".join(map(str, sorted(numbers)))


def _add_numbers(rng: random.Random, low: int = 100, high: int = 999) -> tuple[str, str]:
    a, b = rng.randint(low, high), rng.randint(low, high)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def _spell_number(rng: random.Random, low: int = 1, high: int = 9999) -> tuple[str, str]:
    n = rng.randint(low, high)
    return f"Write the number {n} in English words.", number_in_words(n)


def _pick_word(rng: random.Random, count: int = 6) -> tuple[str, str]:
    words = rng.sample(WORDS, count)
    k = rng.randrange(len(ORDINALS))  # one of the first six, however long the list
    return f"Which word is {ORDINALS[k]} in this list: {' '.join(words)}", words[k]


def _shift_letters(rng: random.Random, count: tuple[int, int] = (3, 5)) -> tuple[str, str]:
    letters = rng.choices(LETTERS, k=rng.randint(*count))
    shifted = [LETTERS[(LETTERS.index(c) + 1) % 26] for c in letters]
    instruction = "Replace each letter with the next one in the alphabet (z becomes a)"
    return f"{instruction}: {' '.join(letters)}", " ".join(shifted)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("reverse_words", _reverse_words),
        Task("sort_numbers", _sort_numbers),
        Task("add_numbers", _add_numbers),
        Task("spell_number", _spell_number),
        Task("pick_word", _pick_word),
        Task("shift_letters", _shift_letters),
    )
}


# The same skills and wordings with longer inputs: a family held out of training, to measure
# generalisation (bench/mixture_scaling.py). Same names, so the same seeds, as the tasks above.
LONGER_INPUTS: dict[str, dict] = {
    "reverse_words": {"count": (7, 8)},
    "sort_numbers": {"count": 6},
    "add_numbers": {"low": 1000, "high": 9999},
    "spell_number": {"low": 10000, "high": 99999},
    "pick_word": {"count": 8},
    "shift_letters": {"count": (6, 7)},
}
LONGER: dict[str, Task] = {
    name: Task(name, partial(TASKS[name].generate, **sizes))
    for name, sizes in LONGER_INPUTS.items()
}


def get_task(name: str) -> Task:
    """The built-in task called `name`."""
    if name not in TASKS:
        raise RankwiseError(f"Unknown task {name!r}; available: {', '.join(TASKS)}.")
    return TASKS[name]


def mixed(
    names: Sequence[str] | None = None, *, n_per_task: int, split: str = "train", seed: int = 0
) -> list[dict]:
    """Records of several tasks (all by default), each tagged with "task", shuffled by `seed`."""
    records = [
        {**record, "task": name}
        for name in (names or list(TASKS))
        for record in get_task(name).records(split, n_per_task, seed)
    ]
    random.Random(f"mixed:{split}:{seed}").shuffle(records)
    return records
