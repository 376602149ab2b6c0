"""What ``self.log`` does while a LightningModule's ``training_step`` runs once per population member.

Each call is recorded per member instead of reaching Lightning; the records travel with the fitness through the
population loop (``engine.evaluation``), and every name is then logged once: its population mean under the name
itself, and the value logged by the fittest member under ``<name>/best``. A name must be logged for every member (on
every process that scores it), or its population mean would count the others as 0: that is an error, the same on 1
or K processes. Values that are not scalars (a torchmetrics ``Metric`` object) pass through unchanged.
"""

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..engine import PopulationError, PopulationScores

PREFIX = "log/"  # a logged value's sum, among the scores' extra sums
COUNT = "logged/"  # how often each name was logged for a member


class PopulationLog:
    def __init__(self):
        self.options: dict[str, dict] = {}

    @contextmanager
    def capture(self, module) -> Iterator[dict[str, float]]:
        """Inside, ``module.log`` (and so ``module.log_dict``) records into the yielded dict instead of logging."""
        real_log = module.log
        signature = inspect.signature(real_log)
        recorded: dict[str, float] = {}

        def record(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            options = dict(bound.arguments)
            name, value = options.pop("name"), options.pop("value")
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, (int, float)):
                return real_log(*args, **kwargs)
            recorded[PREFIX + name] = float(value)
            recorded[COUNT + name] = 1.0
            self.options[name] = options

        module.log = record
        try:
            yield recorded
        finally:
            del module.log

    def flush(self, log: Callable, scores: PopulationScores, step: int) -> None:
        """Log each name's population mean and the fittest member's value, with the options of the recorded call.

        ``scores`` holds every member's values, combined over processes already, so nothing is synced again (and an
        error here is raised on every process alike).
        """
        names = sorted(key[len(COUNT):] for key in scores.extra if key.startswith(COUNT))
        for name in names:
            missing = torch.nonzero(scores.extra[COUNT + name] != scores.weight).flatten().tolist()
            if missing:
                raise PopulationError(
                    f"ES step {step}: training_step logged {name!r} for some population members but not for members "
                    f"{missing} (or not on every process that scored them). Log every name for every member: each is "
                    "logged as the population mean."
                )
        best = int(torch.argmax(scores.fitness))
        for name in names:
            per_member = scores.mean(PREFIX + name)
            options = {**self.options[name], "sync_dist": False}
            log(name, float(per_member.mean()), **options)
            log(f"{name}/best", float(per_member[best]), **{**options, "prog_bar": False})
