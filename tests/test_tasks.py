import math
import multiprocessing
import queue

import pytest
from datasets import Dataset

from lightning_es.tasks import countdown, gsm8k


# ---- GSM8K -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("12 + 30 = 42\n#### 42", "42", 1.0),
        ("The total is 1,234 apples.\n#### 1,234", "1234", 1.0),
        ("She pays $1,234.50 in all. #### $1,234.50", "1234.5", 1.0),
        ("3 boxes of 4 make 12, minus 2 is 10", "10", 1.0),  # no marker: the last number counts
        ("#### 10\nActually 7 + 4 = 11", "10", 1.0),  # the marked number beats later numbers
        ("#### 10\n#### 11", "11", 1.0),  # the last marker wins
        ("I think 10. Then 12.", "10", 0.0),
        ("The temperature fell to -5 degrees. #### -5", "-5", 1.0),
        ("#### 72.0", "72", 1.0),
        ("I do not know.", "3", 0.0),
        ("", "3", 0.0),
    ],
)
def test_gsm8k_correctness(completion, answer, reward):
    assert gsm8k.correctness_reward([completion], answer=[answer]) == [reward]


def test_gsm8k_reference_answers_in_the_dataset_format():
    assert gsm8k.reference_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == 72
    assert gsm8k.reference_answer("#### 1,000") == 1000
    with pytest.raises(ValueError, match="holds no number"):
        gsm8k.reference_answer("no number here")


def test_gsm8k_rewards_take_conversational_completions():
    completions = [[{"role": "assistant", "content": "#### 5"}], [{"role": "assistant", "content": "five"}]]
    assert gsm8k.correctness_reward(completions, answer=["5", "5"]) == [1.0, 0.0]
    assert gsm8k.format_reward(completions) == [1.0, 0.0]


def test_gsm8k_format_reward():
    assert gsm8k.format_reward(["#### 12", "####", "answer: 12", "#### -3.5"]) == [1.0, 0.0, 0.0, 1.0]


def test_gsm8k_rows_without_the_expected_columns():
    with pytest.raises(ValueError, match=r"lacks the GSM8K columns \['answer'\].*'question'"):
        gsm8k.from_rows(Dataset.from_dict({"question": ["q"], "solution": ["#### 1"]}), "my copy")


def test_gsm8k_local_copy_and_missing_path(tmp_path):
    rows = Dataset.from_dict({"question": ["1+1?", "2+2?", "3+3?"], "answer": ["#### 2", "#### 4", "#### 6"]})
    from datasets import DatasetDict

    DatasetDict({"train": rows, "test": rows}).save_to_disk(tmp_path / "gsm8k")
    train, test = gsm8k.load_splits(dataset_path=str(tmp_path / "gsm8k"), train_size=2, eval_size=3)
    assert len(train) == 2 and test["answer"] == ["2", "4", "6"]
    assert test["prompt"][0][0]["content"].startswith("1+1?")
    assert gsm8k.task_name(test) == "GSM8K"
    with pytest.raises(FileNotFoundError, match="dataset_path .* does not exist"):
        gsm8k.load_splits(dataset_path=str(tmp_path / "missing"))


def test_the_default_splits_are_generated_word_problems_and_gsm8k_is_asked_for_by_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train, test = gsm8k.load_splits(train_size=30, eval_size=20, seed=1)
    assert gsm8k.task_name(test) == "generated word problems"  # what the recipes print: not "GSM8K"
    assert len(train) == 30 and test.to_dict() == gsm8k.load_splits(train_size=5, eval_size=20, seed=2)[1].to_dict()
    assert not set(train["prompt"][i][0]["content"] for i in range(30)) & set(
        test["prompt"][i][0]["content"] for i in range(20))
    assert train["answer"] != gsm8k.load_splits(train_size=30, eval_size=2, seed=2)[0]["answer"]
    with pytest.raises(ConnectionError, match="dataset_name='openai/gsm8k' .* unreachable.*dataset_path.*unset"):
        gsm8k.load_splits(dataset_name="openai/gsm8k")


# ---- Countdown -------------------------------------------------------------------------------------------------


def score(expression, numbers=(3, 5, 7), target=22):
    return countdown.correctness_reward([f"<answer>{expression}</answer>"], numbers=[list(numbers)], target=[target])[0]


@pytest.mark.parametrize(
    ("expression", "reward"),
    [
        ("3 * 5 + 7", 1.0),
        ("(7 + 5) * 3 - 14", 0.0),  # uses a number that was not given
        ("7 * 3 + 1", 0.0),  # misses 5 and invents 1
        ("3 * 5 + 7 + 0", 0.0),
        ("5 * 3 + 7 * 1", 0.0),
        ("7 * 5 - 3 * 3", 0.0),  # 3 used twice
        ("3 * 5 + 6", 0.0),  # wrong value and number
        ("(3 * 5 + 7", 0.0),  # syntax error
        ("7 / (5 - 5) + 3", 0.0),  # division by zero
        ("3.0 * 5 + 7", 0.0),  # only the integers given
        ("-3 * -5 + 7", 0.0),  # no unary minus
    ],
)
def test_countdown_correctness(expression, reward):
    assert score(expression) == reward


def test_countdown_exact_division():
    assert score("(5 + 7) / 3 * 6", numbers=(5, 7, 3, 6), target=24) == 1.0
    assert score("7 / 3 * 3 + 5", numbers=(7, 3, 3, 5), target=12) == 1.0  # exact fractions, no float error


