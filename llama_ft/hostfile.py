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

MAX_SLOTS = 4096  # ranks on one host: far above any node, far below what range() and the launcher choke on
# DeepSpeed matches this at the start of a line and ignores the rest (e.g. OpenMPI's max_slots=16)
_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+?)(?:\s+.*)?$")


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
        # what ssh, pdsh and DNS could never reach (a NUL byte, a 70,000-character name) was accepted (fuzzer)
        if len(name) > 253 or not name.isprintable():
            raise UserError(f"hostfile {path}:{lineno}: host {name[:40]!r}{'...' if len(name) > 40 else ''}: expected "
                            "a host name or address (printable, at most 253 characters)")
        # isascii: str.isdigit accepts other scripts' digits; the cap: range() of a huge count overflowed
        if not (slots.isascii() and slots.isdigit()) or not 0 < int(slots) <= MAX_SLOTS:
            raise UserError(f"hostfile {path}:{lineno}: slots={slots}: expected an integer > 0 and <= {MAX_SLOTS}")
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
    out: dict[str, set[int]] = {}
    for part in filter(None, spec.split("@")):
        name, colon, slots = part.partition(":")
        if name not in hosts:
            raise UserError(f"{flag} {spec}: host {name!r} is not in the hostfile (it has {', '.join(hosts)})")
        if not colon:
            out.setdefault(name, set()).update(range(hosts[name].slots))
            continue
        try:
            idx = [int(s) for s in slots.split(",")]
        except ValueError as e:
            raise UserError(f"{flag} {spec}: expected 'HOST:SLOT,SLOT@HOST...' with integer slots") from e
        h = hosts[name]
        bad = [i for i in idx if not 0 <= i < h.slots]
        if bad:
            raise UserError(f"{flag} {spec}: slot {bad[0]} of host {name!r} is outside its slots 0..{h.slots - 1} "
                            f"(line {h.line})")
        out.setdefault(name, set()).update(idx)  # a host named twice: the launcher merges its slots
    return {n: sorted(v) for n, v in out.items()}


def active_slots(path: str | Path, hosts: list[Host], num_gpus: int | None = None, include: str = "",
                 exclude: str = "") -> dict[str, list[int]]:
    """The slots the launcher will use on each host, in hostfile order (= node ranks), checked
    against the hostfile the way DeepSpeed's launcher filters it."""
    by_name = {h.name: h for h in hosts}
    if num_gpus is not None and (include or exclude):
        raise UserError("--num_gpus cannot be combined with --include/--exclude (the launcher refuses it)")
    if include and exclude:
        raise UserError("--include and --exclude cannot be combined (the launcher refuses it)")
    if num_gpus is not None:
        if num_gpus <= 0:
            raise UserError(f"--num_gpus {num_gpus}: expected an integer > 0")
        short = [h for h in hosts if h.slots < num_gpus]
        if short:
            h = short[0]
            raise UserError(f"hostfile {path}:{h.line}: host {h.name!r} has slots={h.slots}, fewer than the "
                            f"{num_gpus} ranks per node asked for (--num_gpus / NPROC)")
        return {h.name: list(range(num_gpus)) for h in hosts}
    active = {h.name: list(range(h.slots)) for h in hosts}
    if include:
        chosen = _parse_filter(include, by_name, "--include")
        active = {n: chosen[n] for n in active if n in chosen}
    if exclude:
        for name, idx in _parse_filter(exclude, by_name, "--exclude").items():
            active[name] = [i for i in active[name] if i not in idx]
    active = {n: v for n, v in active.items() if v}
    if not active:
        raise UserError(f"--include {include!r} / --exclude {exclude!r}: no slot of hostfile {path} is left")
    return active


def check_launch(path: str | Path, hosts: list[Host], num_gpus: int | None = None, include: str = "",
                 exclude: str = "") -> int:
    """Check the rank request against the hostfile; return the number of ranks it gives."""
    return sum(len(v) for v in active_slots(path, hosts, num_gpus, include, exclude).values())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-ft hostfile", description="Validate a DeepSpeed hostfile.")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("check", help="check syntax, duplicates, slots, and the rank request")
    c.add_argument("file", help="the hostfile (HOST slots=N lines)")
    c.add_argument("--resolve", action="store_true", help="also check that every host name resolves")
    c.add_argument("--num_gpus", type=int, help="ranks per node the launch will ask for")
    c.add_argument("--include", default="", help="the launcher's --include filter (host:0,1@host2)")
    c.add_argument("--exclude", default="", help="the launcher's --exclude filter")
    c.add_argument("--node_rank", type=int, help="check this node index (no-ssh launch) and print only the "
                   "number of ranks that node runs")
    return p


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hosts = parse_hostfile(args.file)
    if args.resolve:
        check_resolves(args.file, hosts)
    active = active_slots(args.file, hosts, args.num_gpus, args.include, args.exclude)
    if args.node_rank is not None:
        if not 0 <= args.node_rank < len(active):
            raise UserError(f"NODE_RANK={args.node_rank}: expected 0..{len(active) - 1}, one per host the launch "
                            f"uses ({', '.join(active)})")
        print(len(list(active.values())[args.node_rank]))
        return 0
    ranks = sum(len(v) for v in active.values())
    print(f"hostfile {args.file}: {len(hosts)} host(s) ({', '.join(f'{h.name} slots={h.slots}' for h in hosts)}), "
          f"{ranks} rank(s)")
    return 0
