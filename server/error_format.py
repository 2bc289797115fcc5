"""The one error format of every 4xx/5xx answer: `{"error": {"type": ..., "message": ...}}`.

Kept apart from server/errors.py (which maps the service's exceptions and so imports model code) so
that Ray's HTTP proxy (server/ray_proxy.py) can use it without importing torch or transformers.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)
