"""The training stream: each rank's micro-batches, deterministic in (seed, epoch, position).

A row is one example, or with packing several whole examples filling up to `pack_len` tokens
(data/packing.py). `--per_device_train_batch_size` counts rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from llama_ft.data.collate import collate, collate_packed, collate_packed_pairs, collate_pairs, is_pairs
from llama_ft.data.packing import pack_best_fit
from llama_ft.data.shared_prompt import collate_shared_pairs, shared_prefix_lengths
from llama_ft.errors import UserError

Example = Mapping[str, Sequence[int]]


def example_lengths(examples: Sequence[Example]) -> list[int]:
    """Token count of every example (a pair: of both sides together, the tokens it takes in a packed row);
    read from the Arrow columns for a `datasets.Dataset` (no row decoding)."""
    columns = ("chosen_input_ids", "rejected_input_ids") if is_pairs(examples) else ("input_ids",)
    if hasattr(examples, "with_format"):
        import pyarrow.compute as pc

        lengths = [pc.list_value_length(examples.data.column(c)) for c in columns]  # zero-copy over the table
        total = lengths[0] if len(lengths) == 1 else pc.add(*lengths)
        if examples._indices is not None:  # a .select() view (the train split): its rows, in its order
            total = total.take(examples._indices.column(0))
        return total.to_pylist()
    return [sum(len(e[c]) for c in columns) for e in examples]


def pack_capacity(pack_len: int, pairs: bool) -> int:
    """Tokens a packed row holds: --max_seq_len, or for preference pairs 2 x --max_seq_len (a row holds whole
    pairs, and --max_seq_len bounds each side)."""
    return 2 * pack_len if pairs else pack_len


def epoch_rows(lengths: Sequence[int], seed: int, epoch: int, pack_len: int | None) -> list[list[int]]:
    """The rows of epoch `epoch`, in training order, as lists of example indices.

    The examples are visited in the order of torch.randperm(n, seed + epoch); unpacked, each is a row.
    Packed, they are best-fit packed in that order (ties keep it), and the rows are then put in the
    order of a second randperm from the same generator, so long and short rows mix.
    """
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if pack_len is None:
        return [[i] for i in perm]
    rows = pack_best_fit(lengths, perm, pack_len)
    return [rows[j] for j in torch.randperm(len(rows), generator=g).tolist()]


class MicroBatches:
    """Rank `rank`'s stream of micro-batches of `batch` rows.

    Global micro-batch j of an epoch is rows[j*W*B : (j+1)*W*B] (W ranks, B rows each); rank r takes its
    r-th block of B. An incomplete last global batch is dropped. (epoch, index) is all a resume needs.
    Unpacked batches are right-padded (collate); packed ones carry position_ids (collate_packed).
    Preference pairs (data/pairs.py): unpacked, B pairs make one batch of 2B rows (collate_pairs); packed,
    a row holds whole pairs, both sides of each, up to 2 x pack_len tokens, since `pack_len`
    (--max_seq_len) bounds each side (collate_packed_pairs). Either way a pair never spans two micro-batches.
    With `shared_prompt` (packed pairs only, --dpo_shared_prompt) a pair takes its prompt once in its row
    (data/shared_prompt.py: P + |c| + |r| tokens, collate_shared_pairs).
    """

    def __init__(self, examples: Sequence[Example], world: int, rank: int, batch: int, seed: int, pad_id: int,
                 epoch: int = 0, index: int = 0, pack_len: int | None = None, shared_prompt: bool = False) -> None:
        self.examples, self.world, self.rank, self.batch = examples, world, rank, batch
        self.seed, self.pad_id, self.epoch, self.index, self.pack_len = seed, pad_id, epoch, index, pack_len
        self.lengths = example_lengths(examples)
        self.pairs = is_pairs(examples)
        self.prefixes: list[int] | None = None  # P of each pair (shared_prompt)
        if shared_prompt:
            if not (self.pairs and pack_len):
                raise ValueError("shared_prompt applies to packed preference pairs only")
            self.prefixes = shared_prefix_lengths(examples)
            self.lengths = [n - p for n, p in zip(self.lengths, self.prefixes, strict=True)]
        self._rows_epoch, self._rows = -1, []
        self.last_examples: list[int] = []  # indices (into `examples`) of the last micro-batch's examples
        if self.rows_per_epoch(epoch) // (world * batch) == 0:
            what = "packed rows" if pack_len else "training examples"
            raise UserError(f"--per_device_train_batch_size {batch} x {world} ranks needs at least {world * batch} "
                            f"{what}; the dataset gives {self.rows_per_epoch(epoch)}")

    def rows_per_epoch(self, epoch: int) -> int:
        self._load(epoch)
        return len(self._rows)

    @property
    def per_epoch(self) -> int:
        """Micro-batches per rank in the current epoch."""
        return self.rows_per_epoch(self.epoch) // (self.world * self.batch)

    def _load(self, epoch: int) -> None:
        if self._rows_epoch != epoch:
            capacity = pack_capacity(self.pack_len, self.pairs) if self.pack_len else None
            self._rows, self._rows_epoch = epoch_rows(self.lengths, self.seed, epoch, capacity), epoch

    def __iter__(self) -> MicroBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        self._load(self.epoch)
        start = (self.index * self.world + self.rank) * self.batch
        self.index += 1
        picked = self._rows[start:start + self.batch]
        self.last_examples = [i for row in picked for i in row]
        rows = [[self.examples[i] for i in row] for row in picked]
        if self.pairs:
            if self.pack_len is None:
                return collate_pairs([row[0] for row in rows], self.pad_id)
            if self.prefixes is not None:
                return collate_shared_pairs(rows, self.pad_id, [[self.prefixes[i] for i in row] for row in picked])
            return collate_packed_pairs(rows, self.pad_id)
        if self.pack_len is None:
            return collate([row[0] for row in rows], self.pad_id)
        return collate_packed(rows, self.pad_id)
