"""Bounds on connections that uvicorn itself leaves open: slow request heads and too many connections.

uvicorn (0.54) closes a kept-alive connection after `timeout_keep_alive` seconds of idleness, but
nothing else: a connection that never sends a byte, or trickles its request head one byte at a time,
is held for ever, and so is any number of them (up to the file-descriptor limit). `limit_concurrency`
does not help: it answers 503 to requests over the limit but holds their connections all the same.
`guarded_protocol` subclasses whichever HTTP protocol uvicorn chose (httptools or h11) so that:

- a request head (request line and headers) must be complete within `header_timeout` seconds from
  the connection's opening, or from the first byte of the next request on a kept-alive connection;
  otherwise the connection is closed (with a 408 in the error format if some of the head had come);
- a request head holds at most `MAX_HEAD_BYTES` (with httptools nothing bounds it: a client could
  stream hundreds of MB of one header into memory); beyond, 431 and the connection is closed;
- at most `max_connections` connections are open: one more is answered 503 and closed at once.

The request body is bounded in time by GuardMiddleware (`body_timeout`), where the app reads it.
What each bound buys is measured in docs/RELIABILITY.md ("Slow clients").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from exitserve.server.settings import Settings

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; nginx allows 4 x 8 KiB by default, h11 16 KiB


def _error_bytes(status: int, reason: str, type_: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n")
    return head.encode() + body


class SlowClientGuard:
    """Mixin over a uvicorn HTTP protocol (which has `connections`, `transport`, `loop` and the
    request/response `cycle`); `guarded_protocol` fills in the class attributes."""

    header_timeout: float
    max_connections: int
    on_refused: Callable[[str], None]  # called with the failure reason (header_timeout, header_too_large, ...)

    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse("too_many_connections", _error_bytes(
                503, "Service Unavailable", "too_many_connections",
                f"the server holds {self.max_connections} connections; retry later", "retry-after: 1\r\n"))
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_head():
            self._arm()
            self._head_bytes += len(data)
        super().data_received(data)
        if not self._waiting_for_head():
            self._disarm()
        elif self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse("header_too_large", _error_bytes(
                431, "Request Header Fields Too Large", "header_too_large",
                f"the request head is over {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        answer = _error_bytes(408, "Request Timeout", "request_timeout",
                              f"the request head did not arrive within {self.header_timeout:g} s")
        # a client that sent nothing (an idle pre-opened connection) is closed without an answer
        self._refuse("header_timeout", answer if self._head_bytes else b"")

    def _refuse(self, reason: str, answer: bytes) -> None:
        """Count the refusal (a failure `reason`), send `answer` and close the connection."""
        self._disarm()
        self.on_refused(reason)
        if answer:
            self.transport.write(answer)
        self.transport.close()


def guarded_protocol(base: type[asyncio.Protocol], settings: Settings,
                     on_refused: Callable[[str], None]) -> type[asyncio.Protocol]:
    """`base` (uvicorn's HTTP protocol class) with the bounds above, for `uvicorn.Config(http=...)`."""
    attrs = {"header_timeout": settings.header_timeout, "max_connections": settings.max_connections,
             "on_refused": staticmethod(on_refused)}
    return type(f"Guarded{base.__name__}", (SlowClientGuard, base), attrs)
