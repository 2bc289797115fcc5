"""A checkpoint's small files, read with limits: a damaged or hostile checkpoint gets a one-line
error, never a RecursionError, a memory blow-up or a read that never ends.

A file is opened without blocking and checked on the open descriptor (so it cannot be swapped
after the check): it must be a regular file -- not a FIFO, a device such as /dev/zero or a socket --
of at most its size limit. A JSON file must then be UTF-8 and nest at most `MAX_DEPTH` deep.
`check_readable` applies this to every file of a checkpoint that exitserve or the tokenizer library
reads besides the weights (safetensors checks those itself) before anything parses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

MiB = 1 << 20
MAX_DEPTH = 64  # the checkpoint's own JSON nests 5 deep at most, a tokenizer.json about 6
SMALL_JSON = 4 * MiB  # exit_config.json, config.json, canaries.json, the ONNX manifest
LARGE_FILE = 64 * MiB  # tokenizer files: a multilingual tokenizer.json is ~17 MiB
# what the loaders read, by suffix (the weights are safetensors' business)
READ_SUFFIXES = (".json", ".txt", ".model", ".jinja")
LARGE_NAMES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
               "sentencepiece.bpe.model", "tokenizer.model")


class UnsafeFile(ValueError):
    """A file that is not read: the message says why in one line."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: Path, max_bytes: int) -> bytes:
    """The whole file, if it is a regular file of at most `max_bytes` (FileNotFoundError passes through)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{path} is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise UnsafeFile(f"{path} holds {info.st_size:,} bytes, over the {max_bytes:,}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # a file growing meanwhile is cut short here
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise UnsafeFile(f"{path} grew over the {max_bytes:,}-byte limit while being read")
    return data


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def read_json(path: Path, max_bytes: int = SMALL_JSON) -> Any:
    """A JSON file within the limits (module docstring); UnsafeFile otherwise."""
    data = read_bytes(path, max_bytes)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UnsafeFile(f"{path} is not UTF-8 (byte {exc.start})") from exc
    except RecursionError as exc:
        raise UnsafeFile(f"{path} nests deeper than {MAX_DEPTH} levels") from exc
    except json.JSONDecodeError as exc:
        raise UnsafeFile(f"{path} is not valid JSON: {exc}") from exc
    if depth(value) > MAX_DEPTH:
        raise UnsafeFile(f"{path} nests deeper than {MAX_DEPTH} levels")
    return value


def limit_for(name: str) -> int:
    return LARGE_FILE if name in LARGE_NAMES else SMALL_JSON


def check_readable(directory: Path) -> None:
    """Every file the loaders will read in `directory` (by suffix) is safe to read; JSON files parse."""
    for path in sorted(directory.iterdir()):
        if not path.name.endswith(READ_SUFFIXES):
            continue
        try:
            if path.suffix == ".json":
                read_json(path, limit_for(path.name))
            else:
                read_bytes(path, limit_for(path.name))
        except UnsafeFile:
            raise
        except OSError as exc:  # a dangling link, no permission, ...
            raise UnsafeFile(f"{path} cannot be read: {exc.strerror or exc}") from exc
