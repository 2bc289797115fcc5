"""`GuardMiddleware`: what every request goes through before the routes, and where it is counted.

In order, before anything of the request is parsed: the API key (401, for /predict and /info),
then the overload shortcut (429 for /predict while the queue has no room for even one input: refusing
stays cheap under overload), then the declared body size (413). While the route reads the body, the
middleware bounds it: over `max_body_bytes` (413), not all there within `body_timeout` seconds of the
request's head (408, connection closed), or the client gone before its end (499). Last, it counts the
request by route and status, and its failure (if its answer carried one: errors.reply) by reason.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from exitserve.server.errors import (
    FAILURE_KEY,
    APIError,
    BodyReadError,
    BodyTimeout,
    BodyTooLarge,
    ClientGoneMidBody,
    api_error,
    reply,
)
from exitserve.server.scheduler import QueueFull
from exitserve.server.settings import Settings

KEYED_ROUTES = ("/predict", "/info")  # need the API key, when one is set
COUNTED_ROUTES = ("/predict", "/health", "/ready", "/info", "/metrics")  # any other path counts as "other"


def authorized(settings: Settings, headers: list[tuple[bytes, bytes]]) -> bool:
    """True without an API key, or with `Authorization: Bearer KEY` (compared in constant time)."""
    if not settings.api_key:
        return True
    header = next((value for name, value in headers if name == b"authorization"), b"")
    scheme, _, token = header.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(token, settings.api_key.encode())


UNAUTHORIZED = "missing or wrong API key (Authorization: Bearer KEY)"


class GuardMiddleware:
    """Pure ASGI (see the module docstring). `state` is the app's state: its `settings`, and its
    `service` once loaded."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings: Settings = self.state.settings
        route, started, status = scope["path"], time.monotonic(), {"code": 500, "sent": False}
        scope.setdefault("state", {})[FAILURE_KEY] = None

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        service = getattr(self.state, "service", None)
        try:
            early = self._refusal(scope, route, settings, service)
            if early is not None:
                await reply(scope, early)(scope, receive, send_wrapper)
                return
            await self.app(scope, self._bounded(receive, settings, started), send_wrapper)
        except BodyReadError as exc:  # raised by _bounded outside the route's own body parsing
            if not status["sent"]:
                await reply(scope, api_error(exc))(scope, receive, send_wrapper)
        finally:
            service = getattr(self.state, "service", None)  # the lifespan may have loaded it meanwhile
            if service is not None:
                known = route if route in COUNTED_ROUTES else "other"
                service.metrics.requests.labels(known, str(status["code"])).inc()
                failure = scope["state"].get(FAILURE_KEY)
                if failure is not None:
                    service.metrics.failures.labels(failure).inc()
                if known == "/predict":
                    service.metrics.request_duration.labels(service.name).observe(time.monotonic() - started)

    @staticmethod
    def _refusal(scope: dict[str, Any], route: str, settings: Settings, service) -> APIError | None:
        """The answer given before the body is read, if any: 401, then 429, then 413."""
        if route in KEYED_ROUTES and not authorized(settings, scope["headers"]):
            return APIError.of("unauthorized", UNAUTHORIZED)
        if route == "/predict" and service is not None and service.ready and service.room <= 0:
            return api_error(QueueFull(f"queue full ({settings.max_queue_size} inputs waiting)"))
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return api_error(BodyTooLarge(f"request body over {settings.max_body_bytes} bytes"))
        return None

    @staticmethod
    def _bounded(receive, settings: Settings, started: float):
        """`receive`, bounded while the body arrives: size, time, and the client leaving mid-body."""
        received, complete = 0, False

        async def bounded_receive():
            nonlocal received, complete
            if complete:  # the body is in; what follows is the wait for a disconnect: not bounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), settings.body_timeout - (time.monotonic() - started))
            except asyncio.TimeoutError as exc:
                raise BodyTimeout(f"the request body did not arrive within {settings.body_timeout:g} s") from exc
            if message["type"] == "http.disconnect":
                raise ClientGoneMidBody("the client disconnected before sending the whole body")
            received += len(message.get("body", b""))
            if received > settings.max_body_bytes:
                raise BodyTooLarge(f"request body over {settings.max_body_bytes} bytes")
            complete = not message.get("more_body", False)
            return message

        return bounded_receive
