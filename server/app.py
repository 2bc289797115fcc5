"""The FastAPI app: `create_app` (the factory) and the routes.

Routes read the `PredictionService` from `request.app.state.service`; all model work happens in the
service and its scheduler. Request flow: `GuardMiddleware` (429 at once while the queue is full,
body limit, request metrics) -> `predict` route (auth, content type, validation) ->
`PredictionService.predict`, raced against the client disconnecting (then the request's samples are
cancelled and never computed) -> `LayerScheduler` -> response with timing headers.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import secrets
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from exitserve.models.encoding import InputTooLong
from exitserve.server.errors import APIError, error_response, install_error_handlers
from exitserve.server.scheduler import DeadlineExceeded, QueueFull, SchedulerStopped
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

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 429, 500, 503)}
router = APIRouter()
T = TypeVar("T")


def version() -> str:
    try:
        return importlib.metadata.version("exitserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def service_of(request: Request) -> PredictionService:
    return request.app.state.service


async def require_api_key(request: Request) -> None:  # async: FastAPI runs sync ones in a thread
    expected = request.app.state.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), expected.encode()):
        raise APIError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY)",
                       {"WWW-Authenticate": "Bearer"})


async def require_json(request: Request) -> None:
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise APIError(415, "unsupported_media_type",
                       f"send the body as application/json (got {media or 'no content type'})")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


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
            if not value.strip():
                raise APIError(422, "validation_error", f"{where}: empty text")
            if not value.isascii():
                try:
                    value.encode()
                except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800" in the JSON
                    raise APIError(422, "validation_error", f"{where}: not valid Unicode ({exc.reason})") from exc
            if len(value) > settings.max_chars:
                raise APIError(422, "validation_error",
                               f"{where}: {len(value)} characters; at most {settings.max_chars}")
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
             dependencies=[Depends(require_api_key), Depends(require_json)], response_model_exclude_none=True)
async def predict(req: PredictRequest, request: Request, response: Response):
    service = service_of(request)
    if not service.ready:
        raise APIError(503, "not_ready", "the model is not ready", {"Retry-After": "1"})
    texts, pairs = validate(req, service)
    try:
        outcome = await unless_client_leaves(
            request, service.predict(texts, pairs=pairs, threshold=req.threshold, trace=req.return_trace)
        )
    except ClientGone as exc:  # nobody reads this answer; 499 is nginx's "client closed request"
        service.metrics.failures.labels("disconnected").inc()
        raise APIError(499, "client_closed_request", "the client disconnected") from exc
    except InputTooLong as exc:
        raise APIError(422, "input_too_long", str(exc)) from exc
    except QueueFull as exc:
        service.metrics.failures.labels("overloaded").inc()
        raise APIError(429, "overloaded", str(exc), {"Retry-After": "1"}) from exc
    except DeadlineExceeded as exc:
        service.metrics.failures.labels("deadline").inc()
        raise APIError(503, "deadline_exceeded", str(exc)) from exc
    except SchedulerStopped as exc:
        raise APIError(503, "shutting_down", str(exc)) from exc
    except Exception as exc:
        service.metrics.failures.labels("inference").inc()
        raise APIError(500, "inference_error", f"{type(exc).__name__}: {exc}") from exc
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
        return error_response(503, "draining", "the server is shutting down")
    if not service.ready:
        return error_response(503, "not_ready", "the model is loading")
    return StatusResponse(status="ready")


@router.get("/info", response_model=InfoResponse, dependencies=[Depends(require_api_key)], responses=ERRORS)
async def info(request: Request) -> InfoResponse:
    return InfoResponse(**service_of(request).info(), version=version())


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(service_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body over the limit. An HTTPException, so FastAPI's body parsing passes
    it on (it turns any other exception into a 400) and the handler answers 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


class GuardMiddleware:
    """Pure ASGI: refuses /predict with 429 while the queue has no room for even one input, before
    anything is parsed (so refusing stays cheap under overload); refuses bodies over the limit (413);
    counts requests by route and status."""

    def __init__(self, app, max_body_bytes: int, state):
        self.app, self.max_body_bytes, self.state = app, max_body_bytes, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, started, status = scope["path"], time.monotonic(), {"code": 500, "sent": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        service = getattr(self.state, "service", None)
        try:
            if route == "/predict" and service is not None and service.ready and service.room <= 0:
                service.metrics.failures.labels("overloaded").inc()
                full = f"queue full ({service.settings.max_queue_size} inputs waiting)"
                await error_response(429, "overloaded", full, {"Retry-After": "1"})(scope, receive, send_wrapper)
                return
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)
            await self.app(scope, limited_receive, send_wrapper)
        except BodyTooLarge as exc:
            if not status["sent"]:
                await error_response(413, "payload_too_large", exc.detail)(scope, receive, send_wrapper)
        finally:
            service = getattr(self.state, "service", None)  # the lifespan may have loaded it meanwhile
            if service is not None:
                known = route if route in ("/predict", "/health", "/ready", "/info", "/metrics") else "other"
                service.metrics.requests.labels(known, str(status["code"])).inc()
                if known == "/predict":
                    service.metrics.request_duration.labels(service.name).observe(time.monotonic() - started)


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

    app = FastAPI(title="exitserve", version=version(), lifespan=lifespan,
                  description="Early-exit (BERxiT) inference for transformer encoders.")
    app.state.settings, app.state.service, app.state.draining = settings, service, False
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, state=app.state)
    return app
