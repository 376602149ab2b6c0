"""How much of an ES update survives in bf16 weights, for four ways of applying it.

Runs 20 ES steps with the same seeds and fitness values on an fp32 model and on bf16 copies, and prints how close
each bf16 model's weight change is to the fp32 one (cosine, norm ratio) and the extra memory per evolved weight;
``--out DIR`` writes them to ``DIR/result.json``.

    python benchmarks/precision.py [--steps 20] [--lr 5e-7] [--out DIR]
"""

import torch

from common import arguments, write_result
from lightning_es import EvolutionStrategy, FullRankPerturbation, select_parameters
from tiny import build_model, build_tokenizer  # tests/, on the path from common


def naive(p, update, _state):
    p.add_(update.to(p.dtype))


def stochastic_rounding(p, update, _state):
    exact = p.float() + update
    bits = exact.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    p.copy_(((bits + noise) & ~0xFFFF).view(torch.float32))  # truncation after adding uniform noise: unbiased


def kahan(p, update, state):
    compensation = state.setdefault(id(p), torch.zeros_like(p))
    y = update + compensation.float()
    total = (p.float() + y).to(p.dtype)
    compensation.copy_(y - (total.float() - p.float()))
    p.copy_(total)


RULES = {"naive in-place (reference code)": (naive, 0), "stochastic rounding": (stochastic_rounding, 0),
         "Kahan compensation (bf16 buffer)": (kahan, 2)}


POPULATION = 32  # pinned, not the engine's default: the fitness values below are drawn for this many members


def delta(model, start):
    return torch.cat([(p.detach().double() - start[n].double()).flatten() for n, p in model.named_parameters()])


def strategy(params, lr: float) -> EvolutionStrategy:
    """The same noise, seeds and population for every variant."""
    return EvolutionStrategy(FullRankPerturbation(params, sigma=1e-3), population_size=POPULATION, learning_rate=lr, seed=1)


def engine_steps(model, fitness, lr: float) -> torch.Tensor:
    """The weight change of the engine's own ES steps on ``model``, one per fitness vector."""
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    es = strategy(select_parameters(model), lr)
    for step, f in enumerate(fitness):
        es.step(step, f)
    return delta(model, start)


def bf16_copy(tokenizer, base):
    model = build_model(tokenizer).bfloat16()
    model.load_state_dict(base.state_dict())
    return model


def main():
    parser = arguments(__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-7)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    base = build_model(tokenizer).bfloat16().float()
    fitness = [torch.rand(POPULATION) for _ in range(args.steps)]
    intended = engine_steps(build_model(tokenizer).bfloat16().float(), fitness, args.lr)

    rows = []
    for label, (rule, extra_bytes) in RULES.items():
        model = bf16_copy(tokenizer, base)
        start16 = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = select_parameters(model)
        es = strategy(params, args.lr)
        state = {}
        with torch.no_grad():
            for step, f in enumerate(fitness):
                for name, g in es.gradients(step, f):
                    rule(params[name], args.lr * g, state)
        rows.append((label, delta(model, start16), extra_bytes))
    rows.append(("fp32 master copy (lightning-es)", engine_steps(bf16_copy(tokenizer, base), fitness, args.lr), 4))

    print(f"{args.steps} ES steps, lr={args.lr:g}, sigma=1e-3, N={POPULATION}; "
          "bf16 weight change vs fp32 weight change")
    print(f"{'update rule':36s} {'cosine':>7s} {'norm ratio':>10s} {'extra bytes/weight':>19s}")
    rules = {}
    for label, realised, extra in rows:
        rules[label] = {"cosine": torch.nn.functional.cosine_similarity(intended, realised, dim=0).item(),
                        "norm_ratio": (realised.norm() / intended.norm()).item(), "extra_bytes_per_weight": extra}
        print(f"{label:36s} {rules[label]['cosine']:7.3f} {rules[label]['norm_ratio']:10.3f} {extra:19d}")
    write_result(args.out, {"steps": args.steps, "lr": args.lr, "rules": rules})


if __name__ == "__main__":
    main()
