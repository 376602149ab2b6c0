"""The low-rank population generated in chunks of whole members (``es_max_generation_rows``): the same completions,
fitness and weights as one batch, never more rows in one call than the chunk, and a clear error for a chunk smaller
than one member."""

import pytest
import torch
from datasets import Dataset

from lightning_es.engine import Population, Processes
from test_trainer import es_args, token_rate
from tiny import build_model, build_tokenizer
from trl_ext import ESConfig, ESTrainer

PROMPTS = ["the quick", "what is 12", "count the", "brown fox", "lazy dog", "apples and", "is 42", "jumps over"]


def test_rounds_hold_at_most_the_chunk_of_a_process_members_in_order():
    members = Population(8, antithetic=True, seed=0).members(0)
    rounds = Processes().rounds(members, batched=True, members_per_round=3)
    assert [[m.index for m in r] for r in rounds] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    second = Processes(rank=1, world_size=2).rounds(members, batched=True, members_per_round=3)
    assert [[m.index for m in r] for r in second] == [[1, 3, 5], [7]]
    assert Processes().rounds(members, batched=True) == [members]


def train(tmp_path, rows):
    """Two greedy iterations of a population of 8 (4 rows each): the completions of every member, the rows of each
    generate call, the logged fitness and the final weights."""
    tokenizer = build_tokenizer()
    completions, calls = [], []

    def recording(completion_ids, **kwargs):
        calls.append(len(completion_ids))
        completions.extend(tuple(ids) for ids in completion_ids)
        return token_rate(completion_ids)

    args = es_args(tmp_path / str(rows), population_size=8, max_completion_length=6, es_max_generation_rows=rows)
    trainer = ESTrainer(build_model(tokenizer, init_range=0.2), recording, args=args,
                        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    trainer.train()
    fitness = [e["es/fitness_mean"] for e in trainer.state.log_history if "es/fitness_mean" in e]
    return completions, calls, fitness, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_chunked_population_matches_one_batch(tmp_path):
    whole, whole_calls, whole_fitness, whole_weights = train(tmp_path, None)
    assert whole_calls == [32, 32]  # 8 members x 4 rows, one call per iteration
    for rows in (12, 4):  # 3 members a call (the last call 2), and one member a call
        completions, calls, fitness, weights = train(tmp_path, rows)
        assert max(calls) <= rows and sum(calls) == 64
        assert completions == whole  # same rows, same order, greedy: the same tokens
        assert fitness == pytest.approx(whole_fitness, abs=1e-6)
        for name, value in whole_weights.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_chunk_smaller_than_one_member_is_refused_naming_the_least_valid_value(tmp_path):
    with pytest.raises(ValueError, match=r"es_max_generation_rows=3 is smaller .* Set es_max_generation_rows to at "
                                         r"least 4"):
        ESConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, es_max_generation_rows=3, bf16=False)
