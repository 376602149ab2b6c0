"""Which noise each population member uses at a given step."""

from dataclasses import dataclass

from .noise import derive_seed


@dataclass(frozen=True)
class Member:
    index: int
    seed: int
    sign: float  # +1.0, or -1.0 for the mirrored half of an antithetic pair


class Population:
    """Seeds for step ``t`` are a pure function of ``(seed, t)``: a resumed run needs only the step to continue."""

    def __init__(self, size: int, antithetic: bool = True, seed: int = 0):
        if size < 2:
            raise ValueError(f"population_size must be at least 2, got {size}.")
        if antithetic and size % 2:
            raise ValueError(
                f"population_size must be even with antithetic pairs, got {size}: "
                f"use {size + 1}, or set antithetic=False."
            )
        self.size = size
        self.antithetic = antithetic
        self.seed = seed

    def members(self, step: int) -> list[Member]:
        if not self.antithetic:
            return [Member(i, derive_seed(self.seed, step, i), 1.0) for i in range(self.size)]
        members = []
        for pair in range(self.size // 2):
            pair_seed = derive_seed(self.seed, step, pair)
            members += [Member(2 * pair, pair_seed, 1.0), Member(2 * pair + 1, pair_seed, -1.0)]
        return members
