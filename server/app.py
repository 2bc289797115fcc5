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
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from exitserve.server.docs_ui import docs_router
from exitserve.server.error_format import KINDS, kind_response
from exitserve.server.errors import APIError, ClientGone, api_error, install_error_handlers
from exitserve.server.guard import GuardMiddleware
from exitserve.server.schemas import (
    ErrorResponse,
    InfoResponse,
    LayerTraceOut,
    PredictBatchResponse,
    PredictRequest,
    PredictResult,
    StatusResponse,
)
from exitserve.server.service import Outcome, PredictionService
from exitserve.server.settings import Settings

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 422, 429, 500, 503)}
# what a text may hold and still be empty: whitespace, control, format (zero-width), private-use and
# unassigned characters, combining marks with nothing to combine with (U+0301, U+FE0F) ...
INVISIBLE = frozenset(("Zs", "Zl", "Zp", "Cc", "Cf", "Co", "Cn", "Mn", "Me"))
# ... and characters drawn blank or meaning "nothing": Hangul fillers, the blank Braille pattern, the
# replacement character (tokenizers drop or map them to the unknown token; whatever else a tokenizer
# keeps nothing of is refused after tokenising: models/encoding.py)
BLANK = frozenset("\u115f\u1160\u2800\u3164\uffa0\ufffd")
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
        raise APIError.of("unsupported_media_type",
                       f"send the body as application/json (got {media or 'no content type'})")


async def _disconnected(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (Starlette's own pattern).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (its queued samples are then skipped
    by the scheduler and never computed) and raise ClientGone."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        task.cancel()  # a no-op once it is done
    if task in done:
        return task.result()
    raise ClientGone


def blank(text: str) -> bool:
    """True for a text with nothing in it to read: only whitespace, control characters (NUL included),
    format characters (zero-width space, BOM, ...), lone combining marks or blank-looking characters."""
    return all(c in BLANK or unicodedata.category(c) in INVISIBLE for c in text)  # stops at the first visible one


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def validate(req: PredictRequest, service: PredictionService) -> tuple[list[str], list[str] | None]:
    settings = service.settings
    texts = _as_list(req.text)
    if not texts:
        raise APIError.of("validation_error", "text: give at least one text")
    if len(texts) > settings.max_inputs_per_request:
        raise APIError.of("validation_error",
                       f"text: {len(texts)} inputs; at most {settings.max_inputs_per_request} per request")
    pairs = _as_list(req.text_pair) if req.text_pair is not None else None
    if pairs is not None and not service.pair_input:
        raise APIError.of("validation_error", "text_pair: this model takes single texts, not pairs")
    if pairs is None and service.pair_input:
        raise APIError.of("validation_error", "text_pair: this model scores pairs; give text_pair")
    if pairs is not None and (isinstance(req.text, str) != isinstance(req.text_pair, str) or len(pairs) != len(texts)):
        raise APIError.of("validation_error", "text_pair: must match text (a string, or a list of the same length)")
    for field, values in (("text", texts), ("text_pair", pairs or [])):
        for i, value in enumerate(values):
            where = field if isinstance(req.text, str) else f"{field}[{i}]"
            if len(value) > settings.max_chars:
                raise APIError.of("validation_error",
                               f"{where}: {len(value)} characters; at most {settings.max_chars}")
            if blank(value):
                raise APIError.of("validation_error", f"{where}: empty text (nothing but whitespace, control, "
                                  "zero-width, combining or blank characters)")
            if not value.isascii():
                try:
                    value.encode()
                except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800" in the JSON
                    raise APIError.of("validation_error", f"{where}: not valid Unicode ({exc.reason})") from exc
    return texts, pairs


def _result(service: PredictionService, outcome: Outcome, i: int) -> PredictResult:
    p, cfg = outcome.predictions[i], service.config
    names = cfg.label_names

    def label(value: float) -> str | float:
        return value if cfg.regression else names[int(value)]

    return PredictResult(
        prediction=label(p.value), label_id=p.label_id, confidence=p.confidence, exit_layer=p.exit_layer,
        num_layers=cfg.num_layers, threshold=outcome.thresholds[i],
        probabilities=dict(zip(names, p.probabilities, strict=True)) if p.probabilities else None,
        trace=[LayerTraceOut(layer=t.layer, confidence=t.confidence, prediction=label(t.prediction))
               for t in p.trace] if p.trace is not None else None,
    )


@router.post("/predict", response_model=PredictResult | PredictBatchResponse, responses=ERRORS,
             dependencies=[Depends(require_json)], response_model_exclude_none=True)
async def predict(req: PredictRequest, request: Request, response: Response):
    service = service_of(request)
    if not service.ready:
        raise APIError.of("not_ready", "the model is not ready")
    texts, pairs = validate(req, service)
    try:
        outcome = await unless_client_leaves(
            request, service.predict(texts, pairs=pairs, threshold=req.threshold, trace=req.return_trace)
        )
    except Exception as exc:  # answered from the one error table (server/errors.py)
        raise api_error(exc) from exc
    t = outcome.timings
    response.headers["x-total-time"] = f"{t.total * 1000:.3f}"
    response.headers["x-tokenization-time"] = f"{t.tokenization * 1000:.3f}"
    response.headers["x-queue-time"] = f"{t.queue * 1000:.3f}"
    response.headers["x-inference-time"] = f"{t.inference * 1000:.3f}"
    results = [_result(service, outcome, i) for i in range(len(texts))]
    if isinstance(req.text, str):
        response.headers["x-exit-layer"] = str(results[0].exit_layer)
        return results[0]
    return PredictBatchResponse(results=results)


@router.get("/health", response_model=StatusResponse)
async def health() -> StatusResponse:
    """Liveness: the process is up (the model may still be loading)."""
    return StatusResponse(status="ok")


@router.get("/ready", response_model=StatusResponse, responses={503: {"model": ErrorResponse}})
async def ready(request: Request):
    """Readiness: 200 only once the model is loaded and warmed up, and not while draining."""
    service = service_of(request)
    if request.app.state.draining:
        return kind_response(KINDS["draining"], "the server is shutting down")
    if not service.ready:
        return kind_response(KINDS["not_ready"], "the model is loading")
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
