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
- at most `max_connections` connections are open. One more first makes room: of the client address
  holding the most connections that wait for a request (pre-opened, kept-alive idle, or trickling a
  head) -- more than the new connection's own address holds -- the one waiting longest is closed, if
  it has waited at least `EVICTION_GRACE` (nginx, out of connections, likewise closes idle ones).
  Otherwise the new one is answered 503 and closed at once. So a flood of idle connections from one
  address yields to every other address's requests, and its own reconnections are refused instead of
  churning; clients that share the flood's address (behind a proxy) are refused as before;
- a request answered before its body was read (401, 413, 429: GuardMiddleware refuses them unread)
  leaves the rest of that body on the connection. The parser reads it as the refused request's body
  and drops it -- up to `drain_limit` bytes within `body_timeout` seconds, else the connection is
  closed -- and the next request on a kept-alive connection is read after it. (These bytes used to
  count as the next request's head: an extra 431, and the next request lost.)

The request body is bounded in time by GuardMiddleware (`body_timeout`), where the app reads it.
What each bound buys is measured in docs/RELIABILITY.md ("Slow clients", "Connection floods").
Every answer given here comes from the error table (server/error_format.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import h11

from exitserve.server.error_format import KINDS, ErrorKind, error_bytes
from exitserve.server.settings import Settings

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; nginx allows 4 x 8 KiB by default, h11 16 KiB
MIN_DRAIN_BYTES = 8 * 1024 * 1024
EVICTED = "connection_evicted"  # the failure label of an idle connection closed to make room for a new one
EVICTION_GRACE = 0.25  # seconds a connection may wait for its request before it may be closed to make room


def drain_limit(settings: Settings) -> int:
    """How much of a body answered before it was read (401, 413, 429) is read and dropped to keep the
    connection usable: four times the body limit, at least 8 MiB; beyond, the connection is closed."""
    return max(MIN_DRAIN_BYTES, 4 * settings.max_body_bytes)


class SlowClientGuard:
    """Mixin over a uvicorn HTTP protocol (which has `connections`, `transport`, `loop` and the
    request/response `cycle`); `guarded_protocol` fills in the class attributes, among them the two
    registries of connections that may be closed to make room (shared by the server's connections)."""

    header_timeout: float
    body_timeout: float
    max_connections: int
    drain_limit: int
    on_refused: Callable[[str], None]  # called with the failure label (header_timeout, header_too_large, ...)
    # per client address, the connections waiting for a request (or for the rest of its head), oldest
    # first, with the loop time they started waiting: the ones that may be closed to make room
    waiting: dict[str, dict[SlowClientGuard, float]]

    _timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _drained = 0
    _message_open = False  # httptools: a request's head is parsed and its body not all in

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._make_room():
            self._refuse(KINDS["too_many_connections"],
                         f"the server holds {self.max_connections} connections, all busy; retry later")
            return
        self._await_head(timed=True)

    def data_received(self, data: bytes) -> None:
        was_draining = self._draining()
        if was_draining:
            self._drained += len(data)
            if self._drained > self.drain_limit:  # answered already; a body this large is not read to its end
                self._close()
                return
        elif self._waiting_for_head():
            if not self._head_bytes and self._timer is None:  # a kept-alive connection's next request begins
                self._start(self.header_timeout, self._head_timed_out)
            self._head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing() or self._draining():
            return
        if was_draining:  # the refused request's body is all in: wait for the next request, bounded
            self._await_head(timed=True)
        if not self._waiting_for_head():
            self._head_arrived()
        elif self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(KINDS["header_too_large"], f"the request head is over {MAX_HEAD_BYTES} bytes")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._draining():  # answered before its body was read (401, 413, 429): read the rest and drop it
            self._drained = 0
            self._start(self.body_timeout, self._close)
        elif self._waiting_for_head():
            self._await_head(timed=False)  # uvicorn's keep-alive timeout bounds the wait for the next request

    # httptools' parser callbacks (h11 keeps its own state: `_body_pending`)
    def on_headers_complete(self) -> None:
        self._message_open = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._message_open = False
        super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self._stop()
        self._leave()
        super().connection_lost(exc)

    def _body_pending(self) -> bool:
        conn = getattr(self, "conn", None)  # h11's connection state machine
        return conn.their_state is h11.SEND_BODY if conn is not None else self._message_open

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or (self.cycle.response_complete and not self._body_pending())

    def _draining(self) -> bool:
        return self.cycle is not None and self.cycle.response_complete and self._body_pending()

    def _await_head(self, timed: bool) -> None:
        """Idle until a request's head is in (the connection may be closed to make room for another);
        `timed`: the header timeout runs from now."""
        self._head_bytes = 0
        self._leave()
        self.waiting.setdefault(self._client(), {})[self] = self.loop.time()
        if timed:
            self._start(self.header_timeout, self._head_timed_out)
        else:
            self._stop()

    def _head_arrived(self) -> None:
        self._stop()
        self._leave()

    def _client(self) -> str:
        return self.client[0] if self.client else ""

    def _make_room(self) -> bool:
        """Close one connection that waits for a request, so that this new one gets in: the one waiting
        longest of the client address with the most of them -- more than this one's address has (an
        address never makes room by closing its own: a flood that reconnects would churn for ever)
        -- if it has waited `EVICTION_GRACE` seconds (time to send its request). True if closed."""
        now, mine = self.loop.time(), len(self.waiting.get(self._client(), ()))
        for conns in sorted(self.waiting.values(), key=len, reverse=True):
            if len(conns) <= mine:
                return False
            oldest, since = next(iter(conns.items()))
            if now - since >= EVICTION_GRACE:
                oldest.on_refused(EVICTED)
                oldest._close()
                return True
        return False

    def _leave(self) -> None:
        client = self._client()
        conns = self.waiting.get(client)
        if conns is not None and conns.pop(self, None) is not None and not conns:
            del self.waiting[client]

    def _start(self, seconds: float, callback: Callable[[], None]) -> None:
        self._stop()
        self._timer = self.loop.call_later(seconds, callback)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        # a client that sent nothing (an idle pre-opened connection) is closed without an answer
        message = f"the request head did not arrive within {self.header_timeout:g} s"
        self._refuse(KINDS["header_timeout"], message if self._head_bytes else None)

    def _close(self) -> None:
        """Close without an answer or a count: the request had both already (a body left unread)."""
        self._stop()
        self._leave()
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, kind: ErrorKind, message: str | None) -> None:
        """Count the refusal (its failure label), answer `message` as `kind` (None: no answer) and close."""
        self.on_refused(kind.failure)
        if message is not None:
            self.transport.write(error_bytes(kind, message))
        self._close()


def guarded_protocol(base: type[asyncio.Protocol], settings: Settings,
                     on_refused: Callable[[str], None]) -> type[asyncio.Protocol]:
    """`base` (uvicorn's HTTP protocol class) with the bounds above, for `uvicorn.Config(http=...)`."""
    attrs = {"header_timeout": settings.header_timeout, "body_timeout": settings.body_timeout,
             "max_connections": settings.max_connections, "drain_limit": drain_limit(settings),
             "on_refused": staticmethod(on_refused), "waiting": {}}
    return type(f"Guarded{base.__name__}", (SlowClientGuard, base), attrs)
