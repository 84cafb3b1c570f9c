"""Check the rendezvous address before torch.distributed waits on it.

torch's rendezvous blocks for its whole timeout (30 minutes by default) when MASTER_ADDR is
wrong: the ranks on other nodes retry a connection that never comes, rank 0 waits for ranks
that never arrive, and nothing says why. Before `init_distributed`, each rank checks what it
can, within `LLAMA_FT_MASTER_TIMEOUT` seconds (default 900), and fails with one line naming
MASTER_ADDR / MASTER_PORT:

- MASTER_ADDR must resolve;
- global rank 0 hosts the store on MASTER_PORT (on all interfaces): that port must be free on its
  node (another job's rank 0 on the same port would otherwise end this one in a DistNetworkError
  traceback); when MASTER_ADDR is not an address of its own node, a warning says so (it can still
  be right: a NAT or service address that forwards here), since the other ranks would then wait on
  the wrong machine;
- every other rank must be able to open a TCP connection to MASTER_ADDR:MASTER_PORT (retried
  until the deadline, since rank 0 may start later).

run-llama.sh uses the same port test before launching (`python -m llama_ft.rendezvous`, below): on one
node it picks a free MASTER_PORT when none is set, and refuses a busy one that is.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import time

from llama_ft.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 900.0


def _is_local_address(infos: list) -> bool:
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((sockaddr[0], 0, *sockaddr[2:]))  # keeps an IPv6 scope id
                return True
            except OSError:
                continue
    return False


def port_in_use(port: int) -> bool:
    """Whether torch's TCPStore could not listen on `port` on this machine now. Bound as it binds (libuv:
    0.0.0.0 with SO_REUSEADDR), so the answer is the store's: any socket holding the port on any IPv4
    address counts, one left in TIME_WAIT by an earlier job does not (the store reuses it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            # anything else (EACCES below 1024, ...) is not this check's question: the store will name it
            return e.errno == errno.EADDRINUSE
    return False


def free_port() -> int:
    """A port the store can listen on, picked as `torchrun --standalone` picks one: the kernel's choice for
    port 0. Free now, not reserved: a job that takes it before rank 0 binds it meets port_in_use there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _store_already_up(env: dict[str, str]) -> bool:
    """Rank 0 does not start the store itself: torchrun's agent hosts it on MASTER_PORT (the workers connect
    as clients), or this process already joined a process group (its store holds the port)."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return True
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def check_master_reachable(env: dict[str, str] | None = None, timeout_s: float | None = None,
                           poll_s: float = 1.0) -> None:
    """Raise UserError if this rank cannot take part in the rendezvous at MASTER_ADDR:MASTER_PORT."""
    env = dict(os.environ if env is None else env)
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not addr or not port:
        return
    if (int(env.get("RANK", "0")) == 0 and port.isdigit() and 0 < int(port) < 65536 and not _store_already_up(env)
            and port_in_use(int(port))):
        # checked here rather than left to init_distributed: torch's EADDRINUSE is a DistNetworkError traceback
        raise UserError(f"MASTER_PORT={port}: the port is in use on this machine (another job?), and rank 0 hosts "
                        "the rendezvous there; choose another MASTER_PORT (on one node, unset it: run-llama.sh "
                        "picks a free one)")
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return
    if timeout_s is None:
        timeout_s = float(env.get("LLAMA_FT_MASTER_TIMEOUT", DEFAULT_TIMEOUT_S))
    where = f"MASTER_ADDR={addr} MASTER_PORT={port}"
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"{where}: {addr} does not resolve ({e.strerror or e})") from e
    if int(env.get("RANK", "0")) == 0:
        if not _is_local_address(infos):
            log.warning("%s: rank 0 runs on this node, but %s is not one of its addresses: the other ranks will "
                        "look for rank 0 there (set MASTER_ADDR to the address of the node with NODE_RANK=0, "
                        "unless it forwards here)", where, addr)
        return
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            with socket.create_connection((addr, int(port)), timeout=min(10.0, max(timeout_s, 0.1))):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            raise UserError(f"{where}: not reachable from rank {env.get('RANK')} within {timeout_s:.0f} s ({last}); "
                            "check the address, that rank 0 is running, and firewalls "
                            "(LLAMA_FT_MASTER_TIMEOUT sets the wait)")
        time.sleep(poll_s)


def main(argv: list[str]) -> int:
    """For run-llama.sh, without torch: `free-port` prints a free port; `check-port PORT` exits 3 when PORT
    is in use here, 0 when it is free."""
    if argv[:1] == ["free-port"] and len(argv) == 1:
        print(free_port())
        return 0
    if argv[:1] == ["check-port"] and len(argv) == 2 and argv[1].isdigit() and 0 < int(argv[1]) < 65536:
        return 3 if port_in_use(int(argv[1])) else 0
    print("usage: python -m llama_ft.rendezvous free-port | check-port PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
