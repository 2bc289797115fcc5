"""Reading a checkpoint's small files with limits: no FIFO or device is read, no file over its size,
no JSON nested deeper than the limit, and every refusal is one line."""

from __future__ import annotations

import os
import time

import pytest

from exitserve.models.bounded_files import MAX_DEPTH, UnsafeFile, check_readable, depth, read_bytes, read_json


def test_a_regular_json_file_within_the_limits_is_read(tmp_path):
    (tmp_path / "a.json").write_text('{"a": [1, {"b": null}]}')
    assert read_json(tmp_path / "a.json") == {"a": [1, {"b": None}]}
    assert depth({"a": [1, {"b": None}]}) == 3 and depth(5) == 0


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "x.json")
    start = time.monotonic()
    with pytest.raises(UnsafeFile, match="is a FIFO, not a regular file"):
        read_json(tmp_path / "x.json")
    assert time.monotonic() - start < 5


def test_a_device_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").symlink_to("/dev/zero")
    with pytest.raises(UnsafeFile, match="is a character device"):
        read_json(tmp_path / "tokenizer.json")


def test_a_file_over_its_limit_is_refused_before_it_is_read(tmp_path):
    (tmp_path / "big.json").write_text("[" + "0," * 1000 + "0]")
    with pytest.raises(UnsafeFile, match=r"holds 2,003 bytes, over the 1,000-byte limit"):
        read_json(tmp_path / "big.json", max_bytes=1000)
    assert len(read_bytes(tmp_path / "big.json", 5000)) == 2003


@pytest.mark.parametrize("nesting", [MAX_DEPTH + 1, 100_000])
def test_json_nested_too_deeply_is_one_line_not_a_recursion_error(tmp_path, nesting):
    (tmp_path / "deep.json").write_text("[" * nesting + "]" * nesting)
    with pytest.raises(UnsafeFile, match=f"nests deeper than {MAX_DEPTH} levels") as err:
        read_json(tmp_path / "deep.json")
    assert "\n" not in str(err.value)


def test_json_at_the_depth_limit_is_read(tmp_path):
    (tmp_path / "ok.json").write_text("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert depth(read_json(tmp_path / "ok.json")) == MAX_DEPTH


@pytest.mark.parametrize(("content", "reason"), [(b"\xff\xfe{}", "is not UTF-8"), (b"{nope", "is not valid JSON")])
def test_a_broken_json_file_says_why(tmp_path, content, reason):
    (tmp_path / "x.json").write_bytes(content)
    with pytest.raises(UnsafeFile, match=reason):
        read_json(tmp_path / "x.json")


def test_check_files_covers_what_the_loaders_read_and_nothing_else(tmp_path):
    (tmp_path / "model.safetensors").symlink_to("/dev/zero")  # safetensors' own business
    (tmp_path / "notes.bin").write_bytes(b"\0" * 10)
    check_readable(tmp_path)
    (tmp_path / "vocab.txt").symlink_to(tmp_path / "missing")
    with pytest.raises(UnsafeFile, match=r"vocab\.txt cannot be read"):
        check_readable(tmp_path)
