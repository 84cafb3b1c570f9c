"""`llama-ft hostfile check FILE`: validate a DeepSpeed hostfile before a launch, with line numbers.

DeepSpeed's format, one host per line:

    # comment
    node1 slots=8
    node2 slots=8      # trailing comments too

The DeepSpeed launcher stops on a bad line with a traceback that does not say which line;
run-llama.sh runs this check first so a typo costs one line naming the file and line number.
Also checked: duplicate hosts, slots <= 0, optionally that every host resolves (`--resolve`),
and that the ranks asked for fit the slots (`--num_gpus N` per node, `--include` /
`--exclude` in the launcher's `host:0,1@host2` syntax).
"""

from __future__ import annotations

import argparse
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from llama_ft.errors import UserError, user_errors_exit

_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+)$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


def parse_hostfile(path: str | Path) -> list[Host]:
    """Hosts of a DeepSpeed hostfile in file order. Raises UserError naming FILE:LINE."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise UserError(f"hostfile {path}: file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"hostfile {path}: unreadable ({e})") from e
    hosts: dict[str, Host] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise UserError(f"hostfile {path}:{lineno}: {raw.strip()!r}: expected 'HOST slots=N'")
        name, slots = m["host"], m["slots"]
        if not slots.isdigit() or int(slots) <= 0:
            raise UserError(f"hostfile {path}:{lineno}: slots={slots}: expected an integer > 0")
        if name in hosts:
            raise UserError(f"hostfile {path}:{lineno}: host {name!r} already listed on line {hosts[name].line}")
        hosts[name] = Host(name, int(slots), lineno)
    if not hosts:
        raise UserError(f"hostfile {path}: no host lines (expected 'HOST slots=N')")
    return list(hosts.values())


def check_resolves(path: str | Path, hosts: list[Host]) -> None:
    for h in hosts:
        try:
            socket.getaddrinfo(h.name, None)
        except OSError as e:
            raise UserError(f"hostfile {path}:{h.line}: host {h.name!r} does not resolve ({e.strerror or e})") from e


def _parse_filter(spec: str, hosts: dict[str, Host], flag: str) -> dict[str, list[int]]:
    """`host1:0,1@host2` -> {host1: [0, 1], host2: all slots}, checked against the hostfile."""
    out: dict[str, list[int]] = {}
    for part in filter(None, spec.split("@")):
        name, _, slots = part.partition(":")
        if name not in hosts:
            raise UserError(f"{flag} {spec}: host {name!r} is not in the hostfile (it has {', '.join(hosts)})")
        if not slots:
            out[name] = list(range(hosts[name].slots))
            continue
        try:
            idx = [int(s) for s in slots.split(",")]
        except ValueError as e:
            raise UserError(f"{flag} {spec}: expected 'HOST:SLOT,SLOT@HOST...' with integer slots") from e
        bad = [i for i in idx if not 0 <= i < hosts[name].slots]
        if bad:
            h = hosts[name]
            raise UserError(f"{flag} {spec}: slot {bad[0]} of host {name!r} is outside its slots 0..{h.slots - 1} "
                            f"(line {h.line})")
        out[name] = idx
    return out


def check_launch(path: str | Path, hosts: list[Host], num_gpus: int | None = None, include: str = "",
                 exclude: str = "") -> int:
    """Check the rank request against the hostfile; return the number of ranks it gives."""
    by_name = {h.name: h for h in hosts}
    if num_gpus is not None and (include or exclude):
        raise UserError("--num_gpus cannot be combined with --include/--exclude (the launcher refuses it)")
    if num_gpus is not None:
        if num_gpus <= 0:
            raise UserError(f"--num_gpus {num_gpus}: expected an integer > 0")
        short = [h for h in hosts if h.slots < num_gpus]
        if short:
            h = short[0]
            raise UserError(f"hostfile {path}:{h.line}: host {h.name!r} has slots={h.slots}, fewer than the "
                            f"{num_gpus} ranks per node asked for (--num_gpus / NPROC)")
        return num_gpus * len(hosts)
    active = {h.name: list(range(h.slots)) for h in hosts}
    if include:
        active = _parse_filter(include, by_name, "--include")
    if exclude:
        for name, idx in _parse_filter(exclude, by_name, "--exclude").items():
            if name in active:
                active[name] = [i for i in active[name] if i not in idx]
    total = sum(len(v) for v in active.values())
    if total == 0:
        raise UserError(f"--include {include!r} / --exclude {exclude!r}: no slot of hostfile {path} is left")
    return total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-ft hostfile", description="Validate a DeepSpeed hostfile.")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("check", help="check syntax, duplicates, slots, and the rank request")
    c.add_argument("file")
    c.add_argument("--resolve", action="store_true", help="also check that every host name resolves")
    c.add_argument("--num_gpus", type=int, help="ranks per node the launch will ask for")
    c.add_argument("--include", default="", help="the launcher's --include filter (host:0,1@host2)")
    c.add_argument("--exclude", default="", help="the launcher's --exclude filter")
    return p


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hosts = parse_hostfile(args.file)
    if args.resolve:
        check_resolves(args.file, hosts)
    ranks = check_launch(args.file, hosts, args.num_gpus, args.include, args.exclude)
    print(f"hostfile {args.file}: {len(hosts)} host(s) ({', '.join(f'{h.name} slots={h.slots}' for h in hosts)}), "
          f"{ranks} rank(s)")
    return 0
