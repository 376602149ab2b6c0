"""The ES training batches: the same prompts on every process, in a seeded order that a resumed run replays."""

import torch
from torch.utils.data import DataLoader, Sampler


class SeededShuffleSampler(Sampler[int]):
    """A permutation of the dataset that depends only on ``(seed, epoch)``."""

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True):
        self.num_rows = num_rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_rows))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())


class SharedPromptLoader(DataLoader):
    """A DataLoader that is not sharded across processes, forwarding ``set_epoch`` to its sampler."""

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, SeededShuffleSampler):
            self.sampler.set_epoch(epoch)
