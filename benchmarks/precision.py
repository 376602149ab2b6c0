"""How much of an ES update survives in bf16 weights, for four ways of applying it.

Runs 20 ES steps with the same seeds and fitness values on an fp32 model and on bf16 copies, and prints how close
each bf16 model's weight change is to the fp32 one (cosine, norm ratio) and the extra memory per evolved weight.

    python benchmarks/precision.py [--steps 20] [--lr 5e-7]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import build_model, build_tokenizer  # noqa: E402

from lightning_es import EvolutionStrategy, FullRankPerturbation, select_parameters  # noqa: E402


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


def delta(model, start):
    return torch.cat([(p.detach().double() - start[n].double()).flatten() for n, p in model.named_parameters()])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-7)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    base = build_model(tokenizer).bfloat16().float()
    fitness = [torch.rand(32) for _ in range(args.steps)]

    reference = build_model(tokenizer).bfloat16().float()
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    es = EvolutionStrategy(FullRankPerturbation(select_parameters(reference), sigma=1e-3), lr=args.lr, seed=1)
    for step, f in enumerate(fitness):
        es.step(step, f)
    intended = delta(reference, start)

    rows = []
    for label, (rule, extra_bytes) in RULES.items():
        model = build_model(tokenizer).bfloat16()
        model.load_state_dict(base.state_dict())
        start16 = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = select_parameters(model)
        es = EvolutionStrategy(FullRankPerturbation(params, sigma=1e-3), lr=args.lr, seed=1)
        state = {}
        with torch.no_grad():
            for step, f in enumerate(fitness):
                for name, g in es.gradients(step, f):
                    rule(params[name], args.lr * g, state)
        rows.append((label, delta(model, start16), extra_bytes))

    model = build_model(tokenizer).bfloat16()
    model.load_state_dict(base.state_dict())
    start16 = {n: p.detach().clone() for n, p in model.named_parameters()}
    es = EvolutionStrategy(FullRankPerturbation(select_parameters(model), sigma=1e-3), lr=args.lr, seed=1)
    for step, f in enumerate(fitness):
        es.step(step, f)
    rows.append(("fp32 master copy (lightning-es)", delta(model, start16), 4))

    print(f"{args.steps} ES steps, lr={args.lr:g}, sigma=1e-3, N=32; bf16 weight change vs fp32 weight change")
    print(f"{'update rule':36s} {'cosine':>7s} {'norm ratio':>10s} {'extra bytes/weight':>19s}")
    for label, realised, extra in rows:
        cosine = torch.nn.functional.cosine_similarity(intended, realised, dim=0).item()
        print(f"{label:36s} {cosine:7.3f} {(realised.norm() / intended.norm()).item():10.3f} {extra:19d}")


if __name__ == "__main__":
    main()
