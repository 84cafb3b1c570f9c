"""Which ranks share a sequence under Ulysses sequence parallelism, which layouts cannot work, and how many
slices the tiled MLP cuts a rank's sequence into.

Torch-free, so that `llama-ft plan` checks and plans a layout the way training does without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llama_ft.errors import UserError


class LayoutError(UserError):
    """A long-context flag combination training refuses whatever else it reads: `llama-ft plan` runs the same
    checks, so run-llama.sh stops on its error before launching (the plan's exit 3), instead of every rank
    starting up only to stop on it. `ranks`: it also depends on the rank count, which the plan knows exactly
    only when every node runs as many ranks."""

    def __init__(self, message: str, ranks: bool = False) -> None:
        super().__init__(message)
        self.ranks = ranks


def splits_heads(size: int, heads: int, kv_heads: int) -> bool:
    """Ulysses gives each of `size` ranks heads / size query heads, and the KV heads split or replicate evenly."""
    return heads % size == 0 and (kv_heads % size == 0 or size % kv_heads == 0)


def working_sizes(heads: int, kv_heads: int, world: int | None = None) -> list[int]:
    """The sequence-parallel sizes > 1 these heads can take (on `world` ranks: those that divide it too)."""
    return [s for s in range(2, heads + 1) if splits_heads(s, heads, kv_heads) and (world is None or world % s == 0)]


def _sizes(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) or "none"


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place: `size` ranks share a sequence (rank `sp_rank` of them); `dp_world` groups."""

    size: int = 1
    sp_rank: int = 0
    dp_rank: int = 0
    dp_world: int = 1

    @classmethod
    def of(cls, rank: int, world: int, size: int) -> SequenceParallel:
        """DeepSpeed's layout (parallel_state_sp.initialize_sequence_parallel): groups of consecutive ranks."""
        return cls(size, rank % size, rank // size, world // size)

    @property
    def enabled(self) -> bool:
        return self.size > 1


def check_sequence_parallel(size: int, world: int, heads: int, kv_heads: int, attn: str, packing: bool,
                            model: str) -> None:
    """Every combination Ulysses cannot run, as one line before any work (issue 13's bad inputs)."""
    if size < 1:
        raise LayoutError(f"--sequence_parallel_size {size}: expected an integer >= 1")
    if size == 1:
        return
    if world % size:
        raise LayoutError(f"--sequence_parallel_size {size}: does not divide the {world} ranks (data-parallel size "
                          f"= ranks / sequence-parallel size); sizes that work with {world} ranks and the model's "
                          f"heads: {_sizes(working_sizes(heads, kv_heads, world))}", ranks=True)
    if not splits_heads(size, heads, kv_heads):
        # the sizes that would work, so that the user need not work out the divisors of both head counts
        raise LayoutError(f"--sequence_parallel_size {size}: the model's {heads} query heads and {kv_heads} KV heads "
                          f"({model}/config.json num_attention_heads, num_key_value_heads) cannot be split over "
                          f"{size} ranks (each rank takes query heads / {size}; the KV heads must divide or be "
                          f"divisible by {size}); sizes that work with these heads: "
                          f"{_sizes(working_sizes(heads, kv_heads))} (with {world} ranks: "
                          f"{_sizes(working_sizes(heads, kv_heads, world))})")
    if attn == "eager":
        raise LayoutError(f"--attn_implementation eager with --sequence_parallel_size {size}: Ulysses needs an "
                          "attention that builds causality itself (eager needs a 4D mask); use sdpa or "
                          "flash_attention_2")
    if packing and attn != "flash_attention_2":
        raise LayoutError(f"--packing with --sequence_parallel_size {size} needs --attn_implementation "
                          f"flash_attention_2: Ulysses drops the 4D mask that keeps packed examples apart under "
                          f"{attn}; only flash's varlen path (position_ids per example) keeps them apart")


def check_long_context_flags(size: object, activation_offload: bool, gradient_checkpointing: bool) -> None:
    """The flag checks training (config.py) and the planner share, before any layout is known."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise LayoutError(f"--sequence_parallel_size {size}: expected an integer >= 1")
    if activation_offload and not gradient_checkpointing:
        raise LayoutError("--activation_offload needs --gradient_checkpointing: it offloads the activation "
                          "checkpoints (each decoder layer's input)")


def mlp_tiles(longest_row: int, rows_joined: int, size: int, hidden_size: int) -> int:
    """Slices of the tiled MLP, fixed for a run (train/activation_memory.py): ALST's choice of about
    hidden_size tokens each, at least one, over the longest sequence a rank holds, ceil(longest_row x
    rows_joined / size) tokens (rows_joined > 1 where flash packing makes a micro-batch's rows one sequence)."""
    return max(1, math.ceil(math.ceil(longest_row * rows_joined / size) / hidden_size))
