"""Every failure's answer in one table, and the error handlers that use it.

`ERRORS` maps each exception the service, the scheduler or the request guard raises to its HTTP
status, error type, Retry-After and failure-metric label (`exitserve_request_failures_total{reason}`);
anything the model raises that is not in it is a 500 `inference_error`. The /predict route and
`GuardMiddleware` both answer through `api_error` + `reply`, and `reply` only marks the request with
its failure label: the middleware counts it, once per request, with the request's status. Every
answer's body is in the format of the API the request called (server/error_format.py: exitserve's,
TEI's or the Open Inference Protocol's), with the same status and message.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from exitserve.models.encoding import InputTooLong
from exitserve.server.error_format import DIALECT_KEY, error_response
from exitserve.server.registry import ModelLoadError, ModelNotNamed, UnknownModel
from exitserve.server.scheduler import DeadlineExceeded, QueueFull, SchedulerStopped, SloUnreachable
from exitserve.server.schemas import BODY_FORMATS
from exitserve.server.service import NonFiniteOutput

FAILURE_KEY = "exitserve.failure"  # where `reply` leaves the failure label, in the request's scope state
MODEL_KEY = "exitserve.model"  # the served model a request used (server/handling.py), in its scope state


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class BodyReadError(StarletteHTTPException):
    """Reading the request body failed. An HTTPException, so FastAPI's body parsing passes it on (it
    turns any other exception into a bare 400) and the handler below answers it from the table."""

    def __init__(self, message: str):
        super().__init__(ERRORS[type(self)].status, message)


class BodyTooLarge(BodyReadError):
    """The body is over `max_body_bytes`."""


class BodyTimeout(BodyReadError):
    """The body did not arrive within `body_timeout` seconds of the request's head."""


class ClientGoneMidBody(BodyReadError):
    """The client disconnected before sending the whole body."""


class InvalidBinaryBody(BodyReadError):
    """An Open Inference Protocol body whose binary-data header does not fit it (server/oip_tensors.py)."""


@dataclass(frozen=True)
class ErrorKind:
    """How one kind of failure is answered."""

    status: int
    type: str
    retry_after: int | None = None  # seconds, sent as Retry-After
    failure: str | None = None  # the exitserve_request_failures_total reason; None: not counted as a failure
    close: bool = False  # close the connection after answering (a slow client must not keep it)


ERRORS: dict[type[BaseException], ErrorKind] = {
    QueueFull: ErrorKind(429, "overloaded", retry_after=1, failure="overloaded"),
    # the exception's own predicted wait, when it has one, is sent as Retry-After instead
    SloUnreachable: ErrorKind(429, "slo_unreachable", retry_after=1, failure="slo_shed"),
    DeadlineExceeded: ErrorKind(503, "deadline_exceeded", failure="deadline"),
    SchedulerStopped: ErrorKind(503, "shutting_down"),
    InputTooLong: ErrorKind(422, "input_too_long"),
    NonFiniteOutput: ErrorKind(500, "inference_error", failure="inference"),
    ClientGone: ErrorKind(499, "client_closed_request", failure="disconnected"),  # nginx's "client closed request"
    ClientGoneMidBody: ErrorKind(499, "client_closed_request", failure="disconnected_mid_body"),
    BodyTooLarge: ErrorKind(413, "payload_too_large"),
    BodyTimeout: ErrorKind(408, "request_timeout", failure="body_timeout", close=True),
    InvalidBinaryBody: ErrorKind(400, "invalid_body"),
    UnknownModel: ErrorKind(404, "model_not_found"),
    ModelNotNamed: ErrorKind(422, "validation_error"),
    ModelLoadError: ErrorKind(422, "reload_refused"),  # the admin route's: the old version keeps serving
}
MODEL_FAILED = ErrorKind(500, "inference_error", failure="inference")  # anything else raised while predicting


class APIError(Exception):
    """An answer in the error format; `failure` is its failure-metric label (None: not a failure)."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None,
                 failure: str | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers, self.failure = status, type_, message, headers, failure


def api_error(exc: BaseException) -> APIError:
    """The table's answer to `exc` (the first of its classes the table names; else a 500)."""
    kind = next((ERRORS[cls] for cls in type(exc).__mro__ if cls in ERRORS), MODEL_FAILED)
    detail = exc.detail if isinstance(exc, StarletteHTTPException) else str(exc)
    message = detail if kind is not MODEL_FAILED else f"{type(exc).__name__}: {detail}"
    retry_after = math.ceil(getattr(exc, "retry_after", None) or kind.retry_after or 0)
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    if kind.close:
        headers["Connection"] = "close"
    return APIError(kind.status, kind.type, message, headers or None, kind.failure)


def reply(scope: dict[str, Any], error: APIError) -> JSONResponse:
    """The error-format response for `error`; its failure label goes into the request's scope state,
    where GuardMiddleware counts it."""
    state = scope.setdefault("state", {})
    state[FAILURE_KEY] = error.failure
    return error_response(error.status, error.type, error.message, error.headers, state.get(DIALECT_KEY, "exitserve"))


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            pos = err["loc"][-1]
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')} at byte {pos}"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body" and p not in BODY_FORMATS) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


HTTP_TYPES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
              415: "unsupported_media_type"}


def _http_message(exc: StarletteHTTPException) -> str:
    """FastAPI answers a body it cannot decode with a bare 400; say why (the cause it chained)."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return str(exc.detail)
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the JSON body is nested too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"a number in the body has more than {sys.get_int_max_str_digits()} digits"
    reason = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
    return f"the body cannot be decoded as JSON: {reason}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return reply(request.scope, exc)

    @app.exception_handler(BodyReadError)
    async def _body(request: Request, exc: BodyReadError) -> JSONResponse:
        return reply(request.scope, api_error(exc))

    async def _from_table(request: Request, exc: Exception) -> JSONResponse:
        return reply(request.scope, api_error(exc))

    for raised_by_the_registry in (UnknownModel, ModelNotNamed, ModelLoadError):  # from any route
        app.add_exception_handler(raised_by_the_registry, _from_table)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return reply(request.scope, APIError(422, "validation_error", _validation_message(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, HTTP_TYPES.get(exc.status_code, "http_error"), _http_message(exc),
                         exc.headers)
        return reply(request.scope, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return reply(request.scope, APIError(500, "internal_error", f"{type(exc).__name__}: {exc}"))
