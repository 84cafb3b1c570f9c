"""Check the rendezvous address before torch.distributed waits on it.

torch's rendezvous blocks for its whole timeout (30 minutes by default) when MASTER_ADDR is
wrong: the ranks on other nodes retry a connection that never comes, rank 0 waits for ranks
that never arrive, and nothing says why. Before `init_distributed`, each rank checks what it
can, within `LLAMA_FT_MASTER_TIMEOUT` seconds (default 900), and fails with one line naming
MASTER_ADDR / MASTER_PORT:

- MASTER_ADDR must resolve;
- global rank 0 hosts the store on MASTER_PORT (on all interfaces): when MASTER_ADDR is not an
  address of its own node, a warning says so (it can still be right: a NAT or service address
  that forwards here), since the other ranks would then wait on the wrong machine;
- every other rank must be able to open a TCP connection to MASTER_ADDR:MASTER_PORT (retried
  until the deadline, since rank 0 may start later).
"""

from __future__ import annotations

import logging
import os
import socket
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


def check_master_reachable(env: dict[str, str] | None = None, timeout_s: float | None = None,
                           poll_s: float = 1.0) -> None:
    """Raise UserError if this rank cannot take part in the rendezvous at MASTER_ADDR:MASTER_PORT."""
    env = dict(os.environ if env is None else env)
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not addr or not port or int(env.get("WORLD_SIZE", "1")) <= 1:
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
