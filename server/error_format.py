"""The error bodies of every 4xx/5xx answer, in the format the client of each API parses:

- exitserve's own routes: `{"error": {"type": ..., "message": ...}}`;
- the text-embeddings-inference routes (POST /, /invocations, /models/{name}): TEI's
  `{"error": message, "error_type": "Validation" | "Overloaded" | "Unhealthy" | "Backend" | "Empty"}`;
- the Open Inference Protocol (/v2...): `{"error": message}`.

Which one a request gets follows from its path alone (`dialect_of`), so that answers given before any
route runs (the API key, 429, 413 in server/guard.py) are in the right format too. The status, type
and message come from the one error table (server/errors.py) whatever the format. Kept apart from
errors.py (which maps the service's exceptions and so imports model code) so that Ray's HTTP proxy
(server/ray_proxy.py) can use it without importing torch or transformers.
"""

from __future__ import annotations

from typing import Literal

from starlette.responses import JSONResponse

Dialect = Literal["exitserve", "tei", "oip"]
DIALECT_KEY = "exitserve.dialect"  # where the guard leaves the request's dialect, in its scope state
OIP_PREFIX = "/v2"  # the Open Inference Protocol's routes (server/oip.py)
TEI_PATHS = ("/", "/invocations")  # TEI's routes for a classifier (server/tei.py) ...
TEI_MODEL_PREFIX = "/models/"  # ... and /models/{name}: the Hugging Face Inference API's URL for one model
# exitserve's error types -> TEI's (router/src/lib.rs ErrorType); any other: Validation below 500, else Backend
TEI_TYPES = {"overloaded": "Overloaded", "not_ready": "Unhealthy", "shutting_down": "Unhealthy",
             "draining": "Unhealthy", "deadline_exceeded": "Overloaded"}


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
