"""Connection-level holes a hostile tester found, against a real `exitserve serve` process over raw
sockets with both of uvicorn's HTTP parsers: a request refused before its body was read must not
leave that body to be parsed as the next request (desync), and a flood of idle connections must not
lock real clients out."""

from __future__ import annotations

import contextlib
import json
import socket

import httpx
import pytest

from exitserve.loadtest.reliability.flood import flood, flood_against
from exitserve.loadtest.reliability.scenarios import Options
from tests.reliability.test_slow_clients import PARSERS, connect, failures, serving, until_closed

KEY = "s3cret"
LIMITS = ("api_key=" + KEY, "max_body_bytes=10000", "max_connections=40", "header_timeout=30", "warmup=false")


@pytest.fixture(scope="module", params=PARSERS)
def server(request, tiny_checkpoint):
    with serving(tiny_checkpoint, request.param, *LIMITS) as port:
        yield port


def post(body: bytes, *, key: str | None = None, length: int | None = None) -> bytes:
    auth = b"authorization: Bearer %s\r\n" % key.encode() if key else b""
    return (b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n%s"
            b"content-length: %d\r\n\r\n%s" % (auth, len(body) if length is None else length, body))


NEXT = post(b'{"text": "a fine film"}', key=KEY)  # the keep-alive request that must be answered


def responses(data: bytes) -> list[tuple[int, dict]]:
    """Every HTTP/1.1 response in `data` (content-length framed): (status, JSON body)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 "), data[:200]
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
            b"content-length:"))
        out.append((int(head[9:12]), json.loads(rest[:length])))
        data = rest[length:]
    return out


def read_responses(sock: socket.socket, count: int) -> tuple[list[tuple[int, dict]], bool]:
    """Read until `count` whole responses came or the server closed the connection: (responses, closed)."""
    data = b""
    sock.settimeout(15)
    while True:
        try:
            got = responses(data)
            if len(got) >= count:
                return got, False
        except (AssertionError, StopIteration, ValueError, json.JSONDecodeError):
            pass  # not all there yet
        chunk = sock.recv(65536)
        if not chunk:
            return responses(data), True
        data += chunk


REFUSED = [  # (request, status): answered before its body is read
    (post(b'{"text": "' + b"x" * 200_000 + b'"}'), 401),  # no API key
    (post(b'{"text": "' + b"x" * 100_000 + b'"}', key=KEY), 413),  # declared over max_body_bytes
]


@pytest.mark.parametrize(("refused", "status"), REFUSED, ids=["401", "413"])
def test_a_body_refused_unread_is_not_parsed_as_the_next_request(server, refused, status):
    cut = refused.index(b"\r\n\r\n") + 1000  # the head and the body's first kilobyte
    with connect(server) as sock:
        sock.sendall(refused[:cut])
        (first,), _ = read_responses(sock, 1)  # answered at once, while most of the body is still to come
        assert first[0] == status
        sock.sendall(refused[cut:] + NEXT)  # the rest of the refused body, then the next request on the same connection
        (second,), closed = read_responses(sock, 1)
    assert second[0] == 200 and second[1]["prediction"] in ("negative", "positive"), second  # was a 431, closed
    assert not closed


def test_a_huge_body_refused_unread_closes_the_connection_after_a_bounded_drain(server):
    body = b"x" * (9 * 1024 * 1024)  # more than the 8 MiB drained; declared even larger
    with connect(server) as sock:
        sock.sendall(post(b"", key=KEY, length=100 * 1024 * 1024))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(body)
        _, data = until_closed(sock)
    assert data.startswith(b"HTTP/1.1 413 ") and data.count(b"HTTP/1.1 ") == 1, data[:300]


def test_a_flood_of_idle_connections_does_not_lock_real_clients_out(server, tmp_path):
    evicted = failures(server, "connection_evicted")
    result = flood_against(server, idle=150, seconds=6, clients=2, headers={"authorization": f"Bearer {KEY}"})
    assert result["flood"]["opened"] > 150  # it reconnected as connections were closed to make room
    real = result["real"]
    assert real["sent"] >= 10 and real["success_rate"] >= 0.95, (real, result["timeline"]["real"])
    assert failures(server, "connection_evicted") > evicted
    assert httpx.get(f"http://127.0.0.1:{server}/health", timeout=10).status_code == 200


def test_the_flood_run_writes_its_report(tiny_checkpoint, tmp_path):
    opts = Options(tiny_checkpoint, ["max_connections=40", "warmup=false"], tmp_path, ["a fine film"], logs=tmp_path)
    result = flood(opts, idle=150, seconds=4, clients=2)
    assert result["real"]["success_rate"] >= 0.95
    assert (tmp_path / "flood.json").is_file() and (tmp_path / "flood.png").is_file()


def test_with_nothing_idle_to_close_a_connection_over_the_cap_is_still_refused(server):
    held = [connect(server) for _ in range(40)]  # max_connections=40
    try:
        for sock in held:  # each inside a request (a body that has not come): none may be closed for room
            sock.sendall(post(b"", key=KEY, length=100))
        with connect(server) as extra:
            _, data = until_closed(extra)
        assert data.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in data
    finally:
        for sock in held:
            sock.close()
    socket.create_connection(("127.0.0.1", server), timeout=10).close()
