"""Argument types shared by the training flags (config.py) and the planner's copy of them
(plan/command.py). No torch here: `llama-ft plan` must start in well under a second."""

from __future__ import annotations

import argparse


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
