"""The Open Inference Protocol (KServe V2; Triton, Seldon MLServer and KServe speak it) over REST,
for `tritonclient[http]`, KServe's REST client and anything else written against it.

Routes (`[...]` optional; a version other than the one served is a 404): GET /v2 (server metadata),
/v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}] (model metadata),
/v2/models/{name}[/versions/{v}]/ready, and POST /v2/models/{name}[/versions/{v}]/infer.

A model takes input `text` (and `text_pair` for a pair model): BYTES, shape [N] or [N, 1], each element
one UTF-8 text, as JSON `data` or as binary data (Triton's extension: server/oip_tensors.py). It answers
`label` (BYTES [N]) and `probabilities` (FP32 [N, labels]) -- or `value` (FP32 [N]) for regression --
`confidence` (FP32 [N]) and `exit_layer` (INT32 [N], 1-based): all of them, or those named in `outputs`.
Request parameters: `threshold` (0..1; else the `x-exit-threshold` header, else the calibrated default),
`truncate` (bool), `binary_data_output` (bool). The response's `model_version` is the checkpoint's
version (server/registry.py). Errors are the protocol's `{"error": message}`, with the error table's
status (server/errors.py). The model routes need the API key when one is set; the health ones do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from exitserve.models.answers import Prediction
from exitserve.models.exit_config import ExitConfig
from exitserve.server.error_format import OIP_PREFIX
from exitserve.server.errors import APIError, UnknownModel
from exitserve.server.handling import (
    THRESHOLD_HEADER,
    answer_headers,
    check_inputs,
    header_threshold,
    models_of,
    serving,
)
from exitserve.server.handling import run as run_model
from exitserve.server.oip_tensors import BinaryTensorRequest, BinaryTensorRoute, Tensor, decode_bytes, encode_response
from exitserve.server.registry import ServedModel

EXTENSIONS = ["binary_tensor_data"]
Parameters = dict[str, str | int | float | bool]

# tritonclient sends its JSON without a content type: parse the body as JSON whatever it says
router = APIRouter(prefix=OIP_PREFIX, tags=["Open Inference Protocol (KServe V2)"], route_class=BinaryTensorRoute,
                   strict_content_type=False)


class OipError(BaseModel):
    error: str


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(..., description="-1: any size")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class InferInput(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str
    shape: list[int] = Field(..., description="[N] or [N, 1]: N texts")
    datatype: str = Field(..., description="BYTES")
    parameters: Parameters | None = Field(None, description="binary_data_size: its bytes follow the JSON header")
    data: list[str | list[str]] | None = Field(None, description="the texts, flat or [[text], ...] (absent when "
                                               "sent as binary data)")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str
    parameters: Parameters | None = Field(None, description="binary_data: send this output as binary data")


class InferRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    id: str | None = None
    parameters: Parameters | None = Field(None, description="threshold (0..1), truncate, binary_data_output")
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = Field(None, description="default: every output")


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: Parameters | None = None
    data: list[str | float | int] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[OutputTensor]


ERRORS = {code: {"model": OipError} for code in (400, 401, 404, 408, 413, 422, 429, 500, 503)}
# an output: (name, datatype, per-input dims, one prediction's values)
Output = tuple[str, str, list[int], Callable[[Prediction], list]]


def outputs_of(config: ExitConfig) -> list[Output]:
    if config.regression:
        answer: list[Output] = [("value", "FP32", [], lambda p: [p.value])]
    else:
        names = config.label_names
        answer = [("label", "BYTES", [], lambda p: [names[p.label_id]]),
                  ("probabilities", "FP32", [len(names)], lambda p: p.probabilities)]
    return [*answer, ("confidence", "FP32", [], lambda p: [p.confidence]),
            ("exit_layer", "INT32", [], lambda p: [p.exit_layer])]


def inputs_of(config: ExitConfig) -> list[str]:
    return ["text", "text_pair"] if config.pair_column is not None else ["text"]


def _at_version(model: ServedModel, version: str | None) -> ServedModel:
    if version is not None and version != model.version:
        raise UnknownModel(f"model {model.name!r} has no version {version!r}; it serves {model.version}")
    return model


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="exitserve", version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", summary="Server live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server ready: every model loaded and warmed up, not draining",
            responses={503: {"model": OipError}})
async def ready(request: Request):
    if request.app.state.draining or not models_of(request).ready:
        return JSONResponse({"error": "not ready"}, status_code=503)
    return {"ready": True}


def _metadata(request: Request, name: str, version: str | None) -> ModelMetadata:
    model = _at_version(models_of(request).get(name), version)
    config = model.service.config
    return ModelMetadata(
        name=model.name, versions=[model.version], platform=f"exitserve_{model.service.backend.name}",
        inputs=[TensorMetadata(name=n, datatype="BYTES", shape=[-1]) for n in inputs_of(config)],
        outputs=[TensorMetadata(name=n, datatype=t, shape=[-1, *dims]) for n, t, dims, _ in outputs_of(config)],
    )


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS, summary="Model metadata")
async def model_metadata(request: Request, name: str) -> ModelMetadata:
    return _metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS,
            summary="Model metadata (this version)")
async def model_version_metadata(request: Request, name: str, version: str) -> ModelMetadata:
    return _metadata(request, name, version)


def _ready(request: Request, name: str, version: str | None):
    model = _at_version(models_of(request).get(name), version)
    if not model.service.ready:
        return JSONResponse({"error": f"model {name!r} is not ready"}, status_code=503)
    return ModelReady(name=model.name, ready=True)


@router.get("/models/{name}/ready", response_model=ModelReady, responses=ERRORS, summary="Model ready")
async def model_ready(request: Request, name: str):
    return _ready(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, responses=ERRORS,
            summary="Model ready (this version)")
async def model_version_ready(request: Request, name: str, version: str):
    return _ready(request, name, version)


def _parameter(params: Parameters, name: str, kind: type, where: str = "parameters"):
    value = params.get(name)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise APIError.of("validation_error", f"{where}.{name}: must be a {kind.__name__}")
    return value


def _texts(req: InferRequest, tail: bytes, wanted: list[str]) -> dict[str, list[str]]:
    """Each input's texts, from its JSON data or its share of the binary `tail`."""
    found: dict[str, list[str]] = {}
    offset = 0
    for i, tensor in enumerate(req.inputs):
        where = f"inputs[{i}] ({tensor.name})"
        if tensor.name not in wanted or tensor.name in found:
            raise APIError.of("validation_error", f"{where}: this model takes {' and '.join(wanted)}, once each")
        if tensor.datatype != "BYTES":
            raise APIError.of("validation_error", f"{where}: datatype {tensor.datatype!r}; texts are BYTES")
        if not 1 <= len(tensor.shape) <= 2 or tensor.shape[1:] not in ([], [1]) or min(tensor.shape) < 0:
            raise APIError.of("validation_error", f"{where}: shape {tensor.shape}; texts are [N] or [N, 1]")
        size = _parameter(tensor.parameters or {}, "binary_data_size", int, f"{where}.parameters")
        if size is not None:
            chunk = tail[offset: offset + size]
            if tensor.data is not None or size < 0 or len(chunk) != size:
                raise APIError.of("validation_error", f"{where}: binary_data_size {size} does not fit the "
                               f"{len(tail) - offset} binary bytes left (and excludes data)")
            offset += size
            texts = decode_bytes(chunk, where)
        elif tensor.data is None:
            raise APIError.of("validation_error", f"{where}: no data")
        else:
            texts = [s for item in tensor.data for s in ([item] if isinstance(item, str) else item)]
        if len(texts) != tensor.shape[0]:
            raise APIError.of("validation_error", f"{where}: shape {tensor.shape} but {len(texts)} texts")
        found[tensor.name] = texts
    if offset != len(tail):
        raise APIError.of("validation_error", f"{len(tail) - offset} bytes of binary data belong to no input")
    missing = [name for name in wanted if name not in found]
    if missing:
        raise APIError.of("validation_error", f"inputs: missing {' and '.join(missing)} (BYTES)")
    if len(found.get("text_pair", found["text"])) != len(found["text"]):
        raise APIError.of("validation_error", "inputs: text_pair must hold as many texts as text")
    return found


