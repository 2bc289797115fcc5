"""Network namespaces as separate hosts on one machine: a private test network that only they see.

`Network` makes one namespace per host, each with its own `eth0` on a private address, joined by a
bridge that lives in a switch namespace of its own. The root namespace gets no interface, address
or route: programs there cannot reach the test addresses, and nothing started inside a host
namespace can listen on the machine's real interfaces. A thread joins a namespace with `entered`
(Linux namespaces are per thread; threads it starts inherit it); a program runs inside one with
`command`. Needs root (CAP_SYS_ADMIN) and iproute2.

Names carry the owner's process id (`exs<pid>-head`), so two runs never share a namespace and a run
can remove what a crashed earlier one left (`remove_leftovers`: every `exs<pid>-*` whose pid is gone).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

PREFIX = "exs"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
SUBNET = "10.222.0"  # /24; exists only inside the namespaces a Network creates


class NamespaceError(RuntimeError):
    pass


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def available() -> str | None:
    """None if namespaces can be made here, else why not (the one reason a cluster test may skip)."""
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "delete", probe)
    except (NamespaceError, FileNotFoundError) as exc:
        return f"cannot create network namespaces here ({exc}); needs root and iproute2"
    return None


def pids(namespace: str) -> list[int]:
    """Every process inside `namespace` (whatever started it)."""
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def kill_all(namespace: str, timeout: float = 10.0) -> None:
    """SIGKILL everything in the namespace, again until nothing is left (a dying parent may fork)."""
    end = time.monotonic() + timeout
    while (alive := pids(namespace)) and time.monotonic() < end:
        for pid in alive:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    if alive:
        raise NamespaceError(f"processes {alive} in {namespace} survived SIGKILL for {timeout:g} s")


def delete(namespace: str) -> None:
    kill_all(namespace)
    if (NETNS_DIR / namespace).exists():
        _ip("netns", "delete", namespace)


def ours() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.glob(f"{PREFIX}*-*") if re.fullmatch(rf"{PREFIX}\d+-.+", p.name))


def remove_leftovers() -> list[str]:
    """Delete the namespaces (and their processes) of earlier runs whose owner process is gone."""
    gone = [name for name in ours() if not Path(f"/proc/{name[len(PREFIX):].split('-')[0]}").exists()]
    for name in gone:
        delete(name)
    return gone


def _setns(path: str | Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path) as handle:
        if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
            raise NamespaceError(f"setns({path}): {os.strerror(ctypes.get_errno())}")


@contextmanager
def entered(namespace: str) -> Iterator[None]:
    """Move the calling thread into `namespace` until the block ends: sockets it (and threads it
    starts meanwhile) opens belong there."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(NETNS_DIR / namespace)
        try:
            yield
        finally:
            _setns(f"/proc/self/fd/{back}")
    finally:
        os.close(back)


def command(namespace: str, argv: list[str]) -> list[str]:
    """`argv` run inside `namespace` (with everything it starts)."""
    return ["ip", "netns", "exec", namespace, *argv]


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str


class Network:
    """Hosts on one private bridge. `create()` returns them by name; `remove()` deletes everything,
    processes first, and is safe to call twice or after a failed `create()`."""

    def __init__(self, names: list[str], subnet: str = SUBNET):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.hosts = {name: Host(f"{self.tag}-{name}", f"{subnet}.{i}") for i, name in enumerate(names, 1)}

    def create(self) -> dict[str, Host]:
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts.values(), 1):
                _ip("netns", "add", host.namespace)
                _ip("-n", self.switch, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                    "netns", host.namespace)
                _ip("-n", self.switch, "link", "set", f"v{i}", "master", "br0", "up")
                _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.namespace, "link", "set", "eth0", "up")
                _ip("-n", host.namespace, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise
        return self.hosts

    def cut(self, name: str) -> None:
        """Unplug a host's cable: its processes run on, but no packet reaches it or leaves it."""
        _ip("-n", self.switch, "link", "set", f"v{list(self.hosts).index(name) + 1}", "down")

    def remove(self) -> None:
        for name in [host.namespace for host in self.hosts.values()] + [self.switch]:
            delete(name)

    def __enter__(self) -> dict[str, Host]:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()
