"""What runs in Ray Serve's HTTP proxy: a request whose replica died is sent to another one, and Ray's
own plain-text errors are put into exitserve's error format.

Kept apart from server/ray_serve.py so the proxy imports no model code (torch, transformers): the
proxy must answer Ray's readiness check within seconds, even on a busy machine.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.middleware import Middleware

from exitserve.server.error_format import KINDS, ErrorKind, dialect_of, error_response, kind_response

log = logging.getLogger("exitserve")

RETRY_ATTEMPTS = 3  # replicas one request is tried on
RETRY_PAUSE_S = 0.2  # before a retry: time for the router to hear that the replica is gone
RETRY_BODY_LIMIT = 1_000_000  # the replicas' default max_body_bytes; a larger body streams through, once
RETRIES_HEADER = "x-exitserve-retries"  # on an answer that needed retries: how many
# Ray's own answers, as the kinds of exitserve's error table that mean the same: its backpressure is
# exitserve's overload, its request timeout (request_timeout_s) a deadline the server missed, and "no
# healthy replica" a model not ready. A client then sees one status and type per meaning, whichever
# server answers.
RAY_KINDS: dict[int, ErrorKind] = {408: KINDS["deadline_exceeded"], 429: KINDS["overloaded"], 503: KINDS["not_ready"]}


class RayErrorFormat:
    """Pure ASGI, in Ray's proxy: Ray's own plain-text 408/429/503 answers become exitserve errors (RAY_KINDS).

    The replicas' own errors are JSON already and pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}

        async def rewrite(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] in RAY_KINDS and headers.get(b"content-type", b"").startswith(b"text/"):
                    held.update(start=message, body=b"", headers=headers)
                    return
            elif held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                kind = RAY_KINDS[held["start"]["status"]]
                retry = held["headers"].get(b"retry-after")
                headers = {**(kind.headers() or {}), **({"Retry-After": retry.decode()} if retry else {})}
                response = error_response(kind.status, kind.type, held["body"].decode(errors="replace"),
                                          headers or None, dialect_of(scope["path"]))
                return await response(scope, receive, send)
            await send(message)

        await self.app(scope, receive, rewrite)


class Replay:
    """A `receive` that hands out the body read so far, then the client's own messages (the rest of
    the body, or its disconnect), noting whether the client has left."""

    def __init__(self, receive):
        self.receive, self.body, self.more, self.client_left = receive, b"", True, False

    async def read_body(self) -> None:
        """Read the body up to just over RETRY_BODY_LIMIT (`more`: whether some is still unread)."""
        while self.more and len(self.body) <= RETRY_BODY_LIMIT and not self.client_left:
            message = await self.next()
            self.body += message.get("body", b"")
            self.more = message.get("more_body", False)

    async def next(self) -> dict:
        message = await self.receive()
        self.client_left = self.client_left or message["type"] == "http.disconnect"
        return message

    def again(self):
        pending = [{"type": "http.request", "body": self.body, "more_body": self.more}]

        async def receive_again():
            return pending.pop() if pending else await self.next()

        return receive_again


class RetryLostReplica:
    """Pure ASGI, in Ray's proxy: a request whose replica died before answering goes to another replica.

    Ray's router retries only requests that no replica has accepted yet; when the replica dies with
    the request in hand (its node lost, its process killed), Ray's proxy sends no response at all and
    the client would get a bare 500. Every exitserve route is a pure function of the request, so it
    is safe to send it again: up to RETRY_ATTEMPTS replicas, then 503 `unavailable`. Never retried: a
    response that has started, a body over RETRY_BODY_LIMIT (it is not kept), a client that left."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        replay = Replay(receive)
        await replay.read_body()
        if replay.more or len(replay.body) > RETRY_BODY_LIMIT:
            return await self.app(scope, replay.again(), send)
        for attempt in range(RETRY_ATTEMPTS):
            started = False

            async def forward(message, retries=attempt):
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    if retries:
                        message["headers"] = [*message.get("headers", []), (RETRIES_HEADER.encode(), b"%d" % retries)]
                await send(message)

            await self.app(dict(scope), replay.again(), forward)
            if started or replay.client_left:
                return
            log.warning("%s %s: the replica was lost before it answered (attempt %d of %d)", scope["method"],
                        scope["path"], attempt + 1, RETRY_ATTEMPTS)
            await asyncio.sleep(RETRY_PAUSE_S)
        response = kind_response(KINDS["replicas_lost"], f"no replica answered in {RETRY_ATTEMPTS} attempts "
                                 "(replicas lost)", dialect_of(scope["path"]))
        await response(scope, receive, send)


def proxy_middlewares() -> list[Middleware]:
    """Ray's proxy callback (the env var named in the module docstring); the last one listed is outermost."""
    return [Middleware(RayErrorFormat), Middleware(RetryLostReplica)]
