"""Seeded, shardable batches of a dataset, epoch after epoch.

Indices are shuffled per epoch from (seed, epoch) alone, so the batch at any position can be
recomputed without replaying the data; each process takes every world_size-th batch of the
same permutation, and full batches only, so processes never disagree on the step count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from finetune.data import DataError


class EpochBatches:
    def __init__(
        self,
        dataset,
        batch_size: int,
        collate: Callable[[list[dict]], dict[str, torch.Tensor]],
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.batch_in_epoch = 0, 0  # the position of the next batch
        if drop_last and self.batches_per_epoch() == 0:
            raise DataError(
                f"the training set has {len(dataset)} rows (after filtering and the eval hold-out), fewer than "
                f"one global batch (train.batch_size={batch_size} x {world_size} process(es)); lower "
                "train.batch_size or add data"
            )

    def batches_per_epoch(self) -> int:
        n_global = len(self.dataset) // self.batch_size if self.drop_last else -(-len(self.dataset) // self.batch_size)
        return n_global // self.world_size if self.drop_last else -(-n_global // self.world_size)

    def _epoch_indices(self, epoch: int) -> list[list[int]]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches[self.rank :: self.world_size]

    def _load(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.collate([self.dataset[i] for i in indices])

    def one_epoch(self) -> list[dict[str, torch.Tensor]]:
        """Every batch of one pass, in order (for evaluation)."""
        return [self._load(b) for b in self._epoch_indices(0)]

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch; with the seed it fixes every batch still to come."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["batch_in_epoch"])
        # batch_in_epoch may equal the epoch's length: the epoch is used up and the next one starts.
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch():
            raise ValueError(f"data position {state} is outside this dataset ({self.batches_per_epoch()} batches per epoch)")
        self.epoch, self.batch_in_epoch = epoch, position

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            batches = self._epoch_indices(self.epoch)
            while self.batch_in_epoch < len(batches):
                indices = batches[self.batch_in_epoch]
                self.batch_in_epoch += 1
                yield self._load(indices)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
