"""`exitserve serve` runs on jemalloc when it is installed (as the Docker image does), re-executing
itself once with LD_PRELOAD; the choice, where jemalloc is found, the re-exec and its refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exitserve.cli import main as cli_main
from exitserve.loadtest.servers import exitserve_command, free_port, wait_ready
from exitserve.server import allocator
from exitserve.server.allocator import (
    REEXEC_MARK,
    AllocatorError,
    choose,
    find_jemalloc,
    preload,
    preload_for,
    requested,
)

JEMALLOC = Path("/x/libjemalloc.so.2")


@pytest.fixture
def installed(monkeypatch):
    """installed(True): pretend libjemalloc.so.2 is installed (at JEMALLOC); installed(False): it is not."""
    def pretend(present: bool) -> None:
        monkeypatch.setattr(allocator, "find_jemalloc", lambda: JEMALLOC if present else None)

    monkeypatch.setattr(allocator.sys, "platform", "linux")
    return pretend


@pytest.mark.parametrize(
    ("present", "setting", "expected"),
    [(True, "auto", JEMALLOC), (False, "auto", None), (True, "jemalloc", JEMALLOC), (True, "system", None)],
)
def test_the_choice(installed, present, setting, expected):
    installed(present)
    assert choose(setting) == expected


def test_jemalloc_asked_for_by_name_but_missing_is_refused_with_the_install_command(installed):
    installed(False)
    with pytest.raises(AllocatorError, match=r"jemalloc is not installed \(apt-get install libjemalloc2"):
        choose("jemalloc")


def test_the_virtualenv_s_copy_is_found_when_the_system_has_none(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, "SYSTEM_LIB_DIRS", (str(tmp_path / "usr-lib"),))
    monkeypatch.setattr(allocator.sys, "prefix", str(tmp_path / "venv"))
    assert find_jemalloc() is None
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    (tmp_path / "venv" / "lib" / "libjemalloc.so.2").write_bytes(b"")  # where scripts/setup.sh puts it
    assert find_jemalloc() == tmp_path / "venv" / "lib" / "libjemalloc.so.2"


def test_preload_re_executes_once_with_the_library_in_front_of_ld_preload(installed, monkeypatch):
    installed(True)
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(allocator, "loaded", lambda: None)
    monkeypatch.setattr(allocator.sys, "orig_argv", ["python3", "-m", "exitserve", "serve", "--port", "9"])
    monkeypatch.setenv("LD_PRELOAD", "/other.so")
    monkeypatch.delenv(REEXEC_MARK, raising=False)
    preload("auto")
    (executable, argv, env), = calls
    assert executable == sys.executable and argv == [sys.executable, "-m", "exitserve", "serve", "--port", "9"]
    assert env["LD_PRELOAD"] == f"{JEMALLOC}:/other.so" and env[REEXEC_MARK] == "1"
    monkeypatch.setenv(REEXEC_MARK, "1")  # the re-executed process: never again
    preload("auto")
    monkeypatch.delenv(REEXEC_MARK)
    monkeypatch.setattr(allocator, "loaded", lambda: "jemalloc")  # preloaded already (the Docker image)
    preload("auto")
    assert len(calls) == 1


def test_serve_refuses_a_missing_named_allocator_in_one_line(installed, monkeypatch, capsys):
    installed(False)
    monkeypatch.setattr(sys, "argv", ["exitserve", "serve", "--set", "allocator=jemalloc", "--set", "warmup=false"])
    assert cli_main() == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "allocator jemalloc is not installed" in lines[0]


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["serve"], None, "auto"),
        (["serve"], "system", "system"),
        (["serve", "--set", "allocator=system"], "jemalloc", "system"),  # the command line wins
        (["serve", "--set=allocator=jemalloc", "--port", "1"], None, "jemalloc"),
        (["serve", "--set", "allocator=system", "--set", "allocator=jemalloc"], None, "jemalloc"),  # the last
        (["serve", "--set", "port=1"], None, "auto"),
    ],
)
def test_the_setting_is_read_from_the_command_line_before_the_parser(monkeypatch, argv, env, expected):
    if env is None:
        monkeypatch.delenv("EXITSERVE_ALLOCATOR", raising=False)
    else:
        monkeypatch.setenv("EXITSERVE_ALLOCATOR", env)
    assert requested(argv) == expected


def test_only_a_plain_serve_re_executes(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "preload", calls.append)
    monkeypatch.delenv("EXITSERVE_ALLOCATOR", raising=False)
    for argv in (["train", "--output", "x"], ["serve", "--ray"], ["evaluate", "serve"], ["serve", "ckpt"]):
        preload_for(argv)
    assert calls == ["auto"]


def test_the_cli_imports_no_torch_before_it_can_re_execute():
    code = "import sys, exitserve.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 is not installed on this machine")
def test_a_real_serve_process_runs_on_jemalloc_when_it_is_installed(tiny_checkpoint):
    for setting, expect in (("auto", True), ("system", False)):
        port = free_port()
        cmd = exitserve_command(tiny_checkpoint, port, "warmup=false", f"allocator={setting}")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, timeout=300)  # a busy shared machine is slow to start
            maps = Path(f"/proc/{proc.pid}/maps").read_text()  # the same PID after the re-exec
        finally:
            proc.terminate()
            log = proc.communicate(timeout=30)[1]
        assert ("libjemalloc.so.2" in maps) is expect, setting
        assert f"allocator: {'jemalloc' if expect else 'system malloc'}" in log
