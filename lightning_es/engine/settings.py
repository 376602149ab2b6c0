"""``ESSettings``: every knob of the ES algorithm once, with its one name, default, unit rule and validation.

Both integrations take these fields under these names: ``trl_ext.ESConfig`` is ``GRPOConfig`` plus these fields (and
the generation knobs only a TRL run has), ``ESStrategy(**fields)`` takes them as keyword arguments. A knob added here
appears in both, in the README's table (a test compares them) and in ``docs/grpo_fields.md``.

Naming rule for the ``es_`` prefix: the ES algorithm's own terms, as the ES papers and evosax write them, are bare
(``population_size``, ``sigma``, ``antithetic``, ``fitness_shaping``, ``perturbation``, ...); a knob that sits beside a
TRL or transformers setting of the same kind carries ``es_``, so that a GRPO user tells it from the field they know
(``es_params`` beside the trainable parameters, ``es_anchor_decay`` beside ``weight_decay``, ``es_master_device`` and
``es_start_device`` beside device placement; in ``ESConfig`` also ``es_greedy`` beside the sampling fields,
``es_optimizer`` beside ``optim``, ``es_max_generation_rows`` beside ``generation_batch_size``).

Units: relative (the default): ``relative_sigma`` and ``relative_learning_rate`` are fractions of each tensor's own
scale (``engine.scales``); absolute: ``sigma``, with ``learning_rate`` as the step, as the ES papers write them.
``learning_rate`` is always the step, in the units of the noise: a fraction of each tensor's scale under relative noise
(``relative_learning_rate`` is the same step under its explicit name), absolute beside ``sigma``; with an optimizer
taking the step, that optimizer's learning rate. The units follow from which noise field is set, never from a value, so
a logged step copied into ``learning_rate`` runs the same step.
"""

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .perturbations import PERTURBATIONS, refuse_on_zero3
from .scales import DEFAULT_RELATIVE_LEARNING_RATE, DEFAULT_RELATIVE_SIGMA, check_relative
from .shaping import DEFAULT_FITNESS_SHAPING, FITNESS_SHAPING

