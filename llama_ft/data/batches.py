"""The training stream: each rank's micro-batches, deterministic in (seed, epoch, position)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from llama_ft.data.collate import collate
from llama_ft.errors import UserError


class MicroBatches:
    """Rank `rank`'s stream of right-padded micro-batches of `batch` examples.

    Epoch e visits the examples in the order of torch.randperm(n, seed + e). Global micro-batch j
    is perm[j*W*B : (j+1)*W*B] (W ranks, B examples each); rank r takes its r-th block of B.
    An incomplete last global batch is dropped. (epoch, index) is all a resume needs.
    """

    def __init__(self, examples: Sequence[Mapping[str, Sequence[int]]], world: int, rank: int, batch: int, seed: int,
                 pad_id: int, epoch: int = 0, index: int = 0) -> None:
        self.examples, self.world, self.rank, self.batch = examples, world, rank, batch
        self.seed, self.pad_id, self.epoch, self.index = seed, pad_id, epoch, index
        self.per_epoch = len(examples) // (world * batch)
        if self.per_epoch == 0:
            raise UserError(f"--per_device_train_batch_size {batch} x {world} ranks needs at least {world * batch} "
                            f"training examples; the dataset has {len(examples)}")
        self._perm_epoch, self._perm = -1, None

    def __iter__(self) -> MicroBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.examples), generator=g).tolist(), self.epoch
        start = (self.index * self.world + self.rank) * self.batch
        self.index += 1
        return collate([self.examples[i] for i in self._perm[start:start + self.batch]], self.pad_id)
