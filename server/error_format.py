"""The one error table and the one error format of every 4xx/5xx answer:
`{"error": {"type": ..., "message": ...}}`.

`KINDS` names every kind of error answer exitserve gives -- its HTTP status, error type, Retry-After,
failure-metric label (`exitserve_request_failures_total{reason}`) and whether the connection is
closed after it -- whoever answers: the routes, the request guard (server/guard.py), the connection
guard below the HTTP parser (server/connections.py, which writes raw bytes: `error_bytes`) and Ray's
HTTP proxy (server/ray_proxy.py). server/errors.py maps the service's exceptions onto these kinds.
A new route with a protocol of its own (another error shape) reads the same table and formats it
its own way.

Kept apart from server/errors.py (which imports model code for those exceptions) so that Ray's proxy
can use it without importing torch or transformers.
"""

from __future__ import annotations

import http
import json
from dataclasses import dataclass

from starlette.responses import JSONResponse


@dataclass(frozen=True)
class ErrorKind:
    """How one kind of failure is answered."""

    status: int
    type: str
    retry_after: int | None = None  # seconds, sent as Retry-After
    failure: str | None = None  # the exitserve_request_failures_total reason; None: not counted as a failure
    close: bool = False  # close the connection after answering (a slow or oversized client must not keep it)
    challenge: str | None = None  # WWW-Authenticate

    def headers(self) -> dict[str, str] | None:
        headers = {}
        if self.retry_after:
            headers["Retry-After"] = str(self.retry_after)
        if self.challenge:
            headers["WWW-Authenticate"] = self.challenge
        if self.close:
            headers["Connection"] = "close"
        return headers or None


KINDS: dict[str, ErrorKind] = {
    "invalid_body": ErrorKind(400, "invalid_body"),
    "unauthorized": ErrorKind(401, "unauthorized", challenge="Bearer"),
    "not_found": ErrorKind(404, "not_found"),
    "method_not_allowed": ErrorKind(405, "method_not_allowed"),
    "body_timeout": ErrorKind(408, "request_timeout", failure="body_timeout", close=True),
    "header_timeout": ErrorKind(408, "request_timeout", failure="header_timeout", close=True),
    "payload_too_large": ErrorKind(413, "payload_too_large"),
    "unsupported_media_type": ErrorKind(415, "unsupported_media_type"),
    "validation_error": ErrorKind(422, "validation_error"),
    "input_too_long": ErrorKind(422, "input_too_long"),
    "overloaded": ErrorKind(429, "overloaded", retry_after=1, failure="overloaded"),
    "header_too_large": ErrorKind(431, "header_too_large", failure="header_too_large", close=True),
    "disconnected": ErrorKind(499, "client_closed_request", failure="disconnected"),  # nginx's "client closed request"
    "disconnected_mid_body": ErrorKind(499, "client_closed_request", failure="disconnected_mid_body"),
    "inference_error": ErrorKind(500, "inference_error", failure="inference"),
    "internal_error": ErrorKind(500, "internal_error"),
    "not_ready": ErrorKind(503, "not_ready", retry_after=1),
    "draining": ErrorKind(503, "draining"),
    "shutting_down": ErrorKind(503, "shutting_down"),
    "deadline_exceeded": ErrorKind(503, "deadline_exceeded", failure="deadline"),
    "too_many_connections": ErrorKind(503, "too_many_connections", retry_after=1, failure="too_many_connections",
                                      close=True),
}


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def kind_response(kind: ErrorKind, message: str) -> JSONResponse:
    """`kind`'s answer, as a response an ASGI app sends."""
    return error_response(kind.status, kind.type, message, kind.headers())


def error_bytes(kind: ErrorKind, message: str) -> bytes:
    """`kind`'s answer as a whole HTTP/1.1 response, for code below the HTTP parser; it always closes
    the connection (what is left of the request cannot be trusted)."""
    body = json.dumps({"error": {"type": kind.type, "message": message}}).encode()
    try:
        reason = http.HTTPStatus(kind.status).phrase
    except ValueError:
        reason = "Error"
    headers = {**(kind.headers() or {}), "Connection": "close"}
    lines = [f"HTTP/1.1 {kind.status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
             *(f"{name.lower()}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
