"""A light HTTP/1.1 client on asyncio streams, shared by the benchmark and the reliability runs.

Light on purpose: the load generator shares the machine's cores with the server it measures, and a
full-featured client (httpx) costs several times more CPU per request, enough to become the
bottleneck at high concurrency on 2 cores. It speaks just what the servers measured here answer:
HTTP/1.1 with a content-length.
"""

from __future__ import annotations

import asyncio
import time


class Client:
    """At most `max_connections` requests in flight; keep-alive connections are reused unless
    `keep_alive` is off (then every request opens its own connection and says `connection: close`)."""

    IDLE_LIMIT = 3.0  # seconds; below uvicorn's keep-alive timeout (5 s), so the server never closes one first

    def __init__(self, host: str, port: int, max_connections: int = 1024, keep_alive: bool = True):
        self.host, self.port, self.keep_alive = host, port, keep_alive
        self.slots = asyncio.Semaphore(max_connections)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.in_flight = self.peak_in_flight = 0

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer, since = self._idle.pop()
            if time.monotonic() - since < self.IDLE_LIMIT and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        status, _, payload = await self.fetch(method, path, body)
        return status, payload

    async def fetch(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body)."""
        async with self.slots:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                return await self._exchange(method, path, body)
            finally:
                self.in_flight -= 1

    async def _exchange(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await self._connection()
        close = "" if self.keep_alive else "connection: close\r\n"
        head = (f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n{close}\r\n")
        try:
            writer.write(head.encode() + body)
            response = await reader.readuntil(b"\r\n\r\n")
            headers = response.decode("latin-1").lower().split("\r\n")
            lengths = [int(h.split(":", 1)[1]) for h in headers if h.startswith("content-length:")]
            if not lengths:
                raise ValueError("a response without content-length")
            payload = await reader.readexactly(lengths[0])
        except BaseException:
            writer.close()
            raise
        if self.keep_alive and "connection: close" not in headers:
            self._idle.append((reader, writer, time.monotonic()))
        else:
            writer.close()
        fields = dict(h.split(":", 1) for h in headers[1:] if ":" in h)
        return int(headers[0].split()[1]), {k.strip(): v.strip() for k, v in fields.items()}, payload

    def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()
