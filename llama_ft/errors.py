"""User-facing errors: one line naming the file, field or flag, and a non-zero exit."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(Exception):
    """A mistake in what the user handed us (flag, file, field). Printed as one line, never a traceback."""


def user_errors_exit(fn: F) -> F:
    """Wrap a CLI entry point: a UserError becomes `llama-ft: error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
            prefix = f"[rank {os.environ.get('RANK')}] " if multi else ""
            msg = " ".join(str(e).split("\n"))
            print(f"{prefix}llama-ft: error: {msg}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
