"""A training sampler whose order is a function of (seed, position): resuming at a step repeats the stream."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled passes over ``num_items`` indices, starting at stream position ``start``.

    Pass ``e`` is the permutation drawn from ``seed`` and ``e``; position ``p`` is item ``p % num_items`` of pass
    ``p // num_items``. A run resumed at global step ``s`` starts at ``s * samples_per_step`` and so sees exactly
    the batches the uninterrupted run would have seen (Lightning restarts a plain dataloader's epoch on resume).

    Distributed training (``num_replicas`` processes): process ``rank`` takes stream positions ``start + rank``,
    ``start + rank + num_replicas``, ...; together the processes read the single-process stream in order, so a
    step of ``num_replicas`` processes sees the items that ``num_replicas`` steps of one would. The sampler shards
    itself: the trainer must not wrap it (``use_distributed_sampler: false`` in ``conf/trainer/default.yaml``;
    Lightning's wrapper would list all ``length`` indices first).
    """

    def __init__(
        self,
        num_items: int,
        seed: int = 0,
        start: int = 0,
        length: int = 10**9,
        rank: int = 0,
        num_replicas: int = 1,
    ) -> None:
        if num_items <= 0:
            raise ValueError(f"ResumableSampler needs num_items > 0, got {num_items}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableSampler needs 0 <= rank < num_replicas, got rank={rank}, {num_replicas=}")
        self.num_items = num_items
        self.seed = int(seed)
        self.start = int(start)
        self.length = int(length)
        self.rank = int(rank)
        self.num_replicas = int(num_replicas)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.num_items, generator=gen)

    def _stream(self) -> Iterator[int]:
        """The single-process stream from ``start`` on (endless)."""
        epoch, offset = divmod(self.start, self.num_items)
        while True:
            yield from self._permutation(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        stream = itertools.islice(self._stream(), self.rank, None, self.num_replicas)
        yield from itertools.islice(stream, self.length)

    def __len__(self) -> int:
        return self.length