def _score_and_parse(expression, results):
    """In a child process: the reward of ``expression`` and the error ``evaluate_expression`` raises for it."""
    try:
        reward = score(expression)
        try:
            countdown.evaluate_expression(expression)
            error = None
        except Exception as raised:  # noqa: BLE001 - reported to the test, which expects a ValueError
            error = raised
        results.put((reward, error if isinstance(error, ValueError) else repr(error)))
    except BaseException as failure:  # noqa: BLE001
        results.put(("failed", repr(failure)))


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('touch {pwned}')",
        "open('{pwned}', 'w').write('22')",
        "open('/etc/passwd').read()",
        "(lambda: 22)()",
        "3 ** 5 ** 7",
        "9 ** 9 ** 9",  # evaluated, it would not finish
        "[3, 5, 7][0] * 7",
        "x * 5 + 7",
        "(" * 150 + "3" + ")" * 150,
    ],
)
def test_countdown_never_evaluates_code(expression, tmp_path):
    pwned = tmp_path / "pwned"
    expression = expression.replace("{pwned}", str(pwned))
    # scored in a child process, killed if it does not answer in time: a parser that computed (9 ** 9 ** 9) or
    # otherwise hung would hold the interpreter, which no timeout in this process could interrupt
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_score_and_parse, args=(expression, results), daemon=True)
    child.start()
    try:
        reward, error = results.get(timeout=30)
    except queue.Empty:
        pytest.fail(f"scoring {expression[:60]!r} did not finish within 30 s (exit code {child.exitcode})")
    finally:
        child.kill()
        child.join()
    assert not pwned.exists()
    assert reward == 0.0, error
    assert isinstance(error, ValueError), error


def test_countdown_answer_extraction_and_format():
    text = "First <answer>1 + 2</answer> then <answer> 3 * 5 + 7 </answer>"
    assert countdown.extract_answer(text) == "3 * 5 + 7"
    assert countdown.format_reward([text, "3 * 5 + 7", [{"role": "assistant", "content": "<answer>1</answer>"}]]) == [
        1.0, 0.0, 1.0,
    ]


def test_countdown_generation_is_seeded_and_solvable():
    first, again = countdown.generate(4, seed=3), countdown.generate(4, seed=3)
    assert first["numbers"] == again["numbers"] and first["target"] == again["target"]
    assert countdown.generate(4, seed=4)["numbers"] != first["numbers"]
    assert all(3 <= len(n) <= 4 for n in first["numbers"])
    assert str(first["target"][0]) in first["prompt"][0][0]["content"]


def test_a_model_without_a_chat_template_is_asked_in_plain_text(tokenizer):
    """A base model (Gemma-3-270M) has no chat template: the recipes ask it each question as text, which TRL then
    tokenizes with the model's special tokens; a chat model keeps the conversational prompts."""
    from datasets import Dataset

    from lightning_es.tasks import prompts_for

    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 2 + 3?"}]], "answer": ["5"]})
    assert prompts_for(tokenizer, dataset)["prompt"] == dataset["prompt"]  # the tiny tokenizer has a template
    tokenizer.chat_template = None
    plain = prompts_for(tokenizer, dataset)
    assert plain["prompt"] == ["Question: What is 2 + 3?\nAnswer:"] and plain["answer"] == ["5"]
    assert prompts_for(tokenizer, plain)["prompt"] == plain["prompt"]  # already text: unchanged


@pytest.mark.parametrize("style", ["final_answer", "step_by_step"])
def test_a_base_model_is_shown_answered_problems_in_the_form_the_rewards_score(tokenizer, style):
    """A base model copies the form of answers it was shown: the demonstrations before each question are answered as
    the task's instruction asks, so that the task's own rewards score them in full."""
    from lightning_es.tasks import gsm8k, prompts_for

    dataset = gsm8k.to_prompts(["What is 2 + 3?"], ["5"], style)
    shown = gsm8k.demonstrations(style)
    assert prompts_for(tokenizer, dataset, shown)["prompt"] == dataset["prompt"]  # a chat model is asked as before
    tokenizer.chat_template = None
    prompt = prompts_for(tokenizer, dataset, shown)["prompt"][0]
    questions = prompt.split("Question: ")[1:]
    assert len(questions) == len(shown) + 1 and questions[-1] == f"What is 2 + 3?\n{gsm8k.INSTRUCTIONS[style]}\nAnswer:"
    answers = [q.split("\nAnswer: ")[1].strip() for q in questions[:-1]]
    assert all(f"\n{gsm8k.INSTRUCTIONS[style]}\n" in q for q in questions[:-1])
    assert gsm8k.format_reward(answers) == [1.0, 1.0]
    assert all(a.startswith("####") == (style == "final_answer") for a in answers)


def test_countdown_demonstrations_are_correct_solutions():
    from lightning_es.tasks import countdown

    for question, answer in countdown.DEMONSTRATIONS:
        numbers = [int(n) for n in question.split("[")[1].split("]")[0].split(",")]
        target = int(question.split("equals ")[1].split(".")[0])
        assert countdown.correctness_reward([answer], numbers=[numbers], target=[target]) == [1.0]


def test_mean_and_spread_over_seeds_as_the_reports_print_them():
    from lightning_es.tasks.spread import mean_sd, shown

    assert mean_sd([1, 2, 3]) == (2.0, 1.0) and mean_sd([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_sd([1.0, float("nan")]))  # a step that kept nothing stays visible
    assert shown([1, 2, 3]) == "2.000 ± 1.000" and shown([0.25]) == "0.250"
    assert shown([1, 2, 3], ".4g", ".2g", with_range=True) == "2 ± 1 [1, 3]"
