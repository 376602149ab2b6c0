"""Evolution Strategies over the tensors of a perturbation: where the estimate ``g`` is assembled and applied.

One ES step, as in OpenAI-ES and the ES-at-scale paper:

1. ``members(step)``: N members, each with an integer seed (antithetic pairs share one seed with opposite signs);
2. for every member, inside ``perturbed(member)``, measure its fitness (higher is better; ``evaluation`` runs this
   loop over processes);
3. ``step(step, fitness)`` shapes the fitness (``shaping``: per prompt by default), forms
   ``g = sum_i f_i * eps_i / (N * sigma)`` and applies ``theta += lr * g``; or ``write_gradients`` puts ``-g`` into
   ``.grad`` for a torch optimizer to consume.

The ES-at-scale paper writes its step as ``alpha / N * sum_i f_i * eps_i``; that is ``lr * g`` with
``lr = alpha * sigma`` (alpha = 5e-4 and sigma = 1e-3 give lr = 5e-7, its setting for 0.5B-7B models).

What a member does to the model (full-rank noise in place, low-rank hooks, ZeRO-3 slices) is the ``perturbation``
object's business; this file only asks it for ``noise_sum`` and writes updates through its fp32 master copy. With
noise relative to each tensor's scale (``engine.scales``) the same formulas hold in those units. The weights training
started from are kept once (``start``, ``engine.start``), for anchored decay and for whoever else asks (``beta``'s
reference, the drift callbacks).
"""

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from .population import Member, Population
from .renamed import take_renamed
from .perturbations import Perturbation
from .perturbations.base import RELATIVE_NOISE
from .shaping import DEFAULT_FITNESS_SHAPING, get_fitness_shaping, min_prompts, uses_prompts
from .start import StartWeights


@dataclass
class StepStats:
    update_norm: float  # of the step applied to the weights
    gradient_norm: float = math.nan  # of the estimate g


def noise_coefficients(members: Sequence[Member], shaped_fitness: torch.Tensor) -> dict[int, float]:
    """Weight of each distinct noise seed: an antithetic pair contributes ``(f_plus - f_minus) * eps`` once."""
    coefficients: dict[int, float] = defaultdict(float)
    for member in members:
        coefficients[member.seed] += member.sign * float(shaped_fitness[member.index])
    return {seed: c for seed, c in coefficients.items() if c != 0.0}


def scored_members(fitness: torch.Tensor, scored: torch.Tensor | None) -> torch.Tensor:
    """The boolean mask of the members that take part in a step (all, when ``scored`` is None)."""
    if scored is None:
        return torch.ones(fitness.numel(), dtype=torch.bool)
    scored = torch.as_tensor(scored, dtype=torch.bool).flatten().cpu()
    if scored.numel() != fitness.numel():
        raise ValueError(f"scored has {scored.numel()} values for a population of {fitness.numel()}.")
    return scored


RENAMED_ARGUMENTS = {"lr": "learning_rate", "anchor_decay": "es_anchor_decay", "start_device": "es_start_device"}


