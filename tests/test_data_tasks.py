"""Task suite and corpus: deterministic, disjoint splits, exact-match scoring."""

import random

import pytest

from rankwise.data import SPLITS, TASKS, get_task, mixed, python_docs
from rankwise.data.splits import split_of
from rankwise.data.tasks import LONGER, number_in_words
from rankwise.errors import RankwiseError


@pytest.mark.parametrize("name", list(TASKS))
def test_task_is_deterministic_and_short(name):
    task = TASKS[name]
    assert task.name == name
    train = task.train_set(200, seed=3)
    assert train == task.train_set(200, seed=3)
    assert train != task.train_set(200, seed=4)
    assert all(set(r) == {"prompt", "completion"} for r in train)
    # Short by design: answers under ~20 tokens, prompts under ~60 (words here bound tokens).
    assert max(len(r["completion"].split()) for r in train) <= 10
    assert max(len(r["prompt"].split()) for r in train) <= 25


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_test_are_disjoint(name):
    task = TASKS[name]
    train = {r["prompt"] for seed in (0, 1) for r in task.train_set(2000, seed=seed)}
    test = [r["prompt"] for r in task.test_set(200, seed=0)]
    assert len(set(test)) == len(test) == 200
    assert not train & set(test)
    assert all(split_of(prompt) == "test" for prompt in test)


@pytest.mark.parametrize("name", list(TASKS))
def test_scoring_is_exact_match_after_stripping(name):
    task = TASKS[name]
    for record in task.test_set(20):
        assert task.score(f" {record['completion']}\n", record["completion"])
        assert not task.score(record["completion"] + " x", record["completion"])


def test_answers_are_correct():
    rng = random.Random(0)
    for _ in range(50):
        prompt, answer = TASKS["reverse_words"].generate(rng)
        assert answer.split() == prompt.split(": ")[1].split()[::-1]
        prompt, answer = TASKS["sort_numbers"].generate(rng)
        assert answer.split() == sorted(prompt.split(": ")[1].split(), key=int)
        prompt, answer = TASKS["add_numbers"].generate(rng)
        a, b = prompt.removeprefix("What is ").split("?")[0].split(" + ")
        assert int(answer) == int(a) + int(b)
        prompt, answer = TASKS["spell_number"].generate(rng)
        assert answer == number_in_words(int(prompt.split()[3]))
        prompt, answer = TASKS["pick_word"].generate(rng)
        ordinal, words = prompt.removeprefix("Which word is ").split(" in this list: ")
        index = ["first", "second", "third", "fourth", "fifth", "sixth"].index(ordinal)
        assert answer == words.split()[index]
        prompt, answer = TASKS["shift_letters"].generate(rng)
        letters = prompt.split(": ")[1].split()
        assert [chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in letters] == answer.split()


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"),
        (7, "seven"),
        (15, "fifteen"),
        (40, "forty"),
        (47, "forty-seven"),
        (100, "one hundred"),
        (305, "three hundred five"),
        (999, "nine hundred ninety-nine"),
        (1000, "one thousand"),
        (2047, "two thousand forty-seven"),
        (9999, "nine thousand nine hundred ninety-nine"),
    ],
)
def test_number_in_words(n, words):
    assert number_in_words(n) == words


def test_get_task_and_mixed():
    assert get_task("add_numbers") is TASKS["add_numbers"]
    with pytest.raises(RankwiseError, match="Unknown task 'nope'; available: reverse_words, "):
        get_task("nope")
    records = mixed(["add_numbers", "pick_word"], n_per_task=10, split="test", seed=1)
    assert records == mixed(["add_numbers", "pick_word"], n_per_task=10, split="test", seed=1)
    assert sorted(r["task"] for r in records) == ["add_numbers"] * 10 + ["pick_word"] * 10
    assert [r["task"] for r in records] != sorted(r["task"] for r in records)  # shuffled
    assert {r["task"] for r in mixed(n_per_task=1)} == set(TASKS)
    with pytest.raises(RankwiseError, match="Unknown split"):
        get_task("add_numbers").records("dev", 1)


def test_longer_inputs_are_the_same_skills_with_longer_prompts_and_answers():
    assert set(LONGER) == set(TASKS)
    for name, task in LONGER.items():
        longer, usual = task.test_set(20), TASKS[name].test_set(20)
        assert not {r["prompt"] for r in longer} & {r["prompt"] for r in usual}
        for key in ("prompt", "completion"):
            if name != "pick_word" or key == "prompt":  # the word picked is as long as ever
                mean = {
                    s: sum(len(r[key]) for r in rs) / 20 for s, rs in (("l", longer), ("u", usual))
                }
                assert mean["l"] > mean["u"], (name, key)
        common = {r["prompt"].split(":")[0].split(" ")[0] for r in usual}
        assert common == {r["prompt"].split(":")[0].split(" ")[0] for r in longer}  # same wording


def test_at_least_six_tasks():
    assert len(TASKS) >= 6


def test_corpus_splits_are_disjoint_and_non_empty():
    parts = {split: python_docs(split) for split in SPLITS}
    assert all(parts.values())
    assert parts == {split: python_docs(split) for split in SPLITS}
    texts = [text for part in parts.values() for text in part]
    assert len(texts) == len(set(texts))
    assert len(parts["train"]) > 5 * len(parts["test"])
