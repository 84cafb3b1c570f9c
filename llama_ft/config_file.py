"""`--config FILE`: a run's flags in one YAML or JSON file, with the flags' own names as keys.

    lora_r: 64
    dataset: data/chat.jsonl
    dataset_format: chat
    lora_target_modules: [q_proj, v_proj]
    gradient_checkpointing: true

Precedence, lowest first: the parser's defaults < the file < flags given on the command line. The file is
read, and every key checked, before anything else runs (read_config): a key that no llama-ft command knows, a
value of the wrong type or outside a flag's choices is one line naming the file, the line and the key. The
keys are shared by every command that takes `--config` (train, data, plan, eval, run-llama.sh), so one file
serves them all: a command ignores the keys of flags it does not have (a data preview has no use for
`lora_r`).

    parse_args(parser, argv)            the namespace, with the file's values as the defaults
    config_argv(path)                   the file as training flags (run-llama.sh puts them after its own
                                        defaults and before the user's flags: last flag wins)
    write_run_config(path, options)     OUTPUT_DIR/run_config.yaml of a run: `--config` on it repeats the run

Values are typed by the flag that owns the key (argparse's `type`, `nargs` and `choices`), not guessed:
an int flag takes an integer, a float flag a number, a boolean flag true or false, a list flag a list (or
one value), a string flag a string; `null` is allowed where the flag's default is none.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llama_ft.errors import UserError
from llama_ft.flags import float_or_auto, str2bool

CONFIG_HELP = ("YAML or JSON file of flag values, keys named as the flags (lora_r: 64); flags on the command line "
               "win over it, it wins over the defaults")
NOT_KEYS = {"config", "help", "local_rank"}  # never read from a file


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)


def config_path(argv: Sequence[str]) -> str | None:
    """The value of --config in argv (the last one wins, like any flag), without parsing the rest."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config: expected a file (YAML or JSON)")
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    return path


def read_config(path: str | Path) -> dict[str, tuple[Any, int]]:
    """{key: (value, line)} of a YAML or JSON config file (a mapping at the top); UserError on anything else."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--config {p}: file not found (expected a YAML or JSON file of flag values)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise UserError(f"--config {p}: cannot be read ({e})") from None
    if p.suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--config {p}: line {e.lineno}: not valid JSON ({e.msg})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise UserError(f"--config {p}: {where}not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise UserError(f"--config {p}: line {node.start_mark.line + 1}: expected a mapping of flag names to values "
                        "(lora_r: 64), got a " + ("list" if isinstance(node, yaml.SequenceNode) else "single value"))
    out: dict[str, tuple[Any, int]] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        key = key_node.value
        if not isinstance(key_node, yaml.ScalarNode) or not isinstance(key, str):
            raise UserError(f"--config {p}: line {line}: keys are flag names (strings)")
        key = key.removeprefix("--")
        if key in out:
            raise UserError(f"--config {p}: line {line}: '{key}' is given twice (also on line {out[key][1]})")
        try:
            value = yaml.load(yaml.serialize(value_node), Loader=yaml.SafeLoader)  # noqa: S506 - SafeLoader
        except yaml.YAMLError as e:
            raise UserError(f"--config {p}: line {line}: '{key}': not a valid value ({e})") from None
        out[key] = (value, line)
    return out


def _scalar(value: Any, action: argparse.Action, where: str) -> Any:
    """One value for `action`, typed as its flag types it on the command line; UserError when it is not one."""
    kind = action.type
    if isinstance(value, (dict, list)):
        raise UserError(f"{where}: expected a single value, got a {'mapping' if isinstance(value, dict) else 'list'}")
    if kind is str2bool or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is float_or_auto:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number or auto, got {value!r}")
        return float(value)
    if kind is None or kind is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r} (quote it)")
        return value
    try:  # any other converter takes the command line's string form
        return kind(str(value))
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def typed_value(value: Any, action: argparse.Action, where: str,
                choices: Sequence[Any] | None = None) -> Any:
    """`value` for `action`: a list for list flags, None where the default is none, the action's choices (or
    `choices`) checked."""
    choices = action.choices if action.choices is not None else choices
    if value is None:
        if action.default is not None:
            raise UserError(f"{where}: null is not a value for this flag (its default is {action.default!r})")
        return None
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise UserError(f"{where}: expected at least one value")
        out = [_scalar(v, action, where) for v in items]
        bad = [v for v in out if choices is not None and v not in choices]
    else:
        out = _scalar(value, action, where)
        bad = [out] if choices is not None and out not in choices else []
    if bad:
        raise UserError(f"{where}: {bad[0]!r} is not one of {', '.join(map(str, choices))}")
    return out


def _actions(parsers: Iterable[argparse.ArgumentParser]) -> dict[str, argparse.Action]:
    """dest -> the first parser's action for it, over every optional flag of `parsers`."""
    found: dict[str, argparse.Action] = {}
    for parser in parsers:
        for action in parser._actions:
            if action.option_strings and action.dest not in NOT_KEYS:
                found.setdefault(action.dest, action)
    return found


