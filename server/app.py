"""The FastAPI app: `create_app` (the factory) and the routes.

Routes read the `PredictionService` from `request.app.state.service`; all model work happens in the
service and its scheduler. Request flow: `GuardMiddleware` (server/guard.py: API key, 429 at once
while the queue is full, body size and time limits, request metrics) -> `predict` route (content type,
validation) -> `PredictionService.predict`, raced against the client disconnecting (then the request's
samples are cancelled and never computed) -> `LayerScheduler` -> response with timing headers. Every
failure is answered from the one table in server/errors.py.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import unicodedata
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from exitserve.server.docs_ui import docs_router
from exitserve.server.error_format import error_response
from exitserve.server.errors import APIError, ClientGone, api_error, install_error_handlers
from exitserve.server.guard import GuardMiddleware
from exitserve.server.schemas import (
    ErrorResponse,
    InfoResponse,
    PredictBatchResponse,
    PredictRequest,
    PredictResult,
    StatusResponse,
)
from exitserve.server.service import Outcome, PredictionService
from exitserve.server.settings import Settings

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 422, 429, 500, 503)}
# what a text may hold and still be empty: whitespace, control and format (zero-width) characters
INVISIBLE = frozenset(("Zs", "Zl", "Zp", "Cc", "Cf"))
router = APIRouter()
T = TypeVar("T")


def version() -> str:
    try:
        return importlib.metadata.version("exitserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def service_of(request: Request) -> PredictionService:
    return request.app.state.service


async def require_json(request: Request) -> None:  # async: FastAPI runs sync ones in a thread
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise APIError(415, "unsupported_media_type",
                       f"send the body as application/json (got {media or 'no content type'})")


async def _disconnected(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (Starlette's own pattern).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (its queued samples are then skipped
    by the scheduler and never computed) and raise ClientGone. One watcher task, which cancels this
    request's own task when the client goes (cheaper than racing two tasks with asyncio.wait)."""
    handler, gone = asyncio.current_task(), asyncio.Event()

    async def watch() -> None:
        await _disconnected(request)
        gone.set()
        handler.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone.is_set():
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


def blank(text: str) -> bool:
    """True for a text with nothing a tokenizer would keep: only whitespace, control characters (NUL
    included) or format characters (zero-width space, BOM, ...)."""
    return all(unicodedata.category(c) in INVISIBLE for c in text)  # stops at the first visible one


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def validate(req: PredictRequest, service: PredictionService) -> tuple[list[str], list[str] | None]:
    settings = service.settings
    texts = _as_list(req.text)
    if not texts:
        raise APIError(422, "validation_error", "text: give at least one text")
    if len(texts) > settings.max_inputs_per_request:
        raise APIError(422, "validation_error",
                       f"text: {len(texts)} inputs; at most {settings.max_inputs_per_request} per request")
    pairs = _as_list(req.text_pair) if req.text_pair is not None else None
    if pairs is not None and not service.pair_input:
        raise APIError(422, "validation_error", "text_pair: this model takes single texts, not pairs")
    if pairs is None and service.pair_input:
        raise APIError(422, "validation_error", "text_pair: this model scores pairs; give text_pair")
    if pairs is not None and (isinstance(req.text, str) != isinstance(req.text_pair, str) or len(pairs) != len(texts)):
        raise APIError(422, "validation_error", "text_pair: must match text (a string, or a list of the same length)")
    for field, values in (("text", texts), ("text_pair", pairs or [])):
        for i, value in enumerate(values):
            where = field if isinstance(req.text, str) else f"{field}[{i}]"
            if len(value) > settings.max_chars:
                raise APIError(422, "validation_error",
                               f"{where}: {len(value)} characters; at most {settings.max_chars}")
            if blank(value):
                raise APIError(422, "validation_error", f"{where}: empty text (nothing but whitespace, control or "
                               "zero-width characters)")
            if not value.isascii():
                try:
                    value.encode()
                except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800" in the JSON
                    raise APIError(422, "validation_error", f"{where}: not valid Unicode ({exc.reason})") from exc
    return texts, pairs


