"""Network namespaces as hosts (loadtest/netns.py): hosts reach each other on the private bridge, the
root namespace is untouched, and a crashed run's namespaces are removed by the next one."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from exitserve.loadtest import netns

UNAVAILABLE = netns.available()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


def test_hosts_talk_over_the_bridge_and_the_root_namespace_sees_none_of_it():
    root_addresses = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    network = netns.Network(["a", "b"])
    with network as hosts:
        a, b = hosts["a"], hosts["b"]
        with netns.entered(a.namespace):
            server = socket.create_server((a.address, 0))
        port = server.getsockname()[1]
        threading.Thread(target=lambda: server.accept()[0].sendall(b"hello"), daemon=True).start()
        with netns.entered(b.namespace), socket.create_connection((a.address, port), timeout=5) as conn:
            assert conn.recv(5) == b"hello"
        server.close()
        with pytest.raises(OSError):  # from the root namespace the test addresses do not exist
            socket.create_connection((a.address, port), timeout=1)
        assert a.address not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        sleeper = subprocess.Popen(netns.command(a.namespace, [sys.executable, "-c", "import time; time.sleep(60)"]))
        end = time.monotonic() + 10
        while sleeper.pid not in netns.pids(a.namespace):  # `ip netns exec` enters it right after the fork
            assert time.monotonic() < end, "the process never entered its namespace"
            time.sleep(0.05)
    assert sleeper.wait(10) == -9  # removing the network killed what ran in it
    assert not [n for n in netns.ours() if n.startswith(network.tag)]
    assert subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout == root_addresses


def test_leftovers_of_a_crashed_run_are_removed_and_live_runs_kept():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = f"{netns.PREFIX}{dead.pid}-head"
    live = netns.Network(["x"])
    subprocess.run(["ip", "netns", "add", crashed], check=True)
    try:
        with live:
            assert crashed in netns.remove_leftovers()
            assert not Path(netns.NETNS_DIR / crashed).exists()
            assert live.hosts["x"].namespace in netns.ours()  # its owner (this process) is alive
    finally:
        netns.delete(crashed)
