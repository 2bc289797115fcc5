"""What runs in Ray Serve's HTTP proxy: Ray's own plain-text errors put into exitserve's error format.

Kept apart from server/ray_serve.py so the proxy imports no model code (torch, transformers): the
proxy must answer Ray's readiness check within seconds, even on a busy machine.
"""

from __future__ import annotations

from typing import Any

from starlette.middleware import Middleware

from exitserve.server.error_format import error_response

RAY_ERROR_TYPES = {408: "timeout", 429: "overloaded", 503: "unavailable"}


class RayErrorFormat:
    """Pure ASGI, in Ray's proxy: Ray's own plain-text 408/429/503 answers become exitserve errors.

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
                if message["status"] in RAY_ERROR_TYPES and headers.get(b"content-type", b"").startswith(b"text/"):
                    held.update(start=message, body=b"", headers=headers)
                    return
            elif held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                status = held["start"]["status"]
                retry = held["headers"].get(b"retry-after")
                response = error_response(status, RAY_ERROR_TYPES[status], held["body"].decode(errors="replace"),
                                          {"Retry-After": retry.decode()} if retry else None)
                return await response(scope, receive, send)
            await send(message)

        await self.app(scope, receive, rewrite)


def proxy_middlewares() -> list[Middleware]:
    """Ray's proxy callback (the env var named in the module docstring)."""
    return [Middleware(RayErrorFormat)]
