"""Which ranks share a sequence under Ulysses sequence parallelism, which layouts cannot work, and how many
slices the tiled MLP cuts a rank's sequence into.

Torch-free, so that `llama-ft plan` checks and plans a layout the way training does without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llama_ft.errors import UserError


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
        raise UserError(f"--sequence_parallel_size {size}: expected an integer >= 1")
    if size == 1:
        return
    if world % size:
        raise UserError(f"--sequence_parallel_size {size}: does not divide the {world} ranks (data-parallel size "
                        "= ranks / sequence-parallel size)")
    if heads % size:
        raise UserError(f"--sequence_parallel_size {size}: the model's {heads} query heads ({model}/config.json "
                        "num_attention_heads) are not divisible by it; each rank attends with heads / N of them")
    if kv_heads % size and size % kv_heads:
        raise UserError(f"--sequence_parallel_size {size}: the model's {kv_heads} KV heads ({model}/config.json "
                        "num_key_value_heads) neither divide it nor are divisible by it")
    if attn == "eager":
        raise UserError(f"--attn_implementation eager with --sequence_parallel_size {size}: Ulysses needs an "
                        "attention that builds causality itself (eager needs a 4D mask); use sdpa or "
                        "flash_attention_2")
    if packing and attn != "flash_attention_2":
        raise UserError(f"--packing with --sequence_parallel_size {size} needs --attn_implementation "
                        f"flash_attention_2: Ulysses drops the 4D mask that keeps packed examples apart under "
                        f"{attn}; only flash's varlen path (position_ids per example) keeps them apart")


def check_long_context_flags(size: object, activation_offload: bool, gradient_checkpointing: bool) -> None:
    """The flag checks training (config.py) and the planner share, before any layout is known."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"--sequence_parallel_size {size}: expected an integer >= 1")
    if activation_offload and not gradient_checkpointing:
        raise UserError("--activation_offload needs --gradient_checkpointing: it offloads the activation "
                        "checkpoints (each decoder layer's input)")


def mlp_tiles(longest_row: int, rows_joined: int, size: int, hidden_size: int) -> int:
    """Slices of the tiled MLP, fixed for a run (train/activation_memory.py): ALST's choice of about
    hidden_size tokens each, at least one, over the longest sequence a rank holds, ceil(longest_row x
    rows_joined / size) tokens (rows_joined > 1 where flash packing makes a micro-batch's rows one sequence)."""
    return max(1, math.ceil(math.ceil(longest_row * rows_joined / size) / hidden_size))
