"""Hostfile checks (`llama-ft hostfile check`) and the rendezvous pre-check, without launching."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from llama_ft.errors import UserError
from llama_ft.hostfile import Host, active_slots, check_launch, check_resolves, parse_hostfile
from llama_ft.rendezvous import check_master_reachable, free_port, port_in_use


def _hf(tmp_path, text: str):
    p = tmp_path / "hostfile"
    p.write_text(text)
    return p


def test_parses_comments_blank_lines_and_trailing_comments(tmp_path):
    p = _hf(tmp_path, "# two nodes\n\nnode1 slots=8   # first\n  node2\tslots=4\n")
    assert parse_hostfile(p) == [Host("node1", 8, 3), Host("node2", 4, 4)]


@pytest.mark.parametrize("text,needle", [
    ("node1 slots=8\nnode2 8\n", ":2: 'node2 8': expected 'HOST slots=N'"),
    ("slots=8\n", ":1: 'slots=8': expected 'HOST slots=N'"),
    ("node1 slots=8x\n", ":1: slots=8x: expected an integer > 0"),
    ("node1 slots=0\n", ":1: slots=0: expected an integer > 0"),
    ("node1 slots=-2\n", ":1: slots=-2: expected an integer > 0"),
    ("node1 slots=x\n", ":1: slots=x: expected an integer > 0"),
    ("node1 slots=8\n# c\nnode1 slots=8\n", ":3: host 'node1' already listed on line 1"),
    ("# only a comment\n\n", "no host lines"),
    # found by benchmarks/fuzz_inputs.py: an OverflowError traceback, and hosts no launcher could reach
    ("node1 slots=99999999999999999999\n", ":1: slots=99999999999999999999: expected an integer > 0 and <= 4096"),
    ("node1 slots=\u0663\n", ":1: slots=\u0663: expected an integer > 0"),
    ("no\x00de slots=2\n", ":1: host 'no\\x00de': expected a host name or address"),
    ("a" * 300 + " slots=2\n", ":1: host 'aaaa"),
])
def test_bad_hostfiles_name_the_line(tmp_path, text, needle):
    p = _hf(tmp_path, text)
    with pytest.raises(UserError) as e:
        parse_hostfile(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_trailing_fields_are_ignored_as_deepspeed_does(tmp_path):
    assert parse_hostfile(_hf(tmp_path, "node1 slots=8 max_slots=16\n")) == [Host("node1", 8, 1)]


def test_missing_hostfile(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        parse_hostfile(tmp_path / "nope")


def test_rank_requests_must_fit_the_slots(tmp_path):
    hosts = [Host("a", 8, 1), Host("b", 4, 2)]
    assert check_launch("H", hosts) == 12
    assert check_launch("H", hosts, num_gpus=4) == 8
    with pytest.raises(UserError, match="H:2: host 'b' has slots=4, fewer than the 8 ranks"):
        check_launch("H", hosts, num_gpus=8)
    assert check_launch("H", hosts, include="a:0,1@b") == 6
    assert check_launch("H", hosts, exclude="a:0") == 11
    with pytest.raises(UserError, match="host 'c' is not in the hostfile"):
        check_launch("H", hosts, include="c:0")
    with pytest.raises(UserError, match="slot 4 of host 'b' is outside its slots 0..3"):
        check_launch("H", hosts, include="b:4")
    with pytest.raises(UserError, match="cannot be combined"):
        check_launch("H", hosts, num_gpus=2, include="a")
    with pytest.raises(UserError, match="no slot"):
        check_launch("H", [Host("a", 1, 1)], exclude="a")
    with pytest.raises(UserError, match="--include and --exclude cannot be combined"):
        check_launch("H", hosts, include="a", exclude="b")
    with pytest.raises(UserError, match="integer slots"):
        check_launch("H", hosts, include="a:")
    assert check_launch("H", hosts, include="a:0@a:1") == 2  # the launcher merges a host named twice
    assert list(active_slots("H", [Host("a", 2, 1), Host("b", 2, 2), Host("c", 2, 3)], exclude="b")) == ["a", "c"]


def test_resolve_names_the_host_that_does_not(tmp_path, monkeypatch):
    def fake(host, *a, **k):
        if host == "ghost":
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    check_resolves("H", [Host("localhost", 1, 1)])
    with pytest.raises(UserError, match="H:2: host 'ghost' does not resolve"):
        check_resolves("H", [Host("localhost", 1, 1), Host("ghost", 1, 2)])


def test_cli_exit_codes(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "llama_ft.cli", "hostfile", "check", *args],
                              capture_output=True, text=True, timeout=60)

    ok = run(str(_hf(tmp_path, "localhost slots=8\n")), "--num_gpus", "2")
    assert ok.returncode == 0 and "1 host(s)" in ok.stdout and "2 rank(s)" in ok.stdout
    bad = run(str(_hf(tmp_path, "localhost slots=8\nlocalhost slots=8\n")))
    assert bad.returncode == 2 and bad.stderr.startswith("llama-ft: error: hostfile ")
    assert ":2: host 'localhost' already listed on line 1" in bad.stderr and "Traceback" not in bad.stderr
    three = str(_hf(tmp_path, "a slots=2\nb slots=4\nc slots=1\n"))
    node = run(three, "--exclude", "a", "--node_rank", "0")
    assert node.returncode == 0 and node.stdout.strip() == "4"  # node 0 of the launch is b, 4 ranks
    past = run(three, "--exclude", "a", "--node_rank", "2")
    assert past.returncode == 2 and "NODE_RANK=2: expected 0..1" in past.stderr


def _env(rank: int, port: int, addr: str = "127.0.0.1") -> dict[str, str]:
    return {"MASTER_ADDR": addr, "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"}


def test_worker_rank_reaches_a_listening_master():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        check_master_reachable(_env(1, srv.getsockname()[1]), timeout_s=5)


def test_worker_rank_gives_up_on_a_dead_master_with_its_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nobody listens there
    t0 = time.monotonic()
    with pytest.raises(UserError, match=f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}: not reachable from rank 1"):
        check_master_reachable(_env(1, port), timeout_s=0.5, poll_s=0.1)
    assert time.monotonic() - t0 < 5


def test_rank0_warns_when_master_addr_is_not_its_own(caplog):
    port = free_port()  # rank 0 also checks that it can host the store there: not 29500, which a job may hold
    with caplog.at_level("WARNING", logger="llama_ft.rendezvous"):
        check_master_reachable(_env(0, port), timeout_s=1)
        assert not caplog.records
        # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine; only a local bind is tried
        check_master_reachable(_env(0, port, "192.0.2.1"), timeout_s=1)
    assert "192.0.2.1 is not one of its addresses" in caplog.text


def test_master_addr_that_does_not_resolve(monkeypatch):
    def fail(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(UserError, match="MASTER_ADDR=nodex MASTER_PORT=29500: nodex does not resolve"):
        check_master_reachable(_env(1, 29500, "nodex"), timeout_s=1)


def _listening(addr: str = "127.0.0.1") -> socket.socket:
    """Another job's store, as far as a port check can tell: a socket listening on a port of this machine."""
    srv = socket.socket()
    srv.bind((addr, 0))
    srv.listen()
    return srv


