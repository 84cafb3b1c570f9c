"""Sequence packing: several whole examples per row of `max_seq_len` tokens, none split, none seeing another.

    pack_best_fit(lengths, order, capacity) -> rows: list[list[example index]]

Best-fit decreasing: the examples, visited in `order` and stable-sorted by length (longest first),
each go into the open row with the least room that still holds them, else into a new row. Rows
come out fuller than with first-fit and no example is ever cut. With the distinct room values kept
sorted (at most `capacity` of them) and a stack of rows per value, placing one example costs
O(log capacity), so a million examples pack in seconds.

In a packed row, `position_ids` restart at 0 for each example; transformers then builds a
block-diagonal attention mask from them (sdpa/eager, no attention_mask passed, no cache) or runs
flash-attention's varlen path. The first label of each example is IGNORE_INDEX: the loss at the
last token of one example would otherwise predict the first token of the next. (That label is never
trained unpacked either: the loss shifts labels by one.) So a packed row trains exactly the tokens its
examples train alone, with the same context: packed and unpacked training are the same objective.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def pack_best_fit(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices (module doc). Every length must be in [1, capacity]."""
    rooms: list[int] = []  # distinct room values with at least one open row, ascending
    open_rows: dict[int, list[int]] = {}  # room -> rows with exactly that much room (a stack)
    rows: list[list[int]] = []
    for i in sorted(order, key=lambda j: -lengths[j]):  # sorted() is stable: ties keep `order`
        n = lengths[i]
        if not 0 < n <= capacity:
            raise ValueError(f"example {i} has {n} tokens; a row holds 1..{capacity}")
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            r = open_rows[room].pop()
            if not open_rows[room]:
                del rooms[k], open_rows[room]
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        left = room - n
        if left > 0:
            if left not in open_rows:
                bisect.insort(rooms, left)
                open_rows[left] = []
            open_rows[left].append(r)
    return rows