def _threshold(params: Parameters, request: Request) -> float | None:
    value = params.get("threshold")
    if value is None:
        return header_threshold(request)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0.0 <= value <= 1.0):
        raise APIError.of("validation_error", "parameters.threshold: a number from 0 to 1")
    return float(value)


async def _infer(req: InferRequest, request: Request, name: str, version: str | None) -> Response:
    params = req.parameters or {}
    threshold, truncate = _threshold(params, request), _parameter(params, "truncate", bool)
    binary_all = _parameter(params, "binary_data_output", bool)
    with serving(request, name) as model:
        model = _at_version(model, version)
        config = model.service.config
        available = {out[0]: out for out in outputs_of(config)}
        asked = [o.name for o in req.outputs] if req.outputs else list(available)
        unknown = [n for n in asked if n not in available]
        if unknown:
            raise APIError.of("validation_error", f"outputs: no output {unknown[0]!r}; this model has "
                           f"{', '.join(available)}")
        binary = set(asked) if binary_all else {o.name for o in req.outputs or () if _parameter(
            o.parameters or {}, "binary_data", bool, f"outputs ({o.name}).parameters")}
        tail = request.tail if isinstance(request, BinaryTensorRequest) else b""
        found = _texts(req, tail, inputs_of(config))
        texts, pairs = found["text"], found.get("text_pair")
        check_inputs(model.service, texts, pairs)
        outcome = await run_model(request, model, texts, pairs, threshold=threshold, truncate=truncate)
    tensors = []
    for output in asked:
        _, datatype, dims, values = available[output]
        data = [x for p in outcome.predictions for x in values(p)]
        tensors.append(Tensor(output, datatype, [len(texts), *dims], data))
    header = {"model_name": model.name, "model_version": model.version,
              **({"id": req.id} if req.id is not None else {}), "parameters": {"threshold": outcome.thresholds[0]}}
    headers = {**answer_headers(outcome, model), THRESHOLD_HEADER: f"{outcome.thresholds[0]:g}"}
    return encode_response(header, tensors, binary, headers)


@router.post("/models/{name}/infer", response_model=InferResponse, responses=ERRORS, summary="Inference")
async def infer(req: InferRequest, request: Request, name: str) -> Response:
    return await _infer(req, request, name, None)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse, responses=ERRORS,
             summary="Inference (this version)")
async def infer_version(req: InferRequest, request: Request, name: str, version: str) -> Response:
    return await _infer(req, request, name, version)
