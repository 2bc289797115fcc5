"""The C allocator `exitserve serve` runs on: jemalloc when it is installed, as in the Docker image.

Under steady load glibc's malloc keeps the memory that batch tensors of varying shapes leave behind,
so a bare server's resident memory ratchets up, where jemalloc hands unused pages back to the OS
(docs/RELIABILITY.md, Soak and Overload). An allocator can only be swapped before the process starts,
so `exitserve serve` re-executes itself once, with the library in LD_PRELOAD, before it imports any
model code; the process keeps its PID, arguments and environment. The `allocator` setting chooses:

- `auto` (default): jemalloc if found (Debian/Ubuntu `libjemalloc2`, RHEL `jemalloc`), else mimalloc
  if the `cmeel-mimalloc` wheel is installed (a pip install, no root needed), else the system's;
- `jemalloc` / `mimalloc`: that one, or refuse to start when it is missing;
- `system`: the C library's own malloc.

Linux only (LD_PRELOAD); elsewhere every choice but an explicit one runs on the system allocator.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

REEXEC_MARK = "EXITSERVE_ALLOCATOR_PRELOADED"  # set in the re-executed process: never loop
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


class AllocatorError(ValueError):
    """An allocator that was asked for by name is not installed."""


def find_jemalloc() -> Path | None:
    return next((Path(d) / "libjemalloc.so.2" for d in LIB_DIRS if (Path(d) / "libjemalloc.so.2").is_file()), None)


def find_mimalloc() -> Path | None:
    try:
        dist = importlib.metadata.distribution("cmeel-mimalloc")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if f.name.startswith("libmimalloc.so")]
    return Path(str(dist.locate_file(min(files, key=lambda f: len(f.name))))) if files else None


FINDERS = {"jemalloc": find_jemalloc, "mimalloc": find_mimalloc}
INSTALL = {"jemalloc": "apt-get install libjemalloc2", "mimalloc": "pip install cmeel-mimalloc"}


def loaded() -> str | None:
    """The allocator preloaded into this process (from its memory map), if any."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return next((name for name in FINDERS if f"lib{name}" in maps), None)


def choose(setting: str) -> tuple[str, Path | None]:
    """(allocator name, library to preload or None) for the `allocator` setting."""
    if setting == "system" or (setting == "auto" and not sys.platform.startswith("linux")):
        return "system", None
    for name in FINDERS if setting == "auto" else (setting,):
        library = FINDERS[name]()
        if library is not None:
            return name, library
    if setting != "auto":
        raise AllocatorError(f"allocator {setting} is not installed ({INSTALL[setting]}), or use allocator=system")
    return "system", None


def preload(setting: str) -> None:
    """Re-execute this process with the chosen allocator preloaded, unless it is loaded already (the
    Docker image sets LD_PRELOAD itself) or the system's is chosen. Returns only when no re-exec
    is needed."""
    if os.environ.get(REEXEC_MARK) or loaded() is not None:
        return
    name, library = choose(setting)
    if library is None:
        return
    previous = os.environ.get("LD_PRELOAD")
    env = {**os.environ, "LD_PRELOAD": f"{library}:{previous}" if previous else str(library), REEXEC_MARK: name}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
