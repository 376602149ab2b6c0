"""The generated tasks' splits are disjoint by construction: no test problem's text, nor its numbers and answer,
occurs in training or validation, whatever the seeds; and the problem space is at least 20 times the splits."""

import random

import pytest

from lightning_es.tasks import generated, gsm8k

SIZES = {"train": 1000, "validation": 200, "test": 500}  # train: one run's draw


key = generated.key


@pytest.mark.parametrize("task", sorted(generated.TASKS))
def test_no_test_problem_occurs_in_training_or_validation(task):
    test = generated.problems(task, "test", SIZES["test"], seed=0)
    others = [p for split in ("train", "validation") for seed in (0, 1, 2)
              for p in generated.problems(task, split, SIZES[split], seed=seed)]
    assert len({key(p) for p in test}) == SIZES["test"]  # distinct calculations, not only distinct wordings
    assert not {p["question"] for p in test} & {p["question"] for p in others}
    assert not {key(p) for p in test} & {key(p) for p in others}  # not even under another wording
    validation = generated.problems(task, "validation", SIZES["validation"], seed=0)
    train = [p for seed in (0, 1, 2) for p in generated.problems(task, "train", SIZES["train"], seed=seed)]
    assert not {key(p) for p in validation} & {key(p) for p in train}


def test_the_split_follows_numbers_and_answer_not_the_wording():
    rng = random.Random(5)
    for _ in range(2000):
        problem = generated.draw("word_problems", rng)
        assert generated.split_of(problem["numbers"][::-1], problem["answer"]) == generated.split_of(
            problem["numbers"], problem["answer"])


@pytest.mark.parametrize("task", sorted(generated.TASKS))
def test_the_problem_space_is_at_least_20_times_the_splits(task):
    rng = random.Random(0)
    keys = {key(generated.draw(task, rng)) for _ in range(300_000)}  # a lower bound on the space
    assert len(keys) >= 20 * sum(SIZES.values())


def test_answers_are_right_and_scored_by_the_gsm8k_check():
    data = generated.dataset("word_problems", "test", 20, seed=3)
    rows = generated.problems("word_problems", "test", 20, seed=3)
    assert data["answer"] == [str(p["answer"]) for p in rows]
    right = [f"#### {p['answer']}" for p in rows]
    wrong = [f"#### {p['answer'] + 1}" for p in rows]
    assert gsm8k.correctness_reward(right, data["answer"]) == [1.0] * 20
    assert gsm8k.correctness_reward(wrong, data["answer"]) == [0.0] * 20
    bare = generated.problems("arithmetic", "test", 50, seed=0)
    assert all(eval(p["question"].removeprefix("What is ").rstrip("?")) == p["answer"] for p in bare)
    assert {p["question"].split()[3] for p in bare} == {"+", "-", "*"}


def test_the_same_seed_gives_the_same_split_and_another_seed_another_draw():
    first = generated.problems("arithmetic", "train", 50, seed=0)
    assert first == generated.problems("arithmetic", "train", 50, seed=0)
    assert first != generated.problems("arithmetic", "train", 50, seed=1)
