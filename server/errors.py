"""Every failure's answer from the one error table, and the error handlers that use it.

The table itself (`KINDS`: HTTP status, error type, Retry-After, failure-metric label
`exitserve_request_failures_total{reason}`, connection closed or not) is server/error_format.py, free
of model code so that Ray's proxy and the connection guard share it. Here `ERRORS` maps each
exception the service, the scheduler or the request guard raises onto a kind of that table; anything
the model raises that is not in it is a 500 `inference_error`. The routes and `GuardMiddleware`
answer through `api_error` / `APIError.of` + `reply`, and `reply` only marks the request with its
failure label: the middleware counts it, once per request, with the request's status. Every
answer's body is in the format of the API the request called (server/error_format.py: exitserve's,
TEI's or the Open Inference Protocol's), with the same status and message.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from exitserve.models.encoding import EmptyInput, InputTooLong
from exitserve.server.error_format import DIALECT_KEY, KINDS, ErrorKind, error_response, kind_response
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


ERRORS: dict[type[BaseException], ErrorKind] = {
    QueueFull: KINDS["overloaded"],
    SloUnreachable: KINDS["slo_unreachable"],  # with the exception's own predicted wait as Retry-After
    DeadlineExceeded: KINDS["deadline_exceeded"],
    SchedulerStopped: KINDS["shutting_down"],
    InputTooLong: KINDS["input_too_long"],
    EmptyInput: KINDS["validation_error"],
    NonFiniteOutput: KINDS["inference_error"],
    ClientGone: KINDS["disconnected"],
    ClientGoneMidBody: KINDS["disconnected_mid_body"],
    BodyTooLarge: KINDS["payload_too_large"],
    BodyTimeout: KINDS["body_timeout"],
    InvalidBinaryBody: KINDS["invalid_body"],
    UnknownModel: KINDS["model_not_found"],
    ModelNotNamed: KINDS["validation_error"],
    ModelLoadError: KINDS["reload_refused"],
}
MODEL_FAILED = KINDS["inference_error"]  # anything else raised while predicting


class APIError(Exception):
    """An answer of the error table: `kind` with a message (raise `APIError.of("validation_error", ...)`)."""

    def __init__(self, kind: ErrorKind, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.kind, self.message, self.retry_after = kind, message, retry_after

    @classmethod
    def of(cls, name: str, message: str) -> APIError:
        return cls(KINDS[name], message)

    @property
    def status(self) -> int:
        return self.kind.status


def api_error(exc: BaseException) -> APIError:
    """The table's answer to `exc` (the first of its classes `ERRORS` names; else a 500)."""
    known = next((ERRORS[cls] for cls in type(exc).__mro__ if cls in ERRORS), None)
    detail = exc.detail if isinstance(exc, StarletteHTTPException) else str(exc)
    if known is None:
        return APIError(MODEL_FAILED, f"{type(exc).__name__}: {detail}")
    wait = getattr(exc, "retry_after", None)  # SloUnreachable's predicted wait
    return APIError(known, detail, math.ceil(wait) if wait else None)


def reply(scope: dict[str, Any], error: APIError) -> JSONResponse:
    """The error-format response for `error`; its failure label goes into the request's scope state,
    where GuardMiddleware counts it."""
    state = scope.setdefault("state", {})
    state[FAILURE_KEY] = error.kind.failure
    return kind_response(error.kind, error.message, state.get(DIALECT_KEY, "exitserve"), error.retry_after)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            pos = err["loc"][-1]
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')} at byte {pos}"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body" and p not in BODY_FORMATS) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


# the kinds FastAPI's own HTTPExceptions are answered as, by status (any other status: `http_error`)
HTTP_KINDS = {k.status: k for k in (KINDS[n] for n in ("invalid_body", "not_found", "method_not_allowed",
                                                      "payload_too_large", "unsupported_media_type"))}


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
        return reply(request.scope, APIError.of("validation_error", _validation_message(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = HTTP_KINDS.get(exc.status_code)
        headers = {**((kind.headers() or {}) if kind else {}), **(exc.headers or {})} or None
        dialect = request.scope.get("state", {}).get(DIALECT_KEY, "exitserve")
        return error_response(exc.status_code, kind.type if kind else "http_error", _http_message(exc), headers,
                              dialect)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return reply(request.scope, APIError.of("internal_error", f"{type(exc).__name__}: {exc}"))
