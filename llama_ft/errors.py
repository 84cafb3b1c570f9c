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


class StopRun(Exception):
    """End the run with exit `code`, printing `message` as one line if there is one. Ranks with nothing to
    add stop quietly while the one that knows what happened says it (preemption, a NaN, a failed save)."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message or "")
        self.code, self.message = code, message


def _prefix() -> str:
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return f"[rank {os.environ.get('RANK')}] " if multi else ""


def user_errors_exit(fn: F | None = None, *, prog: str = "llama-ft") -> F | Callable[[F], F]:
    """Wrap a CLI entry point: a UserError becomes `llama-ft: error: ...` on stderr and exit code 2;
    a StopRun its message (if any) and its exit code. `@user_errors_exit(prog="llama-ft plan")` names
    the command in the error line instead."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                msg = " ".join(str(e).split("\n"))
                print(f"{_prefix()}{prog}: error: {msg}", file=sys.stderr, flush=True)
                sys.exit(EXIT_USER_ERROR)
            except StopRun as e:
                if e.message:
                    print(f"{_prefix()}{prog}: {' '.join(e.message.split())}", file=sys.stderr, flush=True)
                sys.exit(e.code)

        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate
