"""Seeded train/eval split of a sequence of examples (a list or a `datasets.Dataset`)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from llama_ft.errors import UserError


def take(examples: Sequence[Any], indices: list[int]) -> Sequence[Any]:
    """examples[indices] in that order: `Dataset.select` (no copy) for a Dataset, a list otherwise."""
    if hasattr(examples, "select"):
        return examples.select(indices)
    return [examples[i] for i in indices]


def split_indices(n: int, eval_dataset_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices into n examples, each ascending; see train_eval_split."""
    size = eval_dataset_size
    if isinstance(size, bool) or not isinstance(size, int | float) or not math.isfinite(size) or size < 0:
        raise UserError(f"--eval_dataset_size must be 0, an integer >= 1 or a fraction in (0, 1), got {size!r}")
    if size == 0:
        return list(range(n)), []
    if isinstance(size, int) or float(size).is_integer():
        n_eval = int(size)
    else:
        if size > 1:
            raise UserError(f"--eval_dataset_size {size!r}: a fraction must be in (0, 1), a count an integer")
        n_eval = math.ceil(size * n)
    if n_eval >= n:
        raise UserError(
            f"--eval_dataset_size {size!r} asks for {n_eval} eval examples but there are only {n}; "
            "training needs at least one"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    return [i for i in range(n) if i not in eval_idx], sorted(eval_idx)


def train_eval_split(examples: Sequence[Any], eval_dataset_size: int | float, seed: int) -> tuple[Sequence, Sequence]:
    """Split `examples` into (train, eval), disjoint, together all of them.

    eval_dataset_size: 0 -> no eval set; an int N >= 1 (or an integral float such as 200.0) -> N
    examples; a float in (0, 1) -> ceil(fraction * len(examples)) examples (so at least 1).
    The eval examples are the first ones of `random.Random(seed).shuffle` over the indices, so the
    same seed gives the same split; both keep the original order of `examples`.
    UserError (naming --eval_dataset_size) if the size is negative or eval would take every example.
    """
    train, evals, _ = split_examples(examples, eval_dataset_size, seed)
    return train, evals


def split_examples(examples: Sequence[Any], eval_dataset_size: int | float,
                   seed: int) -> tuple[Sequence, Sequence, list[int]]:
    """train_eval_split, plus the index in `examples` of each training example."""
    train_idx, eval_idx = split_indices(len(examples), eval_dataset_size, seed)
    if not eval_idx:
        return (examples if hasattr(examples, "select") else list(examples)), [], train_idx
    return take(examples, train_idx), take(examples, eval_idx), train_idx