class EvolutionStrategy:
    def __init__(
        self,
        perturbation: Perturbation,
        population_size: int = 16,
        learning_rate: float | None = None,
        antithetic: bool = True,
        fitness_shaping: str | Callable[[torch.Tensor], torch.Tensor] = DEFAULT_FITNESS_SHAPING,
        seed: int = 0,
        es_anchor_decay: float = 0.0,
        es_start_device: torch.device | str = "cpu",
        **renamed,
    ):
        """The knobs carry ``ESSettings``' names (``engine.settings``; ``build_evolution_strategy`` builds this from
        one); ``learning_rate`` is the step in the perturbation's units. ``es_start_device``: where the start weights
        are kept once something needs them (``keep_start``)."""
        values = take_renamed(renamed, RENAMED_ARGUMENTS, "EvolutionStrategy",
                              learning_rate=learning_rate, es_anchor_decay=es_anchor_decay,
                              es_start_device=es_start_device)
        learning_rate, es_anchor_decay, es_start_device = (values["learning_rate"], values["es_anchor_decay"],
                                                          values["es_start_device"])
        if learning_rate is None:
            raise TypeError("EvolutionStrategy needs learning_rate: the step in the perturbation's units (relative to "
                            "each tensor's scale when its noise is; ESSettings.step_size() gives it).")
        sigma = perturbation.sigma
        if not sigma > 0 or not math.isfinite(sigma):
            raise ValueError(f"sigma must be a positive finite number, got {sigma}.")
        if not learning_rate >= 0 or not math.isfinite(learning_rate):
            raise ValueError(f"learning_rate must be a non-negative finite number, got {learning_rate}.")
        if not es_anchor_decay >= 0:
            raise ValueError(f"es_anchor_decay must be non-negative, got {es_anchor_decay}.")
        self.perturbation = perturbation
        self.population = Population(population_size, antithetic, seed)
        self.learning_rate = learning_rate
        self.shape_fitness = fitness_shaping if callable(fitness_shaping) else get_fitness_shaping(fitness_shaping)
        self.anchor_decay = es_anchor_decay
        self.start_device = es_start_device
        self.start: StartWeights | None = None
        self.start_restored = False  # the start weights came from a checkpoint (else: from this run's weights)
        if es_anchor_decay:
            self.keep_start()

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.perturbation.params

    @property
    def master(self):
        return self.perturbation.master

    @property
    def sigma(self) -> float:
        return self.perturbation.sigma

    @property
    def population_size(self) -> int:
        return self.population.size

    def keep_start(self) -> StartWeights:
        """The weights training started from, kept from the first call on (call it before the first step, or after
        ``load_state_dict`` of a checkpoint that holds them); one copy, whoever asks."""
        if self.start is None:
            values = {name: self.master.value(name) for name in self.params}
            self.start = StartWeights(self.params, values, device=self.start_device,
                                      after_write=self.perturbation.written)
        return self.start

    def members(self, step: int) -> list[Member]:
        members = self.population.members(step)
        self.perturbation.prepare(members)
        return members

    def perturbed(self, member: Member) -> AbstractContextManager[None]:
        return self.perturbation.apply(member)

    def check_fitness(self, fitness: torch.Tensor, scored: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``fitness`` as float64 and the mask of the members that take part; the fitness of a member left out
        (``scored`` False) is ignored, that of any other must be finite."""
        fitness = torch.as_tensor(fitness, dtype=torch.float64).flatten().cpu()
        if fitness.numel() != self.population_size:
            raise ValueError(f"fitness has {fitness.numel()} values for a population of {self.population_size}.")
        scored = scored_members(fitness, scored)
        bad = torch.nonzero(scored & ~torch.isfinite(fitness)).flatten().tolist()
        if bad:
            raise ValueError(f"fitness of members {bad} is not finite ({fitness[bad].tolist()}).")
        return fitness, scored

    def shaped(self, fitness: torch.Tensor, scored: torch.Tensor | None = None,
               per_prompt: torch.Tensor | None = None, penalty: torch.Tensor | None = None) -> torch.Tensor:
        """The shaped fitness of the members that take part, 0 for those left out; all 0 when fewer than two take
        part (one member alone says nothing about a direction). ``per_prompt``: (N, prompts) mean rewards, for a
        shaping that reads them (``prompt_zscore``, ``evidence_zscore``). ``penalty``: per member, subtracted from the
        shaped fitness, centred over the members (GRPO's KL term beside its normalised advantages)."""
        return self._shaped(*self.check_fitness(fitness, scored), per_prompt, penalty)

    def _shaped(self, fitness: torch.Tensor, scored: torch.Tensor, per_prompt: torch.Tensor | None,
                penalty: torch.Tensor | None) -> torch.Tensor:
        shaped = torch.zeros_like(fitness)
        if int(scored.sum()) >= 2:
            if uses_prompts(self.shape_fitness):
                if per_prompt is None:
                    if min_prompts(self.shape_fitness):
                        raise ValueError("this fitness shaping weighs the evidence per prompt: pass per_prompt.")
                    per_prompt = torch.empty(fitness.numel(), 0, dtype=torch.float64)
                values = self.shape_fitness(fitness[scored], torch.as_tensor(per_prompt).cpu()[scored])
            else:
                values = self.shape_fitness(fitness[scored])
            if penalty is not None:
                charged = torch.as_tensor(penalty, dtype=torch.float64).cpu()[scored]
                values = values - (charged - charged.mean())
            shaped[scored] = values.to(shaped)
        return shaped

    def gradients(self, step: int, fitness: torch.Tensor, scored: torch.Tensor | None = None,
                  per_prompt: torch.Tensor | None = None, penalty: torch.Tensor | None = None):
        """Yield ``(name, g)`` for every evolved tensor; only one tensor's estimate is alive at a time."""
        coefficients, divisor = self._coefficients(step, *self.check_fitness(fitness, scored), per_prompt, penalty)
        for name in self.params:
            yield name, self.perturbation.noise_sum(coefficients, name).div_(divisor)

    def _coefficients(self, step: int, fitness: torch.Tensor, scored: torch.Tensor, per_prompt: torch.Tensor | None,
                      penalty: torch.Tensor | None) -> tuple[dict[int, float], float]:
        """The noise coefficients and ``N * sigma``, N counting the members that take part (checked fitness)."""
        return (noise_coefficients(self.members(step), self._shaped(fitness, scored, per_prompt, penalty)),
                max(int(scored.sum()), 1) * self.sigma)

    def step(self, step: int, fitness: torch.Tensor, lr: float | None = None, scored: torch.Tensor | None = None,
             per_prompt: torch.Tensor | None = None, penalty: torch.Tensor | None = None) -> StepStats:
        """Apply ``theta += lr * g`` through the fp32 master copy; the reported norm is that of the applied step.
        ``scored``: which members take part (default all); the others' fitness is ignored and N counts the rest.
        ``per_prompt`` and ``penalty``: see ``shaped``.

        With ``anchor_decay`` (lambda) the step is followed by ``theta <- theta_0 + (1 - lr * lambda) (theta -
        theta_0)``: a pull towards the starting weights that bounds the random walk of weakly constrained directions.
        """
        lr = self.learning_rate if lr is None else lr
        fitness, scored = self.check_fitness(fitness, scored)
        if not self.anchor_decay:  # lr * g goes straight in: the perturbation may add it without a dense tensor
            coefficients, divisor = self._coefficients(step, fitness, scored, per_prompt, penalty)
            noise_squared = sum(self.perturbation.add_noise_sum(coefficients, name, lr / divisor)
                                for name in self.params)
            gradient_norm = math.sqrt(self.perturbation.total_squared_norm(noise_squared)) / divisor
            update_norm = lr * gradient_norm
        else:
            gradient_squared = update_squared = 0.0
            for name, update in self.gradients(step, fitness, scored, per_prompt, penalty):
                gradient_squared += float(update.double().pow(2).sum())
                update.mul_(lr)
                anchor = self.start.value(name, update.device)
                moved = self.master.value(name).to(update.device) + update - anchor
                update.sub_(moved, alpha=lr * self.anchor_decay)
                update_squared += float(update.double().pow(2).sum())
                self.master.add_(name, update)
            gradient_norm = math.sqrt(self.perturbation.total_squared_norm(gradient_squared))
            update_norm = math.sqrt(self.perturbation.total_squared_norm(update_squared))
        self.perturbation.written()
        return StepStats(update_norm=update_norm, gradient_norm=gradient_norm)

    def write_gradients(self, step: int, fitness: torch.Tensor, scored: torch.Tensor | None = None,
                        per_prompt: torch.Tensor | None = None, penalty: torch.Tensor | None = None) -> StepStats:
        """Store ``-g`` in ``.grad`` (optimizers minimise), for a torch optimizer to take the step.

        Call ``master.sync_from_model()`` after the optimizer has stepped. The reported norms are that of ``g``.
        """
        fitness, scored = self.check_fitness(fitness, scored)
        squared_norm = 0.0
        for name, gradient in self.gradients(step, fitness, scored, per_prompt, penalty):
            squared_norm += float(gradient.double().pow(2).sum())
            p = self.params[name]
            p.grad = gradient.neg_().to(p.dtype)
        norm = math.sqrt(self.perturbation.total_squared_norm(squared_norm))
        return StepStats(update_norm=norm, gradient_norm=norm)

    def state_dict(self) -> dict:
        """What a checkpoint needs beyond the model's weights: the noise seed, for weights stored below fp32 the exact
        fp32 master copy, the start weights when kept, and relative noise's scales; whole tensors (a collective when
        sharded, after which only process 0 holds them)."""
        state = {"seed": self.population.seed, "noise": self.perturbation.noise_kind,
                 "population_size": self.population_size}
        if any(p.dtype != torch.float32 for p in self.params.values()):
            state["master"] = self.perturbation.full_tensors(self.master.copies)
        if self.start is not None:
            state["start"] = self.perturbation.full_tensors(self.start.state_dict())
        scales = self.perturbation.scales
        if scales:
            state["scales"] = {  # one value for a tensor (a matrix's RMS, a floor), or one per entry (a vector's)
                "per_tensor": {name: float(s) for name, s in scales.items() if s.dim() == 0},
                "per_entry": self.perturbation.full_tensors({name: s for name, s in scales.items() if s.dim() > 0}),
            }
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Adopt ``state_dict()`` after the model's weights were loaded; without a master copy they are exact."""
        if state.get("seed", self.population.seed) != self.population.seed:
            raise ValueError(
                f"the checkpoint was trained with ES seed {state['seed']}, this run has {self.population.seed}: resume "
                "with the seed it was trained with (ESConfig.seed; ESStrategy(seed=...) or seed_everything)."
            )
        if state.get("population_size", self.population_size) != self.population_size:
            raise ValueError(
                f"the checkpoint was trained with population_size={state['population_size']}, this run has "
                f"{self.population_size}: resume with the population it was trained with, or start a new run.")
        noise = self.perturbation.noise_kind
        if "noise" not in state:
            warnings.warn(
                f"the checkpoint does not record its noise (written before checkpoints did); this run continues it with "
                f"{noise!r} noise. "
                "ESConfig's default perturbation changed from 'full' to 'lowrank': set the one it was trained with.",
                stacklevel=2)
        elif state["noise"] != noise:
            units = self.perturbation.scale_kind
            if state["noise"] + units == noise:
                raise ValueError(
                    f"the checkpoint was trained with absolute noise ({state['noise']!r}), this run uses noise relative "
                    "to each tensor's scale (the default since relative units): resume with sigma and learning_rate set "
                    "as it was trained (ESConfig's defaults then: sigma=1e-2, learning_rate=1e-4; a learning_rate set "
                    "without sigma in 0.1.0 trained with absolute noise, sigma=1e-2: add sigma=1e-2; ESStrategy's: "
                    "population_size=32, perturbation='full', sigma=1e-3, learning_rate=5e-7; checkpoints of then do "
                    "not record their population: set it too).")
            if state["noise"] == noise + RELATIVE_NOISE:
                raise ValueError(
                    f"the checkpoint was trained with noise relative to each tensor's scale ({state['noise']!r}), this "
                    "run uses absolute noise (sigma): resume with relative_sigma and relative_learning_rate instead.")
            before = " (low-rank noise then evolved nn.Linear weights only, not every parameter)" if state[
                "noise"].startswith("lowrank(") and "every parameter" not in state["noise"] else ""
            raise ValueError(
                f"the checkpoint was trained with {state['noise']!r} noise{before}, this run uses {noise!r}: resume with "
                "the perturbation (and perturbation_rank) it was trained with, or start a new run."
            )
        if "master" in state:
            self.master.load_state_dict(self.perturbation.local_tensors(state["master"]))
        else:
            self.master.sync_from_model()
        if "scales" in state:
            scales = {name: torch.tensor(s) for name, s in state["scales"]["per_tensor"].items()}
            self.perturbation.set_scales(scales | self.perturbation.local_tensors(state["scales"]["per_entry"]))
        start = state.get("start", state.get("anchor"))  # "anchor": an fp32 copy, as versions before 0.2 saved it
        if start is not None:
            saved = self.perturbation.local_tensors(start)
            if self.start is None:
                self.start = StartWeights(self.params, saved, device=self.start_device,
                                          after_write=self.perturbation.written)
            else:
                self.start.load_state_dict(saved)
            self.start_restored = True
        elif self.anchor_decay:
            raise ValueError(
                "the checkpoint holds no start weights for anchor_decay (it was trained without it): resume with "
                "es_anchor_decay=0, or start a new run."
            )
        elif self.start is not None:  # kept before the checkpoint was read, which has none: the resumed weights
            self.start.load_state_dict({name: self.master.value(name) for name in self.params})
        self.perturbation.written()
