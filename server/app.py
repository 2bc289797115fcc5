"""The FastAPI app: `create_app` (the factory) and exitserve's own routes.

Routes take the model a request names from `request.app.state.models` (server/registry.py: every
served model by name); all model work happens in its `PredictionService` and scheduler. Request flow:
`GuardMiddleware` (server/guard.py: API key, 429 at once while the queue is full, body size and time
limits, request metrics) -> `predict` route (content type, validation; a TEI-shaped body is answered
as TEI would: server/tei.py) -> `PredictionService.predict`, raced against the client disconnecting
(then the request's samples are cancelled and never computed: server/handling.py) -> `LayerScheduler`
-> response with timing headers. The other APIs have routers of their own: TEI / Hugging Face
(server/tei.py), the Open Inference Protocol (server/oip.py), the admin reload (server/admin.py). Every
failure is answered from the one table in server/errors.py, in the format of the API called.
"""

from __future__ import annotations

import importlib.metadata
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Discriminator, Tag

from exitserve.server import admin, oip, tei
from exitserve.server.docs_ui import docs_router
from exitserve.server.error_format import KINDS, kind_response
from exitserve.server.errors import APIError, install_error_handlers
from exitserve.server.guard import GuardMiddleware
from exitserve.server.handling import answer_headers, check_inputs, models_of, require_json, run, serving
from exitserve.server.registry import ModelRegistry
from exitserve.server.schemas import (
    BODY_FORMATS,
    ErrorResponse,
    InfoResponse,
    ModelsResponse,
    PredictBatchResponse,
    PredictRequest,
    PredictResult,
    ServedModelOut,
    StatusResponse,
)
from exitserve.server.service import Outcome, PredictionService
from exitserve.server.settings import Settings

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 422, 429, 500, 503)}
router = APIRouter()


def version() -> str:
    try:
        return importlib.metadata.version("exitserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _body_format(body: Any) -> str:
    """/predict's body: TEI's when it has `inputs` (TEI's /predict), else exitserve's."""
    return BODY_FORMATS[1] if isinstance(body, dict) and "inputs" in body else BODY_FORMATS[0]


PredictBody = Annotated[
    Annotated[PredictRequest, Tag(BODY_FORMATS[0])] | Annotated[tei.TeiRequest, Tag(BODY_FORMATS[1])],
    Discriminator(_body_format),
]


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def validate(req: PredictRequest, service: PredictionService) -> tuple[list[str], list[str] | None]:
    texts = _as_list(req.text)
    pairs = _as_list(req.text_pair) if req.text_pair is not None else None
    if pairs is not None and service.pair_input and (
            isinstance(req.text, str) != isinstance(req.text_pair, str) or len(pairs) != len(texts)):
        raise APIError.of("validation_error", "text_pair: must match text (a string, or a list of the same length)")
    check_inputs(service, texts, pairs, single=isinstance(req.text, str))
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


@router.post("/predict", response_model=PredictResult | PredictBatchResponse | tei.TeiResponse, responses=ERRORS,
             dependencies=[Depends(require_json)], response_model_exclude_none=True)
async def predict(req: PredictBody, request: Request):
    if isinstance(req, tei.TeiRequest):
        return await tei.classify(req, request)
    with serving(request, req.model) as model:
        texts, pairs = validate(req, model.service)
        outcome = await run(request, model, texts, pairs, threshold=req.threshold, trace=req.return_trace)
    headers = answer_headers(outcome, model)
    results = [_result(model.service, outcome, i) for i in range(len(texts))]
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
    """Readiness: 200 only once every model is loaded and warmed up, and not while draining."""
    if request.app.state.draining:
        return kind_response(KINDS["draining"], "the server is shutting down")
    if not models_of(request).ready:
        return kind_response(KINDS["not_ready"], "the model is loading")
    return StatusResponse(status="ready")


@router.get("/info", response_model=InfoResponse, responses=ERRORS)
async def info(request: Request, model: Annotated[str | None, Query(
        description="which model (GET /models lists them); needed only while several are served")] = None,
) -> InfoResponse:
    models = models_of(request)
    served = models.get(model)
    return InfoResponse(**served.service.info(), model_version=served.version, models=models.names, version=version())


@router.get("/models", response_model=ModelsResponse, responses=ERRORS)
async def models(request: Request) -> ModelsResponse:
    """Every served model: its name (what every API addresses it by), version and readiness."""
    return ModelsResponse(models=[
        ServedModelOut(name=m.name, version=m.version, ready=m.service.ready, task=m.service.config.task,
                       labels=m.service.config.label_names, pair_input=m.service.pair_input,
                       num_layers=m.service.config.num_layers)
        for m in models_of(request).served.values()
    ])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(models_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings, models: ModelRegistry | PredictionService | None = None) -> FastAPI:
    """The app. Pass the loaded models (the CLI does, so a bad checkpoint fails before serving; a lone
    `PredictionService` is served as the only model); otherwise they are loaded from the settings at
    start-up."""
    if isinstance(models, PredictionService):
        models = ModelRegistry.of(settings, models)
    registry = models if models is not None else ModelRegistry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not registry.served:
            registry.load_all()
        app.state.draining = False
        await registry.start()
        yield
        app.state.draining = True
        registry.stop()

    app = FastAPI(title="exitserve", version=version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Early-exit (BERxiT) inference for transformer encoders: exitserve's own API, "
                  "text-embeddings-inference / Hugging Face Inference API classification, the Open Inference "
                  "Protocol (KServe V2), several models by name, reload in place.")
    app.state.settings, app.state.models, app.state.draining = settings, registry, False
    install_error_handlers(app)
    for api in (router, tei.router, oip.router, admin.router):
        app.include_router(api)
    app.include_router(docs_router(app.title))  # /docs with its assets served locally (works offline)
    app.add_middleware(GuardMiddleware, state=app.state, routes=app.routes)
    return app
