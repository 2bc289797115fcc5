"""The one error table of every 4xx/5xx answer, and its body in the format the client of each API parses:

- exitserve's own routes: `{"error": {"type": ..., "message": ...}}`;
- the text-embeddings-inference routes (POST /, /invocations, /models/{name}): TEI's
  `{"error": message, "error_type": "Validation" | "Overloaded" | "Unhealthy" | "Backend" | "Empty"}`;
- the Open Inference Protocol (/v2...): `{"error": message}`.

Which format a request gets follows from its path alone (`dialect_of`), so that answers given before
any route runs (the API key, 429, 413 in server/guard.py) are in the right format too.

`KINDS` names every kind of error answer exitserve gives -- its HTTP status, error type, Retry-After,
failure-metric label (`exitserve_request_failures_total{reason}`) and whether the connection is
closed after it -- whoever answers: the routes, the request guard (server/guard.py), the connection
guard below the HTTP parser (server/connections.py, which writes raw bytes: `error_bytes`) and Ray's
HTTP proxy (server/ray_proxy.py). server/errors.py maps the service's exceptions onto these kinds.
A new protocol with another error shape adds a dialect to `error_body`, nothing else.

Kept apart from server/errors.py (which imports model code for those exceptions) so that Ray's proxy
can use it without importing torch or transformers.
"""

from __future__ import annotations

import http
import json
from dataclasses import dataclass
from typing import Literal

from starlette.responses import JSONResponse

Dialect = Literal["exitserve", "tei", "oip"]
DIALECT_KEY = "exitserve.dialect"  # where the guard leaves the request's dialect, in its scope state
OIP_PREFIX = "/v2"  # the Open Inference Protocol's routes (server/oip.py)
TEI_PATHS = ("/", "/invocations")  # TEI's routes for a classifier (server/tei.py) ...
TEI_MODEL_PREFIX = "/models/"  # ... and /models/{name}: the Hugging Face Inference API's URL for one model
# exitserve's error types -> TEI's (router/src/lib.rs ErrorType); any other: Validation below 500, else Backend
TEI_TYPES = {"overloaded": "Overloaded", "slo_unreachable": "Overloaded", "not_ready": "Unhealthy",
             "shutting_down": "Unhealthy", "draining": "Unhealthy", "deadline_exceeded": "Overloaded"}


@dataclass(frozen=True)
class ErrorKind:
    """How one kind of failure is answered."""

    status: int
    type: str
    retry_after: int | None = None  # seconds, sent as Retry-After
    failure: str | None = None  # the exitserve_request_failures_total reason; None: not counted as a failure
    close: bool = False  # close the connection after answering (a slow or oversized client must not keep it)
    challenge: str | None = None  # WWW-Authenticate

    def headers(self, retry_after: int | None = None) -> dict[str, str] | None:
        """The answer's headers; `retry_after` (seconds) replaces the kind's own (an SLO's predicted wait)."""
        headers = {}
        if retry_after or self.retry_after:
            headers["Retry-After"] = str(retry_after or self.retry_after)
        if self.challenge:
            headers["WWW-Authenticate"] = self.challenge
        if self.close:
            headers["Connection"] = "close"
        return headers or None


KINDS: dict[str, ErrorKind] = {
    "invalid_body": ErrorKind(400, "invalid_body"),
    "unauthorized": ErrorKind(401, "unauthorized", challenge="Bearer"),
    "admin_off": ErrorKind(403, "admin_off"),
    "not_found": ErrorKind(404, "not_found"),
    "method_not_allowed": ErrorKind(405, "method_not_allowed"),
    "body_timeout": ErrorKind(408, "request_timeout", failure="body_timeout", close=True),
    "header_timeout": ErrorKind(408, "request_timeout", failure="header_timeout", close=True),
    "payload_too_large": ErrorKind(413, "payload_too_large"),
    "unsupported_media_type": ErrorKind(415, "unsupported_media_type"),
    "validation_error": ErrorKind(422, "validation_error"),
    "input_too_long": ErrorKind(422, "input_too_long"),
    "overloaded": ErrorKind(429, "overloaded", retry_after=1, failure="overloaded"),
    "slo_unreachable": ErrorKind(429, "slo_unreachable", retry_after=1, failure="slo_shed"),
    "model_not_found": ErrorKind(404, "model_not_found"),
    "reload_refused": ErrorKind(422, "reload_refused"),  # the admin route's: the old version keeps serving
    "header_too_large": ErrorKind(431, "header_too_large", failure="header_too_large", close=True),
    "disconnected": ErrorKind(499, "client_closed_request", failure="disconnected"),  # nginx's "client closed request"
    "disconnected_mid_body": ErrorKind(499, "client_closed_request", failure="disconnected_mid_body"),
    "inference_error": ErrorKind(500, "inference_error", failure="inference"),
    "internal_error": ErrorKind(500, "internal_error"),
    "not_ready": ErrorKind(503, "not_ready", retry_after=1),
    "draining": ErrorKind(503, "draining"),
    "shutting_down": ErrorKind(503, "shutting_down"),
    "deadline_exceeded": ErrorKind(503, "deadline_exceeded", failure="deadline"),
    "replicas_lost": ErrorKind(503, "unavailable", retry_after=1),  # Ray's proxy, after its retries
    "too_many_connections": ErrorKind(503, "too_many_connections", retry_after=1, failure="too_many_connections",
                                      close=True),
}


def dialect_of(path: str) -> Dialect:
    if path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/"):
        return "oip"
    if path in TEI_PATHS or path.startswith(TEI_MODEL_PREFIX):
        return "tei"
    return "exitserve"


def error_body(status: int, type_: str, message: str, dialect: Dialect = "exitserve") -> dict:
    if dialect == "oip":
        return {"error": message}
    if dialect == "tei":
        return {"error": message, "error_type": TEI_TYPES.get(type_, "Validation" if status < 500 else "Backend")}
    return {"error": {"type": type_, "message": message}}


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None,
                   dialect: Dialect = "exitserve") -> JSONResponse:
    return JSONResponse(error_body(status, type_, message, dialect), status_code=status, headers=headers)


def kind_response(kind: ErrorKind, message: str, dialect: Dialect = "exitserve",
                  retry_after: int | None = None) -> JSONResponse:
    """`kind`'s answer, as a response an ASGI app sends."""
    return error_response(kind.status, kind.type, message, kind.headers(retry_after), dialect)


def error_bytes(kind: ErrorKind, message: str, dialect: Dialect = "exitserve") -> bytes:
    """`kind`'s answer as a whole HTTP/1.1 response, for code below the HTTP parser; it always closes
    the connection (what is left of the request cannot be trusted)."""
    body = json.dumps(error_body(kind.status, kind.type, message, dialect)).encode()
    try:
        reason = http.HTTPStatus(kind.status).phrase
    except ValueError:
        reason = "Error"
    headers = {**(kind.headers() or {}), "Connection": "close"}
    lines = [f"HTTP/1.1 {kind.status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
             *(f"{name.lower()}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
