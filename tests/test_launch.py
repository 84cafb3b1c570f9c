"""Hostfile checks (`llama-ft hostfile check`) and the rendezvous pre-check, without launching."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from llama_ft.errors import UserError
from llama_ft.hostfile import Host, active_slots, check_launch, check_resolves, parse_hostfile
from llama_ft.rendezvous import check_master_reachable


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
    with caplog.at_level("WARNING", logger="llama_ft.rendezvous"):
        check_master_reachable(_env(0, 29500), timeout_s=1)
        assert not caplog.records
        # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine; only a local bind is tried
        check_master_reachable(_env(0, 29500, "192.0.2.1"), timeout_s=1)
    assert "192.0.2.1 is not one of its addresses" in caplog.text


def test_master_addr_that_does_not_resolve(monkeypatch):
    def fail(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(UserError, match="MASTER_ADDR=nodex MASTER_PORT=29500: nodex does not resolve"):
        check_master_reachable(_env(1, 29500, "nodex"), timeout_s=1)
