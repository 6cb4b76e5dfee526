"""A training sampler whose order is a function of (seed, position): resuming at a step repeats the stream."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled passes over ``num_items`` indices, starting at stream position ``start``.

    Pass ``e`` is the permutation drawn from ``seed`` and ``e``; position ``p`` is item ``p % num_items`` of pass
    ``p // num_items``. A run resumed at global step ``s`` starts at ``s * samples_per_step`` and so sees exactly
    the batches the uninterrupted run would have seen (Lightning restarts a plain dataloader's epoch on resume).
    """

    def __init__(self, num_items: int, seed: int = 0, start: int = 0, length: int = 10**9) -> None:
        if num_items <= 0:
            raise ValueError(f"ResumableSampler needs num_items > 0, got {num_items}")
        self.num_items = num_items
        self.seed = int(seed)
        self.start = int(start)
        self.length = int(length)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.num_items, generator=gen)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.num_items)
        remaining = self.length
        while remaining > 0:
            perm = self._permutation(epoch)[offset:]
            yield from perm[:remaining].tolist()
            remaining -= len(perm)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        return self.length