def _result(service: PredictionService, outcome: Outcome, i: int) -> dict:
    """One input's answer in `PredictResult`'s shape (a plain dict: what the route returns is serialised
    once, as JSON, not validated again; tests check it against the schema)."""
    p, cfg = outcome.predictions[i], service.config
    names = cfg.label_names

    def label(value: float) -> str | float:
        return value if cfg.regression else names[int(value)]

    out = {"prediction": label(p.value), "label_id": p.label_id, "confidence": p.confidence,
           "exit_layer": p.exit_layer, "num_layers": cfg.num_layers, "threshold": outcome.thresholds[i]}
    if p.probabilities:
        out["probabilities"] = dict(zip(names, p.probabilities, strict=True))
    if p.label_id is None:
        del out["label_id"]
    if p.trace is not None:
        out["trace"] = [{"layer": t.layer, "confidence": t.confidence, "prediction": label(t.prediction)}
                        for t in p.trace]
    return out


@router.post("/predict", response_model=PredictResult | PredictBatchResponse, responses=ERRORS,
             dependencies=[Depends(require_json)], response_model_exclude_none=True)
async def predict(req: PredictRequest, request: Request):
    service = service_of(request)
    if not service.ready:
        raise APIError(503, "not_ready", "the model is not ready", {"Retry-After": "1"})
    texts, pairs = validate(req, service)
    try:
        outcome = await unless_client_leaves(
            request, service.predict(texts, pairs=pairs, threshold=req.threshold, trace=req.return_trace)
        )
    except Exception as exc:  # answered from the one error table (server/errors.py)
        raise api_error(exc) from exc
    t = outcome.timings
    headers = {"x-total-time": f"{t.total * 1000:.3f}", "x-tokenization-time": f"{t.tokenization * 1000:.3f}",
               "x-queue-time": f"{t.queue * 1000:.3f}", "x-inference-time": f"{t.inference * 1000:.3f}"}
    results = [_result(service, outcome, i) for i in range(len(texts))]
    if isinstance(req.text, str):
        headers["x-exit-layer"] = str(results[0]["exit_layer"])
        return JSONResponse(results[0], headers=headers)
    return JSONResponse({"results": results}, headers=headers)


@router.get("/health", response_model=StatusResponse)
async def health() -> StatusResponse:
    """Liveness: the process is up (the model may still be loading)."""
    return StatusResponse(status="ok")


@router.get("/ready", response_model=StatusResponse, responses={503: {"model": ErrorResponse}})
async def ready(request: Request):
    """Readiness: 200 only once the model is loaded and warmed up, and not while draining."""
    service = service_of(request)
    if request.app.state.draining:
        return error_response(503, "draining", "the server is shutting down")
    if not service.ready:
        return error_response(503, "not_ready", "the model is loading")
    return StatusResponse(status="ready")


@router.get("/info", response_model=InfoResponse, responses=ERRORS)
async def info(request: Request) -> InfoResponse:
    return InfoResponse(**service_of(request).info(), version=version())


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(service_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings, service: PredictionService | None = None) -> FastAPI:
    """The app. Pass a loaded `service` (the CLI does, so a bad checkpoint fails before serving);
    otherwise it is loaded from `settings.checkpoint` at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.service is None:
            app.state.service = PredictionService.load(settings)
        app.state.draining = False
        await app.state.service.start()
        yield
        app.state.draining = True
        app.state.service.stop()

    app = FastAPI(title="exitserve", version=version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Early-exit (BERxiT) inference for transformer encoders.")
    app.state.settings, app.state.service, app.state.draining = settings, service, False
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(docs_router(app.title))  # /docs with its assets served locally (works offline)
    app.add_middleware(GuardMiddleware, state=app.state)
    return app
