"""``ESStrategy``: Evolution Strategies as a Lightning strategy (``Trainer(strategy="es")``).

The LightningModule's ``training_step`` returns a fitness (a scalar, higher is better) for the module's current
weights on the batch, or one fitness per example (a 1-D tensor, whose mean is the fitness; the default
``fitness_shaping="prompt_zscore"`` normalises each example across the members, and ``"evidence_zscore"`` weighs
them). With ``ESStrategy(mode="min")`` it returns a loss instead
(lower is better, e.g. a ``training_step`` ported from a module trained by gradient descent) and the fitness is the
negated loss. Per batch the strategy runs the engine's iteration
(``engine.iteration.run_iteration``) with a scoring function that calls ``training_step``: each process scores its share of the population (perturb, ``training_step``, restore), only fitness and logged scalars travel
between processes, an error on one process (a bad fitness, differing logged names, an exception) is raised with the
same message on all of them, and every process applies the same update:

- ``configure_optimizers`` returns an optimizer: ``-g`` is written into ``.grad`` and that optimizer steps (Adam on
  ES estimates, schedulers, weight decay, gradient clipping);
- it returns nothing: ``theta += lr * g`` is applied in place, with no gradient buffers.

Replicated layout (default): every process holds the model, sees the same batch and scores
``population_size / world_size`` members. Sharded layout (``deepspeed_config`` with ZeRO stage 3): the processes hold
one model partitioned by DeepSpeed, score every member together, each on its own part of the batch, and perturb and
update only their slices (``engine.perturbations.ShardedPerturbation``), so the weights follow the replicated run's.

The ES knobs are ``ESSettings``' fields, named and defaulted as in ``ESConfig`` (``lightning_es.engine.settings``):
noise and step relative to each tensor's scale by default, absolute with ``sigma`` and ``learning_rate``.

``self.log`` inside ``training_step`` logs the population mean under the name and the fittest member's value under
``<name>/best`` (``population_log``). The strategy logs the ``es/`` metrics both integrations log
(``engine.step_metrics``, docs/logged_metrics.md); the returned loss is ``-es/fitness_mean``. The fitness is always
what ES maximises: with ``mode="min"``, ``es/fitness_*`` are of the negated losses (``es/fitness_max`` is minus the
lowest loss) and the returned loss is the population's mean loss.

Importing this module registers ``"es"`` (and ``"es_zero3"``, the sharded layout with a minimal ZeRO-3 config) in
``pytorch_lightning``'s strategy registry. ``lightning_es.unified`` builds this module on ``lightning.pytorch`` (for
``import lightning as L``), and importing it registers them in that package's registry.
"""

import os
import warnings

import torch
from lightning_fabric.utilities.data import has_len
from pytorch_lightning.core.optimizer import _MockOptimizer
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.trainer.states import TrainerFn

from ..engine import EvolutionStrategy, Population, Processes
from ..engine.build import build_evolution_strategy
from ..engine.evaluation import MemberScores
from ..engine.iteration import Iteration, run_iteration
from ..engine.step_metrics import step_metrics
from ..engine.settings import ESSettings
from ..engine.shaping import min_prompts
from ..engine.zero3 import check_zero3_config
from .checkpoint_io import AtomicCheckpointIO
from .population_log import PopulationLog
from .resumable_loader import ResumableLoader

ES_STATE_KEY = "es_strategy"
MODE_KEY = "es_strategy_mode"  # what training_step's value is: resuming under the other mode would reverse the goal
ZERO3_DEFAULTS = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
MODES = ("max", "min")  # what training_step returns: a fitness to maximise, or a loss to minimise


def _parameters_by_module(module: torch.nn.Module):
    """``(prefix, [(name, parameter), ...])`` for each submodule holding parameters of its own: what a ZeRO-3 save or
    load gathers at once, so that no process holds more than one module's whole parameters (tied ones appear under
    each module that holds them, as in ``state_dict``)."""
    for prefix, submodule in module.named_modules(remove_duplicate=False):  # a shared module under each of its names
        owned = list(submodule.named_parameters(recurse=False, remove_duplicate=False))
        if owned:
            yield (f"{prefix}." if prefix else ""), owned


