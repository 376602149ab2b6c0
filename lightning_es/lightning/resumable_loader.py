"""A training DataLoader that Lightning can resume in the middle of an epoch.

Lightning restores a run at the step it stopped and sets the sampler's epoch, but a plain DataLoader starts the epoch
from its first batch again, so a run resumed from a checkpoint taken mid-epoch would score other batches than the
uninterrupted run (Lightning warns about it). Lightning saves and restores the state of loaders that implement
``state_dict``/``load_state_dict`` (torchdata's ``StatefulDataLoader`` is one; this wraps the user's own loader
instead of replacing it); this one's state is the number of batches of the current epoch whose step has run, and a
restored loader skips them at its next iteration. Loaders without a length (iterable datasets) are not wrapped.
"""

from collections.abc import Callable, Iterator


class ResumableLoader:
    def __init__(self, loader, trained: Callable[[], int]):
        """``trained()``: batches of the current epoch whose training step has run (Lightning's batch progress)."""
        self.loader = loader
        self.trained = trained
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
        return {"trained": self.trained()}

    def load_state_dict(self, state: dict) -> None:
        trained = state["trained"]
        self._skip = trained if trained < len(self) else 0  # a finished epoch: the next one starts from its start
