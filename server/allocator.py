"""The C allocator `exitserve serve` runs on: jemalloc when it is installed, as in the Docker image.

Under steady load glibc's malloc keeps the memory that batch tensors of varying shapes leave behind,
so a bare server's resident memory ratchets up, where jemalloc hands unused pages back to the OS
(docs/RELIABILITY.md, Soak and Overload). An allocator can only be swapped before the process starts,
so `exitserve serve` re-executes itself once, with the library in LD_PRELOAD, before it imports torch
(first thing in the CLI's `main`); the process keeps its PID, arguments and environment. The
`allocator` setting (`--set allocator=...` or EXITSERVE_ALLOCATOR, read here before the CLI parses its
arguments) chooses:

- `auto` (default): jemalloc if found, else the system's malloc;
- `jemalloc`: jemalloc, or refuse to start when it is missing;
- `system`: no re-exec (a library preloaded from outside, as in the Docker image, stays).

jemalloc is found in the system's library directories (Debian/Ubuntu `libjemalloc2`, the Docker
image's) or in the virtualenv's `lib/`, where scripts/setup.sh puts the same Debian package's library
without root (`apt-get download` + `dpkg-deb -x`). Linux only (LD_PRELOAD); `auto` is `system` elsewhere.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

REEXEC_MARK = "EXITSERVE_ALLOCATOR_PRELOADED"  # set in the re-executed process: never loop
SYSTEM_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                   "/usr/local/lib")
JEMALLOC = "libjemalloc.so.2"


class AllocatorError(ValueError):
    """jemalloc was asked for by name and is not installed."""


def find_jemalloc() -> Path | None:
    """The system's libjemalloc.so.2, else the virtualenv's copy (scripts/setup.sh), else None."""
    for directory in (*SYSTEM_LIB_DIRS, Path(sys.prefix) / "lib"):
        if (Path(directory) / JEMALLOC).is_file():
            return Path(directory) / JEMALLOC
    return None


def loaded() -> str | None:
    """"jemalloc" when it is preloaded into this process (read from its memory map), else None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return "jemalloc" if "libjemalloc" in maps else None


def choose(setting: str) -> Path | None:
    """The library to preload for the `allocator` setting; None for the system's malloc."""
    if setting == "system" or (setting == "auto" and not sys.platform.startswith("linux")):
        return None
    library = find_jemalloc()
    if library is None and setting == "jemalloc":
        raise AllocatorError("allocator jemalloc is not installed (apt-get install libjemalloc2, or rerun "
                             "scripts/setup.sh), or use allocator=system")
    return library


def requested(argv: list[str]) -> str:
    """The `allocator` setting of a command line: `--set allocator=X` (the last one, as in the CLI),
    else EXITSERVE_ALLOCATOR, else auto."""
    items = [value for flag, value in itertools.pairwise(argv) if flag == "--set"]
    items += [arg.removeprefix("--set=") for arg in argv if arg.startswith("--set=")]
    chosen = [item.split("=", 1)[1] for item in items if item.startswith("allocator=")]
    return chosen[-1] if chosen else os.environ.get("EXITSERVE_ALLOCATOR", "auto")


def preload_for(argv: list[str]) -> None:
    """For `exitserve serve ...` (not `--ray`, whose replicas are Ray's processes): `preload` with the
    setting the command line asks for. Any other command runs as it is."""
    if argv[:1] == ["serve"] and "--ray" not in argv:
        preload(requested(argv))


def preload(setting: str) -> None:
    """Re-execute this process with the chosen allocator preloaded, unless it is loaded already (the
    Docker image sets LD_PRELOAD itself) or the system's is chosen. Returns only when no re-exec
    is needed."""
    if setting not in ("auto", "jemalloc") or os.environ.get(REEXEC_MARK) or loaded() is not None:
        return  # system, or a value the settings will refuse with their own message
    library = choose(setting)
    if library is None:
        return
    previous = os.environ.get("LD_PRELOAD")
    env = {**os.environ, "LD_PRELOAD": f"{library}:{previous}" if previous else str(library), REEXEC_MARK: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
