"""Slow and idle clients against a real `exitserve serve` process, over raw sockets, with both of
uvicorn's HTTP parsers: every kind of slow connection is closed within its bound (with a 408 in the
error format when the client had started a request), and the number of connections is capped."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from exitserve.loadtest.reliability.scenarios import Options
from exitserve.loadtest.reliability.slow_clients import slow_clients
from exitserve.loadtest.servers import exitserve_command, free_port, wait_ready

LIMITS = ("header_timeout=1", "body_timeout=1", "keep_alive_timeout=1", "max_connections=6")
SLACK = 4.0  # seconds a busy 2-core machine may add to a 1-s bound
STARTUP = 300  # seconds a server may take to become ready on a machine shared with training runs


PARSERS = ("h11", "httptools")


@contextmanager
def serving(checkpoint, parser: str, *settings: str) -> Iterator[int]:
    """`exitserve serve` with `settings` and uvicorn's `parser`, until the block ends; yields its port."""
    port = free_port()
    cmd = exitserve_command(checkpoint, port, *settings, f"http_protocol={parser}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=STARTUP)
        yield port
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.fixture(scope="module", params=PARSERS)
def server(request, tiny_checkpoint):
    with serving(tiny_checkpoint, request.param, *LIMITS, "warmup=false") as port:
        yield port


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def until_closed(sock: socket.socket, limit: float = 10.0) -> tuple[float, bytes]:
    """Read until the server closes the connection: (seconds it took, everything received)."""
    sock.settimeout(limit)
    start, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return time.monotonic() - start, data


def error_answer(data: bytes, status: int) -> str:
    """The error type of a raw HTTP answer, after checking its status and that it closes the connection."""
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), data[:200]
    assert b"connection: close" in head.lower()
    return json.loads(body)["error"]["type"]


def counted(port: int, line_start: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"connection": "close"}, timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def failures(port: int, reason: str) -> float:
    return counted(port, f'exitserve_request_failures_total{{reason="{reason}"}}')


HEAD = b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(server):
    before = failures(server, "header_timeout")
    with connect(server) as sock:
        seconds, data = until_closed(sock)
    assert data == b"" and 0.9 <= seconds < 1 + SLACK
    assert failures(server, "header_timeout") == before + 1


def test_a_head_trickled_byte_by_byte_gets_408_and_is_closed(server):
    request = HEAD + b"x-padding: " + b"a" * 200 + b"\r\n\r\n"
    with connect(server) as sock:
        start = time.monotonic()
        try:
            for byte in request:  # 10 bytes a second: the whole head would take 28 s
                sock.send(bytes([byte]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        _, data = until_closed(sock)
    assert 0.9 <= time.monotonic() - start < 1 + SLACK
    assert error_answer(data, 408) == "request_timeout"


def test_a_body_that_stops_coming_gets_408_and_is_closed(server):
    before = failures(server, "body_timeout")
    with connect(server) as sock:
        sock.sendall(HEAD + b"content-length: 100\r\n\r\n" + b'{"text": "a')
        seconds, data = until_closed(sock)
    assert 0.9 <= seconds < 1 + SLACK
    assert error_answer(data, 408) == "request_timeout"
    assert failures(server, "body_timeout") == before + 1


def test_a_head_over_64_kib_is_refused(server, request):
    with connect(server) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(HEAD + b"x-big: " + b"a" * 200_000)
        seconds, data = until_closed(sock)
    assert seconds < SLACK
    if "h11" in request.node.callspec.id:  # h11 bounds a head itself, at 16 KiB, with a plain-text 400
        assert data.startswith(b"HTTP/1.1 400 ")
    else:  # httptools would take it all into memory; the guard stops it at 64 KiB
        assert error_answer(data, 431) == "header_too_large"


def test_an_idle_kept_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        seconds, data = until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b'{"status":"ok"}')
    assert seconds < 1 + SLACK


def test_a_client_that_leaves_mid_body_counts_as_499_not_400(server):
    before = counted(server, 'exitserve_requests_total{route="/predict",status="499"}')
    with connect(server) as sock:
        sock.sendall(HEAD + b"content-length: 100\r\n\r\n" + b'{"text": "a')
        time.sleep(0.2)
    end = time.monotonic() + SLACK
    while counted(server, 'exitserve_requests_total{route="/predict",status="499"}') == before:
        assert time.monotonic() < end, "the disconnect was not counted"
        time.sleep(0.05)
    assert failures(server, "disconnected_mid_body") >= 1
    assert counted(server, 'exitserve_requests_total{route="/predict",status="400"}') == 0


def test_connections_over_the_cap_are_refused_at_once_and_service_resumes(server):
    held = [connect(server) for _ in range(6)]  # max_connections=6, all idle
    try:
        time.sleep(0.3)  # the server has accepted them
        with connect(server) as extra:
            seconds, data = until_closed(extra)
        assert seconds < SLACK and error_answer(data, 503) == "too_many_connections"
        assert b"retry-after: 1" in data.lower()
    finally:
        for sock in held:
            sock.close()
    end = time.monotonic() + SLACK
    while True:  # the held ones are gone: a normal request is served again
        try:
            r = httpx.post(f"http://127.0.0.1:{server}/predict", json={"text": "fine"}, timeout=10)
            if r.status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, "not served after the held connections closed"
        time.sleep(0.1)
    assert failures(server, "too_many_connections") >= 1


def test_the_slow_clients_run_measures_what_the_server_holds(tiny_checkpoint, tmp_path):
    opts = Options(tiny_checkpoint, ["header_timeout=1", "body_timeout=1", "warmup=false"], tmp_path,
                   ["a fine film"], logs=tmp_path)
    result = slow_clients(opts, count=3, seconds=4)
    for kind in ("idle", "head", "body"):
        assert result["kinds"][kind]["opened"] == 3 and result["kinds"][kind]["still_open_at_end"] == 0, kind
    assert result["kinds"]["idle"]["answers"] == {"None": 3}  # closed without an answer
    assert result["kinds"]["head"]["answers"] == result["kinds"]["body"]["answers"] == {"408": 3}
    assert set(result["probes"]) == {"200"}
    assert (tmp_path / "slow-clients.json").is_file() and (tmp_path / "slow-clients.png").is_file()