def test_port_in_use_is_what_torch_cannot_bind():
    """The check binds as torch's TCPStore does (0.0.0.0, SO_REUSEADDR): a listener on any IPv4 address of this
    machine makes the port busy; the kernel's free port is not."""
    import datetime

    from torch.distributed import DistNetworkError, TCPStore

    for addr in ("127.0.0.1", "0.0.0.0"):
        with _listening(addr) as srv:
            port = srv.getsockname()[1]
            assert port_in_use(port)
            with pytest.raises(DistNetworkError, match="EADDRINUSE"):  # what the check spares a user
                TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=5))
    port = free_port()
    assert not port_in_use(port)
    store = TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=5))
    assert port_in_use(port)  # and the store itself holds it
    del store


@pytest.mark.parametrize("world", [1, 2])
def test_rank0_refuses_a_busy_master_port_in_one_line(world):
    """Another job took MASTER_PORT (two jobs on one machine, or a free port taken between run-llama.sh's pick and
    rank 0's bind): one line naming it before init_distributed, not torch's DistNetworkError traceback."""
    with _listening() as srv:
        port = srv.getsockname()[1]
        env = {**_env(0, port), "WORLD_SIZE": str(world)}
        with pytest.raises(UserError, match=f"^MASTER_PORT={port}: the port is in use on this machine") as e:
            check_master_reachable(env, timeout_s=1)
        assert "\n" not in str(e.value)
        # under torchrun the agent hosts the store on MASTER_PORT itself; rank 0 connects to it
        check_master_reachable({**env, "TORCHELASTIC_USE_AGENT_STORE": "True"}, timeout_s=1)
        check_master_reachable({**env, "RANK": "1"}, timeout_s=1)  # another rank: a client of that store


def test_port_helpers_for_run_llama():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "llama_ft.rendezvous", *args], capture_output=True, text=True,
                              timeout=60)

    picked = run("free-port")
    assert picked.returncode == 0 and 1024 <= int(picked.stdout) <= 65535
    assert run("check-port", picked.stdout.strip()).returncode == 0
    with _listening() as srv:
        assert run("check-port", str(srv.getsockname()[1])).returncode == 3
    assert run("check-port", "99999").returncode == 2 and run().returncode == 2