def _fitness_values(output) -> torch.Tensor:
    """The fitness ``training_step`` returned: a scalar, or one value per example (1-D)."""
    if output is None:
        raise ValueError(
            "training_step returned None. Under strategy='es' it must return the fitness of the current weights on "
            "the batch: a scalar (float or one-element tensor), higher is better."
        )
    if isinstance(output, dict):
        raise ValueError(
            f"training_step returned a dict ({sorted(output)}). Under strategy='es' return the fitness itself: a "
            "scalar, higher is better (log other values with self.log)."
        )
    value = torch.as_tensor(output, dtype=torch.float64).detach().cpu()
    if value.dim() > 1 or value.numel() == 0:
        raise ValueError(
            f"training_step returned a tensor of shape {tuple(value.shape)}; the fitness must be a scalar or one value "
            "per example (1-D). Reduce it, e.g. rewards.mean()."
        )
    if not torch.isfinite(value).all():
        shown = float(value) if value.dim() == 0 else value.tolist()
        raise ValueError(f"training_step returned a fitness of {shown}; it must be finite. Check the reward for NaN "
                         "or inf.")
    return value


# ESConfig's knobs that only a TRL run has
TRL_ONLY = {"es_greedy", "es_optimizer", "es_max_generation_rows", "beta", "num_generations"}
# the names ESStrategy's knobs had before they took ESConfig's
RENAMED = {"lr": "learning_rate", "params": "es_params", "rank": "perturbation_rank", "anchor_decay": "es_anchor_decay",
           "master_device": "es_master_device", "start_device": "es_start_device"}


