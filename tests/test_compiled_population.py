"""The low-rank population under a compiler: persistent hooks read buffers refilled in place, so one compiled forward
serves every population (no stale noise, no recompilation), and ``torch_compile`` compiles the members' decoding
with the same completions and weights as eager decoding."""

import pytest
import torch
from datasets import Dataset

from lightning_es import EvolutionStrategy, LowRankPerturbation, select_parameters
from test_trainer import es_args, token_rate
from tiny import build_gemma3, build_model, build_tokenizer
from trl_ext import ESTrainer
from trl_ext.runtime_checks import cannot_compile

PROMPTS = ["the quick", "what is 12", "count the", "brown fox", "lazy dog", "apples and", "is 42", "jumps over"]


@pytest.mark.parametrize("build", [build_model, build_gemma3], ids=["qwen2", "gemma3"])
def test_one_compiled_forward_follows_every_population_without_recompiling(build):
    tokenizer = build_tokenizer()
    model = build(tokenizer).eval()
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.05, rank=2),
                           population_size=4, seed=1, learning_rate=5e-7)
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing and guards, without a code generator
    inputs = torch.randint(0, len(tokenizer), (2, 6)).repeat(4, 1)
    outputs = []
    for step in range(3):
        members = es.members(step)
        with torch.no_grad(), es.perturbation.apply_population(members):
            eager = model(inputs).logits
            with torch._dynamo.config.patch(error_on_recompile=step > 0):  # step 0 traces, later steps reuse it
                traced = compiled(inputs).logits
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
        outputs.append(traced)
        es.step(step, torch.randn(4))  # the weights move too: the norms' perturbed values are refilled from them
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    with torch.no_grad():  # outside a population the hooks, still registered, do nothing
        hooked = model(inputs[:2]).logits
        es.perturbation.close()
        torch.testing.assert_close(hooked, model(inputs[:2]).logits, rtol=0, atol=0)


def train(tmp_path, **overrides):
    tokenizer = build_tokenizer()
    completions = []

    def recording(completion_ids, **kwargs):
        completions.extend(tuple(ids) for ids in completion_ids)
        return token_rate(completion_ids)

    args = es_args(tmp_path, population_size=4, max_completion_length=5, max_steps=3, **overrides)
    trainer = ESTrainer(build_model(tokenizer, init_range=0.2), recording, args=args,
                        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    trainer.train()
    return completions, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.slow
@pytest.mark.skipif(cannot_compile(torch.device("cpu")) is not None, reason="no compiler for inductor here")
def test_torch_compile_decodes_the_members_compiled_with_eager_results(tmp_path):
    eager_completions, eager_weights = train(tmp_path / "eager", cache_implementation="static")
    completions, weights = train(tmp_path / "compiled", torch_compile=True)
    assert completions == eager_completions
    for name, value in eager_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_where_decoding_cannot_compile_the_reason_is_named(monkeypatch):
    """ZeRO-3's gathers cannot be captured; inductor needs a C++ compiler on the CPU; another backend needs neither."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported here")
    cpu = torch.device("cpu")
    assert "ZeRO-3" in cannot_compile(cpu, "inductor", sharded=True)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "C++ compiler" in cannot_compile(cpu, "inductor")
    assert cannot_compile(cpu, "eager") is None