DEFAULT_LEARNING_RATE = DEFAULT_RELATIVE_LEARNING_RATE  # in relative units, the default ones


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ESSettings:
    """The ES knobs both integrations share. Defaults: tuned on validation accuracy in docs/reports/accuracy-race/
    (16 members, per-prompt normalisation, rank-4 noise, relative units; the noise's scale from
    docs/reports/noise-scale/)."""

    population_size: int = field(default=16, metadata=_help(
        "Members per ES iteration (N); 16 gained more validation accuracy than 8 (twice the iterations) in the "
        "accuracy race's tuning."))
    sigma: float | None = field(default=None, metadata=_help(
        "Absolute noise: the standard deviation of the weight perturbations (learning_rate is then the step). Unset: "
        "relative noise (relative_sigma)."))
    learning_rate: float | None = field(default=None, metadata=_help(
        "The ES step lr in theta += lr * g, in the units of the noise: a fraction of each tensor's scale under relative "
        "noise (the default), absolute beside sigma (the ES-at-scale paper's alpha times sigma, e.g. 5e-7 with sigma "
        "1e-3; then it must be set). With an optimizer taking the step (ESConfig's es_optimizer='trainer', or "
        f"configure_optimizers), that optimizer's learning rate. Unset: {DEFAULT_LEARNING_RATE} (relative)."))
    relative_sigma: float | None = field(default=None, metadata=_help(
        "Noise as a fraction of each tensor's scale (RMS of a matrix, magnitude of a vector's entries, at the start). "
        f"Unset: {DEFAULT_RELATIVE_SIGMA} unless sigma is set."))
    relative_learning_rate: float | None = field(default=None, metadata=_help(
        "learning_rate under its explicit name, for relative noise only (lr / relative_sigma is the ES-at-scale "
        "paper's alpha as a fraction of each tensor's scale). Unset: learning_rate. Follows the learning-rate "
        "schedule as learning_rate does."))
    antithetic: bool = field(default=True, metadata=_help(
        "Evaluate mirrored pairs theta +- sigma*eps (population_size must be even)."))
    fitness_shaping: str = field(default=DEFAULT_FITNESS_SHAPING, metadata=_help(
        "How fitness is normalised: 'zscore', 'centered_rank', 'evidence_zscore' (the z-score scaled by the "
        "evidence that members differ beyond chance, read per prompt: a step only as large as the signal), or "
        "'prompt_zscore' (the default: GRPO's group normalisation per prompt across the members, averaged, a tied "
        "prompt counting 0, so that the step shrinks with the evidence; with one prompt, or a scalar fitness, it is "
        "the z-score)."))
    perturbation: str = field(default="lowrank", metadata=_help(
        "'lowrank' (docs/perturbations.md): rank-`perturbation_rank` noise on matrices (full-rank on vectors) through "
        "forward hooks, every evolved parameter, the whole population in one batch. 'full': full-rank noise written "
        "into the weights, one member at a time; needed for DeepSpeed ZeRO-3 and for weights equal bit for bit on 1 "
        "or K processes."))
    perturbation_rank: int = field(default=4, metadata=_help("Rank of the low-rank perturbations."))
    es_params: list[str] | None = field(default=None, metadata=_help(
        "Parameters that evolve: unset for every trainable parameter (a PEFT model's adapters), 'all', 'lora', or "
        "regular expressions matched against parameter names."))
    es_anchor_decay: float = field(default=0.0, metadata=_help(
        "Anchored weight decay lambda: after each step theta <- theta_0 + (1 - lr*lambda) (theta - theta_0). 0 "
        "(default) is off; costs one more fp32 copy of the evolved weights."))
    es_master_device: str | None = field(default=None, metadata=_help(
        "Where the fp32 master copy of the evolved weights lives (default: beside each weight)."))
    es_start_device: str = field(default="cpu", metadata=_help(
        "Where the one copy of the starting weights lives when something needs it (beta's reference, es_anchor_decay, "
        "the drift callbacks): host memory by default; the accelerator saves the transfers."))

    def __post_init__(self):
        self.check(optimizer_steps=False)

    # ---- validation and units ------------------------------------------------------------------------------------

    def check(self, optimizer_steps: bool) -> None:
        """Validate every field and resolve the units in place. ``optimizer_steps``: a torch optimizer takes the step
        (``es_optimizer="trainer"``), with ``learning_rate`` in its own units, so there is no relative step."""
        if self.population_size < 2:
            raise ValueError(f"population_size must be at least 2, got {self.population_size}.")
        if self.antithetic and self.population_size % 2:
            raise ValueError(
                f"population_size must be even when antithetic=True, got {self.population_size}: "
                f"use {self.population_size + 1} or set antithetic=False.")
        self._resolve_units(optimizer_steps)
        if not (callable(self.fitness_shaping) or self.fitness_shaping in FITNESS_SHAPING):
            raise ValueError(f"fitness_shaping must be one of {sorted(FITNESS_SHAPING)} (or a callable), got "
                             f"{self.fitness_shaping!r}.")
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {self.perturbation!r}.")
        if self.perturbation_rank < 1:
            raise ValueError(f"perturbation_rank must be at least 1, got {self.perturbation_rank}.")
        if not self.es_anchor_decay >= 0:
            raise ValueError(f"es_anchor_decay must be non-negative, got {self.es_anchor_decay}.")
        if optimizer_steps:
            self.check_optimizer()
        for name in ("es_start_device", "es_master_device"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                torch.device(value)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"{name}={value!r} is not a device ({error}); use e.g. 'cpu' or 'cuda'.") from None

    def _resolve_units(self, optimizer_steps: bool) -> None:
        if self.sigma is not None:
            if not (self.sigma > 0 and math.isfinite(self.sigma)):
                raise ValueError(f"sigma must be positive and finite, got {self.sigma}.")
            for name in ("relative_sigma", "relative_learning_rate"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"sigma={self.sigma} (absolute noise, with learning_rate as the step) and {name}="
                        f"{getattr(self, name)} (relative noise) were both set: set one of the two units.")
            if self.learning_rate is None:
                if not optimizer_steps:
                    raise ValueError(
                        f"sigma={self.sigma} makes the noise absolute, so the step is absolute too: set learning_rate "
                        "with it (the ES-at-scale paper: sigma=1e-3, learning_rate=5e-7), or leave sigma unset for "
                        "relative noise.")
                self.learning_rate = DEFAULT_LEARNING_RATE
            if not (self.learning_rate >= 0 and math.isfinite(self.learning_rate)):
                raise ValueError(f"learning_rate must be a non-negative finite number, got {self.learning_rate}.")
            return
        if self.relative_sigma is None:
            self.relative_sigma = DEFAULT_RELATIVE_SIGMA
        if optimizer_steps:  # the optimizer steps with learning_rate, in its own units
            if self.learning_rate is None:
                self.learning_rate = DEFAULT_LEARNING_RATE
            if self.relative_learning_rate is not None:
                raise ValueError(
                    f"relative_learning_rate={self.relative_learning_rate} is the in-place ES step (es_optimizer='sgd'); "
                    "with es_optimizer='trainer' the Trainer's optimizer steps with learning_rate. Set that instead.")
            check_relative(self.relative_sigma, None)
            return
        if self.relative_learning_rate is None:
            if self.learning_rate is None:
                self.learning_rate = DEFAULT_LEARNING_RATE
            self.relative_learning_rate = self.learning_rate
            check_relative(self.relative_sigma, self.relative_learning_rate, step_name="learning_rate")
            return
        if self.learning_rate not in (None, self.relative_learning_rate):
            raise ValueError(
                f"learning_rate={self.learning_rate} and relative_learning_rate={self.relative_learning_rate} are two "
                "values of one step (under relative noise learning_rate is relative too): set one of them.")
        check_relative(self.relative_sigma, self.relative_learning_rate)
        self.learning_rate = self.relative_learning_rate

    def check_optimizer(self) -> None:
        """Refuse what a torch optimizer taking the step (instead of the in-place ES step) cannot honour."""
        if self.es_anchor_decay:
            raise ValueError(
                f"es_anchor_decay={self.es_anchor_decay} pulls the in-place ES step towards the starting weights, but "
                "an optimizer takes the step instead (ESConfig: es_optimizer='trainer'; ESStrategy: configure_optimizers "
                "returned an optimizer). Use the optimizer's weight_decay, or the in-place step (ESConfig: "
                "es_optimizer='sgd'; ESStrategy: return None from configure_optimizers).")

    def check_sharded(self) -> None:
        """Refuse what the sharded layout (DeepSpeed ZeRO-3) cannot run."""
        refuse_on_zero3(self.perturbation)

    # ---- what the engine reads -----------------------------------------------------------------------------------

    @property
    def relative_noise(self) -> bool:
        return self.sigma is None

    @property
    def noise_sigma(self) -> float:
        """The noise's standard deviation in the units in use (a fraction of each tensor's scale when relative)."""
        return self.relative_sigma if self.relative_noise else self.sigma

    def step_size(self, scheduled: float | None = None) -> float:
        """The step for the schedule's current ``scheduled`` learning rate: the same fraction of
        relative_learning_rate as scheduled is of learning_rate (the learning rate itself under absolute noise or an
        optimizer's step)."""
        scheduled = self.learning_rate if scheduled is None else scheduled
        if not self.relative_noise or self.relative_learning_rate is None:
            return scheduled
        return self.relative_learning_rate * (scheduled / self.learning_rate if self.learning_rate else 1.0)

    @property
    def param_spec(self) -> str | Sequence[str] | None:
        """``es_params`` as ``select_parameters`` takes it (a command line gives a list of one "all" or "lora")."""
        spec = self.es_params
        if isinstance(spec, (list, tuple)) and len(spec) == 1 and spec[0] in ("all", "lora"):
            return spec[0]
        return spec

    @property
    def shaping(self):
        return self.fitness_shaping if callable(self.fitness_shaping) else FITNESS_SHAPING[self.fitness_shaping]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(ESSettings)]
