"""A training DataLoader that Lightning can resume in the middle of an epoch.

Lightning restores a run at the step it stopped and sets the sampler's epoch, but a plain DataLoader starts the epoch
from its first batch again, so a run resumed from a checkpoint taken mid-epoch would score other batches than the
uninterrupted run (Lightning warns about it). Lightning saves and restores the state of loaders that implement
``state_dict``/``load_state_dict``; this one's state is the number of batches of the current epoch already trained on,
and a restored loader skips them at its next iteration.
"""

from collections.abc import Iterator


class ResumableLoader:
    def __init__(self, loader):
        self.loader = loader
        self.consumed = 0  # batches of the current epoch trained on, set by the strategy before each step
        self._skip = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        skip, self._skip = self._skip, 0
        iterator = iter(self.loader)
        for _ in range(skip):  # the sampler's order for this epoch is already fixed: drop what was trained on
            next(iterator)
        yield from iterator

    def __getattr__(self, name: str):
        # sampler, batch_sampler, dataset, batch_size...: Lightning reads them (e.g. to set the sampler's epoch)
        return getattr(self.loader, name)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        consumed = state["consumed"]
        self._skip = consumed if consumed < len(self) else 0  # a finished epoch: the next one starts from its start
        self.consumed = self._skip