def known_parsers() -> list[argparse.ArgumentParser]:
    """Every parser whose flags a config file may set: training's first (it owns the shared keys' types)."""
    # the training modules import DeepSpeed, whose first import logs a line to stdout: keep it out of the
    # output of the command reading the file (llama-ft plan --json, llama-ft config --nul)
    with contextlib.redirect_stdout(sys.stderr):
        from llama_ft.config import build_parser
        from llama_ft.eval.command import build_parser as eval_parser
        from llama_ft.plan.command import build_parser as plan_parser

        return [build_parser(), plan_parser(), eval_parser()]


def config_values(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's values for the flags of `parser`, typed and checked (module doc). A key of another llama-ft
    command is skipped; a key no command knows is a UserError naming the file, line and key."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import-time line (known_parsers)
        from llama_ft.config import flag_choices

    own = _actions([parser])
    every = _actions([*known_parsers(), parser])  # training's flags type the keys every command shares
    rows = read_config(path)
    choices = flag_choices(rows)
    values = {}
    for key, (value, line) in rows.items():
        where = f"--config {path}: line {line}: '{key}'"
        action = every.get(key)
        if action is None:
            raise UserError(f"--config {path}: line {line}: unknown key '{key}' (keys are flag names without "
                            f"the dashes: `llama-ft train --help` lists them)")
        checked = typed_value(value, action, where, choices.get(key))
        if key in own:
            values[key] = checked
    return values


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """parser.parse_args with `--config FILE`'s values as the defaults: flags on the command line win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = config_path(argv)
    if path is not None:
        parser.set_defaults(**config_values(path, parser))
    ns = parser.parse_args(argv)
    if hasattr(ns, "config"):
        del ns.config
    return ns


def config_argv(path: str | Path) -> list[str]:
    """The file's training flags as a command line (`--flag value ...`): for run-llama.sh, which puts them after
    its own defaults and before the user's flags. A null value is left out (the flag keeps its default)."""
    from llama_ft.config import build_parser

    parser = build_parser()
    actions = _actions([parser])
    argv: list[str] = []
    for key, value in config_values(path, parser).items():
        if value is None:
            continue
        flag = actions[key].option_strings[0]
        if isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, bool):
            argv += [flag, "true" if value else "false"]
        else:
            argv += [flag, str(value)]
    return argv


def write_run_config(path: str | Path, options: dict[str, Any]) -> None:
    """OUTPUT_DIR/run_config.yaml: a run's resolved training options, keyed as the flags (atomic write)."""
    import yaml

    from llama_ft.fsutil import atomic_write_text

    body = yaml.safe_dump({k: v for k, v in options.items() if k not in NOT_KEYS}, sort_keys=False,
                          default_flow_style=None, width=120)
    atomic_write_text(path, "# llama-ft run options, as resolved: `--config` on this file repeats the run\n" + body)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-ft config", description="Check a --config file and print it as training "
                                                                    "flags.")
    p.add_argument("file", help="YAML or JSON file of flag values")
    p.add_argument("--nul", action="store_true", help="NUL-separated output, for scripts (run-llama.sh)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`llama-ft config FILE`: check a config file and print it as training flags, NUL-separated with --nul
    (run-llama.sh reads them that way), else one shell-quoted command line."""
    import shlex

    args = build_parser().parse_args(argv)
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # what the imports log (DeepSpeed's accelerator line) is not output
        flags = config_argv(args.file)
    out.write("".join(f"{f}\0" for f in flags) if args.nul else shlex.join(flags) + "\n")
    return 0
