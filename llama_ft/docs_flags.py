"""The flag tables in docs/, rendered from each command's argparse parser so that they cannot drift.

    python -m llama_ft.docs_flags --write     rewrite every table in docs/*.md in place
    python -m llama_ft.docs_flags --check     exit 1 naming each table that differs from its parser
    python -m llama_ft.docs_flags train       print one command's table

A table lives between `<!-- flags:COMMAND -->` and `<!-- /flags:COMMAND -->` in one docs/*.md file;
tests/test_docs.py runs the check, so a flag added to a parser fails the tests until the docs are rewritten.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path

from llama_ft.flags import float_or_auto

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = REPO_ROOT / "docs"
WRITE_COMMAND = "python -m llama_ft.docs_flags --write"

PARSERS: dict[str, str] = {
    "train": "llama_ft.config:build_parser",
    "data": "llama_ft.data.command:build_parser",
    "plan": "llama_ft.plan.command:build_parser",
    "eval": "llama_ft.eval.command:build_parser",
    "generate": "llama_ft.generate:build_parser",
    "merge": "llama_ft.merge:build_parser",
    "quantize": "llama_ft.quantize:build_parser",
    "download": "llama_ft.hub:build_parser",
    "hostfile": "llama_ft.hostfile:build_parser check",
    "convert-gguf": "llama_ft.checkpoint.gguf:build_parser",
    "make-tiny": "llama_ft.cli:make_tiny_parser",
    "config": "llama_ft.config_file:build_parser",
    "kernels": "llama_ft.kernelcheck.command:build_parser",
}
"""`llama-ft COMMAND` -> "module:function [subcommand]" building its parser (imported only when rendered:
the training parser imports torch)."""

MARKER = re.compile(r"<!-- flags:(?P<cmd>[\w-]+) -->\n(?P<body>.*?)<!-- /flags:(?P=cmd) -->", re.DOTALL)
PACKAGE_PARENT = Path(__file__).resolve().parents[1]


SKIPPED = (argparse._HelpAction, argparse._SubParsersAction)


def parser_for(command: str) -> argparse.ArgumentParser:
    target, _, sub = PARSERS[command].partition(" ")
    module, func = target.split(":")
    build: Callable[[], argparse.ArgumentParser] = getattr(importlib.import_module(module), func)
    parser = build()
    if sub:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices[sub]
        raise KeyError(f"{command}: no subcommand {sub!r}")
    return parser


def _escape(text: str) -> str:
    """Markdown-safe table cell text: pipes and asterisks escaped, HTML-looking tags disarmed."""
    text = " ".join(text.split()).replace("|", "\\|").replace("*", "\\*")
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _value(default: object) -> str:
    """A default as a user would type it; paths inside the package shown relative, so every checkout agrees."""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, list | tuple):
        return " ".join(_value(d) for d in default)
    if isinstance(default, str | Path) and Path(default).is_absolute():
        try:
            return Path(default).resolve().relative_to(PACKAGE_PARENT).as_posix()
        except ValueError:
            pass
    return str(default)


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar if isinstance(action.metavar, str) else action.dest
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    if action.metavar is not None:
        meta = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        meta = "{" + ",".join(map(str, action.choices)) + "}"
    else:  # argparse would repeat the flag's name in capitals; its kind says more here
        meta = {int: "N", float: "X", float_or_auto: "X|auto"}.get(action.type, "VALUE")  # type: ignore[arg-type]
    if action.nargs == "?":
        return f"{names} [{meta}]"
    if action.nargs in ("+", "*"):
        return f"{names} {meta} ..."
    return f"{names} {meta}"


def _required_groups(parser: argparse.ArgumentParser) -> dict[argparse.Action, list[argparse.Action]]:
    out: dict[argparse.Action, list[argparse.Action]] = {}
    for group in parser._mutually_exclusive_groups:
        if group.required:
            for a in group._group_actions:
                out[a] = [b for b in group._group_actions if b is not a]
    return out


def _row(action: argparse.Action, parser: argparse.ArgumentParser, either: list[argparse.Action] | None) -> str:
    if either:
        default = "required, or " + ", ".join(_code(b.option_strings[0]) for b in either)
    elif action.required or (not action.option_strings and action.nargs is None):
        default = "required"
    elif action.nargs == 0 or action.default in (None, "", argparse.SUPPRESS):
        default = ""  # a switch, or no value unless given (the help says what that means)
    else:
        default = _code(_value(action.default))
    text = action.help or ""
    if "%" in text:
        text = text % {**vars(action), "prog": parser.prog}
    return f"| {_code(_invocation(action))} | {default} | {_escape(text)} |"


def render(command: str) -> str:
    """The markdown table(s) of `llama-ft COMMAND`: one per argument group that has flags."""
    parser = parser_for(command)
    either = _required_groups(parser)
    header = "| flag | default | meaning |\n|---|---|---|"
    groups = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS and not isinstance(a, SKIPPED)]
        if actions:
            groups.append((group.title, actions))
    if not any(title not in ("positional arguments", "options") for title, _ in groups):
        groups = [(None, [a for _, actions in groups for a in actions])]  # argparse's own two: one table
    tables = []
    for title, actions in groups:
        rows = "\n".join(_row(a, parser, either.get(a)) for a in actions)
        tables.append((f"*{title}*\n\n" if title else "") + f"{header}\n{rows}\n")
    return "\n".join(tables)


def doc_files() -> list[Path]:
    return sorted(DOCS_DIR.glob("*.md"))


def _rewrite(text: str, render_table: Callable[[str], str]) -> str:
    """`text` with the body of each known command's table replaced (an unknown one is left for check())."""
    def sub(m: re.Match) -> str:
        cmd = m["cmd"]
        return f"<!-- flags:{cmd} -->\n{render_table(cmd)}<!-- /flags:{cmd} -->" if cmd in PARSERS else m[0]

    return MARKER.sub(sub, text)


