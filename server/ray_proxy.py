"""What runs in Ray Serve's HTTP proxy: Ray's own plain-text errors put into exitserve's error format.

Kept apart from server/ray_serve.py so the proxy imports no model code (torch, transformers): the
proxy must answer Ray's readiness check within seconds, even on a busy machine.
"""

from __future__ import annotations

from typing import Any

from starlette.middleware import Middleware

from exitserve.server.error_format import KINDS, ErrorKind, error_response

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
                                          headers or None)
                return await response(scope, receive, send)
            await send(message)

        await self.app(scope, receive, rewrite)


def proxy_middlewares() -> list[Middleware]:
    """Ray's proxy callback (the env var named in the module docstring)."""
    return [Middleware(RayErrorFormat)]
