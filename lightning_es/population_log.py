"""What ``self.log`` does while a LightningModule's ``training_step`` runs once per population member.

Each call is recorded per member instead of reaching Lightning; after the population is scored, every name is logged
once: its population mean under the name itself, and the value logged by the fittest member under ``<name>/best``.
Values that are not scalars (a torchmetrics ``Metric`` object) pass through unchanged.
"""

import inspect
from collections.abc import Callable
from contextlib import contextmanager

import torch


class PopulationLog:
    def __init__(self, population_size: int):
        self.population_size = population_size
        self.values: dict[str, dict[int, float]] = {}
        self.options: dict[str, dict] = {}

    @contextmanager
    def capture(self, module, member_index: int):
        """Inside, ``module.log`` (and so ``module.log_dict``) records instead of logging."""
        real_log = module.log
        signature = inspect.signature(real_log)

        def record(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            options = dict(bound.arguments)
            name, value = options.pop("name"), options.pop("value")
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, (int, float)):
                return real_log(*args, **kwargs)
            self.values.setdefault(name, {})[member_index] = float(value)
            self.options[name] = options

        module.log = record
        try:
            yield
        finally:
            del module.log

    def matrix(self) -> tuple[list[str], torch.Tensor]:
        """Logged names and a (names x population) float64 matrix, 0 where this process did not score the member."""
        names = sorted(self.values)
        matrix = torch.zeros(len(names), self.population_size, dtype=torch.float64)
        for row, name in enumerate(names):
            for index, value in self.values[name].items():
                matrix[row, index] = value
        return names, matrix

    def flush(self, log: Callable, names: list[str], matrix: torch.Tensor, fitness: torch.Tensor) -> None:
        """Log each name's population mean and the fittest member's value, with the options of the recorded call.

        ``matrix`` must hold every member's values (already combined over processes), so nothing is synced again.
        """
        best = int(torch.argmax(fitness))
        for row, name in enumerate(names):
            options = {**self.options[name], "sync_dist": False}
            log(name, float(matrix[row].mean()), **options)
            log(f"{name}/best", float(matrix[row, best]), **{**options, "prog_bar": False})
        self.values.clear()