def check() -> list[str]:
    """What is wrong with the tables in docs/, one line each (empty when every table is current)."""
    problems: list[str] = []
    where: dict[str, list[Path]] = {}
    for path in doc_files():
        for m in MARKER.finditer(path.read_text()):
            where.setdefault(m["cmd"], []).append(path)
    for cmd, paths in where.items():
        if cmd not in PARSERS:
            problems.append(f"{paths[0].name}: a table for unknown command {cmd!r} (known: {', '.join(PARSERS)})")
    for cmd in PARSERS:
        paths = where.get(cmd, [])
        if len(paths) != 1:
            places = ", ".join(p.name for p in paths) or "none"
            problems.append(f"llama-ft {cmd}: expected one flags table in docs/*.md, found {len(paths)} ({places}); "
                            f"add <!-- flags:{cmd} --><!-- /flags:{cmd} --> to one doc and run {WRITE_COMMAND}")
            continue
        text = paths[0].read_text()
        m = next(m for m in MARKER.finditer(text) if m["cmd"] == cmd)
        if m["body"] != render(cmd):
            problems.append(f"docs/{paths[0].name}: the flags table of `llama-ft {cmd}` differs from its parser; "
                            f"run {WRITE_COMMAND}")
    return problems


def write() -> list[Path]:
    """Rewrite every table in docs/*.md from the parsers; the files that changed."""
    tables: dict[str, str] = {}

    def table(cmd: str) -> str:
        if cmd not in tables:
            tables[cmd] = render(cmd)
        return tables[cmd]

    changed = []
    for path in doc_files():
        text = path.read_text()
        new = _rewrite(text, table)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_ft.docs_flags", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite every table in docs/*.md, then check them")
    p.add_argument("--check", action="store_true", help="exit 1 when a table differs from its parser")
    p.add_argument("command", nargs="?", choices=list(PARSERS), help="print this command's table")
    args = p.parse_args(argv)
    if sum((args.write, args.check, args.command is not None)) != 1:
        p.error("give one of --write, --check or a COMMAND")
    if not DOCS_DIR.is_dir() and not args.command:
        print(f"docs_flags: error: {DOCS_DIR}: no docs folder (run it from a source checkout)", file=sys.stderr)
        return 2
    if args.command:
        print(render(args.command), end="")
        return 0
    if args.write:
        for path in write():
            print(f"rewrote {path.relative_to(REPO_ROOT)}")
    problems = check()
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
