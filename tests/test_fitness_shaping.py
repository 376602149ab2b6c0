"""GRPO-style fitness shaping: each prompt normalised across the members, steps in proportion to the evidence."""

import torch

from lightning_es.engine.shaping import prompt_zscore, zscore
from test_relative_noise import es_over, small_net


def test_prompt_zscore_normalises_each_prompt_across_members_as_grpo_normalises_a_group():
    table = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    shaped = prompt_zscore(table.mean(1), table)
    # prompts 0 and 2: GRPO's advantages (r - mean) / std across the members; prompt 1, tied, contributes 0
    expected = torch.stack([(c - c.mean()) / c.std(unbiased=False) for c in (table[:, 0], table[:, 2])]).sum(0) / 3
    torch.testing.assert_close(shaped, expected)
    # scaling per prompt matters: the same table with one prompt's rewards scaled 10x shapes the same
    scaled = table.clone()
    scaled[:, 0] *= 10
    torch.testing.assert_close(prompt_zscore(scaled.mean(1), scaled), shaped)
    assert not torch.allclose(zscore(scaled.mean(1)), zscore(table.mean(1)))  # which the z-score of means is not
    # the step shrinks with the evidence: every prompt tied gives nothing; agreeing prompts the full spread
    assert torch.all(prompt_zscore(torch.zeros(4), torch.ones(4, 3, dtype=torch.float64)) == 0)
    agreeing = torch.arange(4, dtype=torch.float64)[:, None].expand(4, 3)
    torch.testing.assert_close(prompt_zscore(agreeing.mean(1), agreeing), zscore(agreeing.mean(1)))


def test_a_reward_of_random_numbers_moves_prompt_zscore_less_than_zscore():
    generator = torch.Generator().manual_seed(0)
    norms = {}
    for shaping in ("zscore", "prompt_zscore"):
        es = es_over(small_net(), shaping=shaping)
        norms[shaping] = sum(es.step(step, table.mean(1), per_prompt=table).update_norm for step, table in
                             enumerate(torch.rand(30, 6, 16, generator=generator, dtype=torch.float64)))
    assert norms["prompt_zscore"] < 0.5 * norms["zscore"]  # 16 unrelated prompts: about a quarter of the spread


def test_estrainer_steps_with_prompt_zscore_from_its_per_prompt_rewards(tmp_path, tiny_model, tokenizer, prompt_dataset):
    from trl_ext import ESConfig, ESTrainer

    def length(completion_ids, **kwargs):
        return [len(ids) / 8 for ids in completion_ids]

    args = ESConfig(output_dir=str(tmp_path), max_steps=2, population_size=4, per_device_train_batch_size=4,
                    max_completion_length=6, fitness_shaping="prompt_zscore", report_to="none", use_cpu=True,
                    save_strategy="no", logging_steps=1, learning_rate=1e-2)
    trainer = ESTrainer(tiny_model, length, args=args, train_dataset=prompt_dataset, processing_class=tokenizer)
    trainer.train()
    assert trainer.es.shape_fitness is prompt_zscore
    logs = [h for h in trainer.state.log_history if "es/update_norm" in h]
    assert len(logs) == 2
    for log in logs:  # a step whenever some prompt told the members apart, none when every prompt tied
        assert (log["es/update_norm"] > 0) == (log["es/frac_prompts_tied"] < 1) == (log["es/no_signal"] == 0)
