"""Argument types shared by the training flags (config.py) and the planner's copy of them
(plan/command.py). No torch here: `llama-ft plan` must start in well under a second."""

from __future__ import annotations

import argparse

from llama_ft.errors import UserError

LLAMA_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The Llama linears LoRA can target, in module order."""

TARGET_GROUPS = {"all": LLAMA_LINEAR_NAMES, "attention": LLAMA_LINEAR_NAMES[:4], "mlp": LLAMA_LINEAR_NAMES[4:]}
"""`--lora_target_modules all|attention|mlp`, as Pax names them."""

OBJECTIVES = ("sft", "dpo")
"""`--objective` of `llama-ft train`, `llama-ft data` and `llama-ft plan`."""

DPO_LOSSES = ("sigmoid", "ipo")
"""`--dpo_loss` (train/loss.py dpo_pair_losses computes each)."""

OBJECTIVE_HELP = ("sft (token cross-entropy) | dpo (preference pairs {prompt, chosen, rejected} with "
                  "--dataset_format chat; the reference model is the base with the adapters switched off)")


def check_objective_choice(name: str) -> None:
    """UserError unless `name` is one of OBJECTIVES."""
    if name not in OBJECTIVES:
        raise UserError(f"--objective {name!r}: expected one of {', '.join(OBJECTIVES)}")


def str2bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def float_or_auto(v: str) -> float | str:
    """A number, or the word auto (`--offload_ratio auto`); the range is checked where it is used."""
    if v.strip().lower() == "auto":
        return "auto"
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {v!r}") from None


def expand_targets(values: list[str] | tuple[str, ...] | str) -> list[str]:
    """`--lora_target_modules` values (space- or comma-separated) -> explicit linear names, groups expanded,
    duplicates dropped, in Llama module order. UserError naming what is neither a group nor a Llama linear."""
    items = [values] if isinstance(values, str) else list(values)
    names = [x for v in items for x in str(v).split(",") if x]
    if not names:
        raise UserError("--lora_target_modules: expected at least one module name or group")
    chosen: set[str] = set()
    for n in names:
        if n in TARGET_GROUPS:
            chosen.update(TARGET_GROUPS[n])
        elif n in LLAMA_LINEAR_NAMES:
            chosen.add(n)
        else:
            raise UserError(f"--lora_target_modules {n!r}: expected a group ({', '.join(TARGET_GROUPS)}) or Llama "
                            f"linear names ({', '.join(LLAMA_LINEAR_NAMES)})")
    return [n for n in LLAMA_LINEAR_NAMES if n in chosen]
