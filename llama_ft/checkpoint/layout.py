"""Where checkpoints live in OUTPUT_DIR, and which one to resume from. No torch or DeepSpeed import:
the flag parser resolves `--resume_from_checkpoint latest|auto` with it before anything heavy loads.

    OUTPUT_DIR/checkpoint-STEP/        complete checkpoints (a folder gets this name only once complete)
    OUTPUT_DIR/.checkpoint-STEP.tmp/   a save in progress, or one killed half-way (removed at the next start)
    OUTPUT_DIR/latest                  the name of the newest complete checkpoint, written after it
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llama_ft.errors import UserError

STATE_FILE = "trainer_state.json"
LATEST = "latest"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("checkpoint-") or not name[len("checkpoint-"):].isdigit():
        return None
    return int(name[len("checkpoint-"):])


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoint-STEP folders in `output_dir` with their state file, oldest step first. (A folder has
    its final name only once complete; temporary ones are hidden `.checkpoint-STEP.tmp` folders.)"""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if _step_of(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def remove_stale_temporaries(output_dir: Path) -> None:
    """Remove the `.checkpoint-STEP.tmp` folders of saves that were killed half-way (rank 0, at start)."""
    for p in Path(output_dir).glob(".checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(arg: str | None, output_dir: str | os.PathLike) -> str | None:
    """--resume_from_checkpoint: a path as given; `latest` = the checkpoint the `latest` marker in
    OUTPUT_DIR names (else the newest complete one), an error if there is none; `auto` = the same, or None
    (start from scratch) when OUTPUT_DIR has no checkpoint yet."""
    if arg not in ("latest", "auto"):
        return arg
    out = Path(output_dir)
    marker = out / LATEST
    named = out / marker.read_text().strip() if marker.is_file() else None
    if named is not None and named.parent == out and (named / STATE_FILE).is_file():
        return str(named)
    found = complete_checkpoints(out)
    if found:
        return str(found[-1])
    if arg == "auto":
        return None
    raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint in {out} (no 'latest' marker and "
                    "no checkpoint-STEP folder); use 'auto' to start from scratch when there is none")