class ESStrategy(DDPStrategy):
    strategy_name = "es"

    def __init__(
        self,
        settings: ESSettings | None = None,
        seed: int | None = None,
        deepspeed_config: dict | str | os.PathLike | None = None,
        mode: str = "max",
        **kwargs,
    ):
        """Every ES knob is a field of ``ESSettings`` (``lightning_es.engine.settings``), under the name ``ESConfig``
        gives it, with the same default: pass them as keyword arguments (``ESStrategy(population_size=32,
        relative_sigma=0.05)``) or as one ``settings`` object. With an optimizer from ``configure_optimizers``, its
        learning rate steps instead of ``learning_rate`` / ``relative_learning_rate``.

        Args:
            settings: an ``ESSettings`` (or ``ESConfig``) to take every ES knob from, instead of keyword arguments.
            seed: noise seed; None takes ``seed_everything``'s seed (``PL_GLOBAL_SEED``), else 0.
            deepspeed_config: a DeepSpeed config (dict or JSON path) with ZeRO stage 3 for the sharded layout.
            mode: ``"max"``: ``training_step`` returns a fitness, which ES raises; ``"min"``: it returns a loss, which
                ES lowers (the fitness, and ``es/fitness_*``, are the negated loss).
            kwargs: ``ESSettings`` fields, and ``DDPStrategy``'s arguments (``process_group_backend``, ``timeout``,
                ``start_method``, ...).
        """
        if mode not in MODES:
            raise ValueError(f"ESStrategy(mode={mode!r}): mode is 'max' (training_step returns a fitness, higher is "
                             "better) or 'min' (it returns a loss, lower is better).")
        renamed = {old: new for old, new in RENAMED.items() if old in kwargs}
        if renamed:
            raise TypeError("ESStrategy's knobs have ESConfig's names: " + ", ".join(
                f"{old}= is {new}=" for old, new in renamed.items()) + ".")
        if settings is not None and not isinstance(settings, ESSettings):
            raise TypeError(f"ESStrategy's first argument is settings (an ESSettings or ESConfig), got {settings!r}: "
                            "pass the ES knobs by name, e.g. ESStrategy(population_size=32).")
        trl_only = sorted(TRL_ONLY & set(kwargs))
        if trl_only:
            raise TypeError(f"ESStrategy got {trl_only}: these are ESConfig's (TRL's decoding, optimizer and "
                            "generation), with no counterpart here. training_step decides decoding; return an optimizer "
                            "from configure_optimizers to have it step.")
        # None is "unset" for every knob (learning_rate's unset is its default)
        knobs = {name: kwargs.pop(name) for name in ESSettings.field_names() if name in kwargs}
        knobs = {name: value for name, value in knobs.items() if value is not None}
        if settings is not None and knobs:
            raise TypeError(f"ESStrategy got settings and the knobs {sorted(knobs)}: set them on settings instead.")
        self.settings = ESSettings(**knobs) if settings is None else settings
        kwargs.setdefault("checkpoint_io", AtomicCheckpointIO())
        super().__init__(**kwargs)
        self.seed = seed
        self.mode = mode
        self.deepspeed_config = check_zero3_config(deepspeed_config) if deepspeed_config is not None else None
        if self.deepspeed_config is not None:
            self.settings.check_sharded()
        self.es: EvolutionStrategy | None = None
        self._iteration: Iteration | None = None
        self._engine = None
        self._hf_deepspeed_config = None

    # ---- layout ----------------------------------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        return self.deepspeed_config is not None

    @property
    def distributed_sampler_kwargs(self) -> dict:
        if self.sharded:  # the group splits each batch
            return super().distributed_sampler_kwargs
        return {"num_replicas": 1, "rank": 0}  # every process scores its members on the same batch

    def process_dataloader(self, dataloader):
        """Training loaders resume in the middle of an epoch (``ResumableLoader``); the noise seeds follow the step,
        so a resumed run then scores exactly the batches, and members, of the uninterrupted run."""
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer
        if not trainer.training or not has_len(dataloader):
            return dataloader
        return ResumableLoader(dataloader, lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the ES state (and ZeRO-3 partitions) exist only after setup

    def _configure_launcher(self) -> None:
        # the population's split over the processes, checked here, in the launching process, before any worker starts
        population = Population(self.settings.population_size, self.settings.antithetic)
        Processes(world_size=self.world_size, sharded=self.sharded).rounds(population.members(0), batched=False)
        super()._configure_launcher()

    def configure_ddp(self) -> None:
        """No DDP wrapper: nothing is differentiated, so there are no gradients to all-reduce."""
        if self.sharded:
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            # transformers reads this (through a weak reference, hence the attribute) to know that ZeRO-3 is on, so
            # that generate() keeps every process stepping until all are done (synced_gpus): a process whose
            # sequences end early must still join the parameter gathers of the others' forwards.
            self._hf_deepspeed_config = HfDeepSpeedConfig(self.deepspeed_config)
            self._engine, *_ = deepspeed.initialize(model=self.model, config=self.deepspeed_config, dist_init_required=False)

    def setup_optimizers(self, trainer) -> None:
        with warnings.catch_warnings():  # no optimizer is the in-place ES update, not a mistake
            warnings.filterwarnings("ignore", message=".*configure_optimizers.*returned `None`")
            super().setup_optimizers(trainer)

    @property
    def has_optimizer(self) -> bool:
        return not all(isinstance(o, _MockOptimizer) for o in self.optimizers)

    def setup(self, trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_trainer(trainer)
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_optimizers(trainer)
            if not self.sharded:
                module = self.lightning_module
                self._processes.synchronize([*module.parameters(), *module.buffers()])
            self.es = self._build_es()

    def teardown(self) -> None:
        self._hf_deepspeed_config = None  # transformers no longer treats models made in this process as ZeRO-3 ones
        if self.es is not None:
            self.es.perturbation.close()
        super().teardown()

    @property
    def _processes(self) -> Processes:
        return Processes(self.global_rank, self.world_size, self.sharded)

    def _check_trainer(self, trainer) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) does not apply to strategy='es': "
                "each batch is one ES iteration. Use a larger batch (or a larger population) instead."
            )
        if self.precision_plugin.precision == "16-mixed":
            raise ValueError(
                "precision='16-mixed' scales a loss for backward, which ES never calls; use '32-true', 'bf16-mixed' "
                "or 'bf16-true'."
            )

    def _check_optimizers(self, trainer) -> None:
        if trainer.gradient_clip_val and not self.has_optimizer:
            raise ValueError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips gradients, but configure_optimizers "
                "returned no optimizer, so ES updates in place and there are none. Return an optimizer from "
                "configure_optimizers, or drop gradient_clip_val."
            )
        if self.sharded and self.has_optimizer:
            raise ValueError(
                "The sharded layout (deepspeed_config) updates the ZeRO-3 partitions in place; configure_optimizers "
                "must return None (a torch optimizer cannot step partitioned parameters)."
            )
        if self.has_optimizer:
            self.settings.check_optimizer()

    def _build_es(self) -> EvolutionStrategy:
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        return build_evolution_strategy(self.settings, self.lightning_module, seed, sharded=self.sharded,
                                        copy_all=self.has_optimizer)

    # ---- one ES iteration per batch --------------------------------------------------------------------------

    def training_step(self, *args, **kwargs):
        module = self.lightning_module
        step = module.trainer.global_step
        if self.has_optimizer:
            self.es.master.sync_from_model()  # the optimizer moved the weights since the last iteration
        logs = PopulationLog()

        def score(members) -> MemberScores:
            (member,) = members  # a training_step scores one set of weights
            with (torch.no_grad(), self.precision_plugin.train_step_context(), self.es.perturbed(member),
                  logs.capture(module) as logged):
                values = _fitness_values(module.training_step(*args, **kwargs))
            if self.mode == "min":  # a loss: ES maximises its negation
                values = -values
            # sharded, each process holds its own examples, named apart; replicated, all see the same batch
            where = f"{self.global_rank}." if self.sharded else ""
            examples = {} if values.dim() == 0 else {f"{where}{i:06d}": [float(v)] for i, v in enumerate(values)}
            return MemberScores(fitness=[float(values.mean())], weight=[1.0], prompt_sums=examples,
                                prompt_counts={name: [1.0] for name in examples},
                                extra={name: [value] for name, value in logged.items()})

        def check(iteration: Iteration) -> None:
            logs.flush(module.log, iteration.scores, step)
            examples = iteration.per_prompt.shape[1]
            needed = min_prompts(self.es.shape_fitness)
            if examples < needed:
                raise ValueError(
                    f"fitness_shaping={self.settings.fitness_shaping!r} weighs the evidence per example, but "
                    f"training_step returned {'a scalar' if examples == 0 else 'one example'}: return one fitness per "
                    f"example (a 1-D tensor of at least {needed} values), or choose 'prompt_zscore'.")

        self._iteration = run_iteration(self.es, step, score, self._processes,
                                        update=None if self.has_optimizer else "step", check=check)
        self._log_step(self._iteration)
        return torch.tensor(-float(self._iteration.fitness.mean()), device=self.root_device)

    def _log_step(self, iteration: Iteration) -> None:
        step_size = None if self.has_optimizer else self.es.learning_rate
        metrics = step_metrics(iteration, self.es, self.settings, step_size)
        self.lightning_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        """Write ``-g`` into ``.grad`` for the optimizer (after the loop's ``zero_grad``); no autograd."""
        if self.has_optimizer:
            self.es.write_gradients(self.lightning_module.trainer.global_step, self._iteration.fitness,
                                    per_prompt=self._iteration.per_prompt,
                                    penalty=self._iteration.penalty)
        return closure_loss

    # ---- checkpoints carry the ES state ----------------------------------------------------------------------

    def lightning_module_state_dict(self) -> dict:
        if not self.sharded or self.es is None:
            return super().lightning_module_state_dict()
        import deepspeed

        module = self.lightning_module
        gathered = {}
        for prefix, owned in _parameters_by_module(module):  # one module's parameters gathered at a time
            with deepspeed.zero.GatheredParameters([p for _, p in owned], modifier_rank=None):
                if self.global_rank == 0:  # only process 0 writes checkpoints: the others keep no host copy
                    gathered |= {prefix + name: p.detach().cpu().clone() for name, p in owned}
        if self.global_rank != 0:
            return {}
        # in state_dict's order; its parameters are ZeRO-3 placeholders, its buffers (and extra states) whole
        return {name: gathered[name] if name in gathered else (t.detach().cpu().clone() if torch.is_tensor(t) else t)
                for name, t in module.state_dict().items()}

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if self.es is not None:
            checkpoint[ES_STATE_KEY] = self.es.state_dict()
            checkpoint[MODE_KEY] = self.mode
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        if self.sharded and self.es is not None:
            import deepspeed

            module = self.lightning_module
            saved = checkpoint["state_dict"]
            expected = set(module.state_dict())
            if strict and set(saved) != expected:
                raise RuntimeError(f"the checkpoint's state_dict does not match the module: missing "
                                   f"{sorted(expected - set(saved))[:5]}, unexpected {sorted(set(saved) - expected)[:5]}.")
            parameters = set()  # every name a parameter goes by (tied ones under each)
            for prefix, owned in _parameters_by_module(module):  # one module's parameters gathered at a time
                parameters |= {prefix + name for name, _ in owned}
                with deepspeed.zero.GatheredParameters([p for _, p in owned], modifier_rank=0), torch.no_grad():
                    if self.global_rank == 0:  # DeepSpeed re-partitions rank 0's values on exit
                        for name, p in owned:
                            if prefix + name in saved:
                                p.copy_(saved[prefix + name])
            module.load_state_dict({k: v for k, v in saved.items() if k not in parameters}, strict=False)  # buffers
        else:
            super().load_model_state_dict(checkpoint, strict)
        if self.es is None:
            return
        saved_mode = checkpoint.get(MODE_KEY, "max")  # checkpoints from before mode existed maximised
        if saved_mode != self.mode:
            raise ValueError(f"the checkpoint was trained with ESStrategy(mode={saved_mode!r}), this run has mode="
                             f"{self.mode!r}: resume with mode={saved_mode!r}, or ES would reverse what it optimises.")
        self.es.load_state_dict(checkpoint.get(ES_STATE_KEY, {}))

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(
            "es", cls, description="Evolution Strategies: population scored across processes, no gradients"
        )
        strategy_registry.register(
            "es_zero3", cls, description="Evolution Strategies over one DeepSpeed ZeRO-3 sharded model",
            deepspeed_config=ZERO3_DEFAULTS, perturbation="full",  # the sharded layout runs full-rank noise only
        )


if "es" not in StrategyRegistry:
    ESStrategy.register_strategies(StrategyRegistry)
