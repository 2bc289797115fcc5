"""The admin route: reload a served model in place, on the same port, without a failed request.

POST /admin/models/{name}/reload with an optional `{"checkpoint": "/path"}` (default: the model's own
directory, re-read; a symbolic link switched to a new directory is followed). The new version is
loaded, validated and warmed up beside the old one, then switched in; the old one drains and stops
(server/registry.py). A checkpoint that cannot be served is refused (422 `reload_refused`, with the
reason) and the old version keeps serving. SIGHUP does the same for every model (server/main.py).
The route answers to `admin_key` only (`Authorization: Bearer ADMIN_KEY`, checked by the request
guard before the body is read), and without an `admin_key` it is off (403).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, ConfigDict, Field

from exitserve.server.handling import models_of
from exitserve.server.schemas import ErrorResponse

router = APIRouter(tags=["admin"])


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    checkpoint: str | None = Field(None, description="checkpoint directory on the server (default: the model's "
                                   "own, re-read)")


class ReloadResponse(BaseModel):
    model: str
    version: str = Field(..., description="the version served now")
    previous: str = Field(..., description="the version served before")
    changed: bool = Field(..., description="false: the checkpoint holds the version already served; nothing done")
    seconds: float = Field(..., description="load, warm-up, switch and drain")


@router.post("/admin/models/{name}/reload", response_model=ReloadResponse,
             responses={code: {"model": ErrorResponse} for code in (401, 403, 404, 415, 422)})
async def reload(request: Request, name: str, req: Annotated[ReloadRequest | None, Body()] = None) -> ReloadResponse:
    """Load a new version of model `name`, validate and warm it up, switch to it, drain the old one."""
    return ReloadResponse(**await models_of(request).reload(name, req.checkpoint if req else None))
