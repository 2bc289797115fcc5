"""`GuardMiddleware`: what every request goes through before the routes, and where it is counted.

In order, before anything of the request is parsed: the API key (401, for the routes that reach a
model: /predict, /info, /models, TEI's and the Open Inference Protocol's model routes; the admin routes
take `admin_key` instead, and are off without one: 403), then the overload shortcut (429 for an
inference route while the only model's queue has no room for even one input: refusing stays cheap
under overload; with several models the model's own admission answers 429), then the declared body
size (413). While the route reads the body, the middleware bounds it: over `max_body_bytes` (413), not
all there within `body_timeout` seconds of the request's head (408, connection closed), or the client
gone before its end (499). Last, it counts the request by route (its template, such as
/v2/models/{name}/infer) and status, its failure (if its answer carried one: errors.reply) by reason,
and its duration by the model that answered it. Every answer given here is in the error format of the
API the path belongs to (server/error_format.py).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from starlette.routing import Match

from exitserve.server.error_format import DIALECT_KEY, OIP_PREFIX, TEI_MODEL_PREFIX, TEI_PATHS, dialect_of
from exitserve.server.errors import (
    FAILURE_KEY,
    MODEL_KEY,
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

# the routes that reach a model: they need the API key, when one is set
KEYED_ROUTES = ("/predict", "/info", "/models", *TEI_PATHS)
KEYED_PREFIXES = (TEI_MODEL_PREFIX, OIP_PREFIX + "/models/")
INFERENCE_ROUTES = ("/predict", *TEI_PATHS)  # and every POST under the keyed prefixes: the 429 shortcut's
ADMIN_PREFIX = "/admin/"  # need `admin_key`; off without one


def authorized(key: str | None, headers: list[tuple[bytes, bytes]]) -> bool:
    """True without a key, or with `Authorization: Bearer KEY` (compared in constant time)."""
    if not key:
        return True
    header = next((value for name, value in headers if name == b"authorization"), b"")
    scheme, _, token = header.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(token, key.encode())


UNAUTHORIZED = "missing or wrong API key (Authorization: Bearer KEY)"
ADMIN_OFF = "the admin routes are off: start the server with admin_key set"


class GuardMiddleware:
    """Pure ASGI (see the module docstring). `state` is the app's state: its `settings` and `models`
    (server/registry.py); `routes` the app's, to name the route of a request refused before routing."""

    def __init__(self, app, state, routes):
        self.app, self.state, self.routes = app, state, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings: Settings = self.state.settings
        path, started, status = scope["path"], time.monotonic(), {"code": 500, "sent": False}
        state = scope.setdefault("state", {})
        state[FAILURE_KEY] = state[MODEL_KEY] = None
        state[DIALECT_KEY] = dialect_of(path)

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        try:
            early = self._refusal(scope, path, settings)
            if early is not None:
                await reply(scope, early)(scope, receive, send_wrapper)
                return
            await self.app(scope, self._bounded(receive, settings, started), send_wrapper)
        except BodyReadError as exc:  # raised by _bounded outside the route's own body parsing
            if not status["sent"]:
                await reply(scope, api_error(exc))(scope, receive, send_wrapper)
        finally:
            metrics = self.state.models.metrics
            metrics.requests.labels(self._route(scope), str(status["code"])).inc()
            if state[FAILURE_KEY] is not None:
                metrics.failures.labels(state[FAILURE_KEY]).inc()
            if state[MODEL_KEY] is not None:
                metrics.request_duration.labels(state[MODEL_KEY]).observe(time.monotonic() - started)

    def _route(self, scope: dict[str, Any]) -> str:
        """The route's path template ("other" for none): the one routing matched, else (a request refused
        before routing) the one that would have."""
        route = scope.get("route")
        return route.path if route is not None else _matching(self.routes, scope) or "other"

    def _refusal(self, scope: dict[str, Any], path: str, settings: Settings) -> APIError | None:
        """The answer given before the body is read, if any: 401 (403), then 429, then 413."""
        if path.startswith(ADMIN_PREFIX):
            if not settings.admin_key:
                return APIError.of("admin_off", ADMIN_OFF)
            if not authorized(settings.admin_key, scope["headers"]):
                return APIError.of("unauthorized", UNAUTHORIZED)
        keyed = path in KEYED_ROUTES or path.startswith(KEYED_PREFIXES)
        if keyed and not authorized(settings.api_key, scope["headers"]):
            return APIError.of("unauthorized", UNAUTHORIZED)
        service = self.state.models.sole()
        inference = path in INFERENCE_ROUTES or (keyed and scope["method"] == "POST")
        if inference and service is not None and service.ready and service.room <= 0:
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


def _matching(routes, scope: dict[str, Any]) -> str | None:
    """The path template of the route among `routes` (FastAPI keeps an included router as one entry:
    searched inside) that matches the request fully, if any."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            found = _matching(inner.routes, scope)
            if found is not None:
                return found
        elif route.matches(scope)[0] is Match.FULL:
            return route.path
    return None
