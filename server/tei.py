"""Classification in the shapes of text-embeddings-inference (TEI) and the Hugging Face Inference API,
for the clients already written against them.

Where those clients post (read from their sources): TEI serves a classifier at POST /predict, / and
/invocations (SageMaker's), body `{"inputs": str | [a, b] | [[str] | [a, b], ...], "truncate",
"truncation_direction", "raw_scores"}` (a list of two strings is ONE pair; a batch is a list of lists),
answer a list of `{"label", "score"}` sorted by score, one list per input for a batch; errors
`{"error", "error_type"}`. `huggingface_hub.InferenceClient(base_url=URL).text_classification(text)`
posts `{"inputs": text, "parameters": {"top_k", "function_to_apply"}}` to URL itself, reads a list of
such lists and returns the first. So: POST / (and /predict, and /invocations) for the only model, POST
/models/{name} for a named one (`InferenceClient(base_url="http://host:8000/models/NAME")`).

Answers are TEI's shapes; a body with `parameters` (what the Hub's clients send) gets the Inference
API's list of lists for a single text, so the client returns every label rather than only the first.
The early-exit extras ride in headers these clients ignore: x-exit-layer (one input) or x-exit-layers
(a batch, comma-separated), x-exit-threshold (the threshold used), x-model, x-model-version and the
timing headers. A request's threshold: the body's `threshold`, else the `x-exit-threshold` header
(`InferenceClient(base_url, headers={"x-exit-threshold": "0.95"})`); its model: the path, else the
body's `model`. Probabilities are the exit's softmax, so `raw_scores` and a `function_to_apply` other
than softmax are refused (422), as is left truncation.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from exitserve.server.error_format import TEI_MODEL_PREFIX, TEI_PATHS
from exitserve.server.errors import APIError
from exitserve.server.handling import (
    THRESHOLD_HEADER,
    answer_headers,
    check_inputs,
    header_threshold,
    require_json,
    serving,
)
from exitserve.server.handling import run as run_model
from exitserve.server.registry import ServedModel
from exitserve.server.service import Outcome

router = APIRouter(tags=["text-embeddings-inference / Hugging Face"])


class TeiParameters(BaseModel):
    """The Hugging Face Inference API's text-classification parameters (what InferenceClient sends)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    top_k: int | None = Field(None, ge=1, description="only the k most likely labels")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="only softmax: the exits answer softmax probabilities")


class TeiRequest(BaseModel):
    """TEI's /predict body, plus the Inference API's `parameters` and exitserve's `threshold`, `model`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: str | list[str] | list[list[str]] = Field(
        ..., description="a text; [a, b]: one pair; a batch: [[text] | [a, b], ...]")
    truncate: bool | None = Field(None, description="truncate inputs over the model's max tokens (default: "
                                  "the server's `truncate`); false: 422")
    truncation_direction: Literal["right", "Right", "left", "Left"] = Field("right", description="only right")
    raw_scores: bool = Field(False, description="only false: the exits answer probabilities")
    parameters: TeiParameters | None = Field(None, description="Hugging Face Inference API parameters; when "
                                             "present a single text's answer is a list of one list")
    threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                    description=f"exitserve: exit threshold (else the {THRESHOLD_HEADER} header, "
                                    "else the calibrated default)")
    model: str | None = Field(None, description="exitserve: which model, on / and /predict while several are served")


class TeiLabel(BaseModel):
    label: str
    score: float


class TeiError(BaseModel):
    error: str
    error_type: str = Field(..., description="Validation, Overloaded, Unhealthy or Backend")


TeiResponse = list[TeiLabel] | list[list[TeiLabel]]
ERRORS = {code: {"model": TeiError} for code in (400, 401, 404, 408, 413, 415, 422, 429, 500, 503)}


def sequences(inputs: str | list[str] | list[list[str]]) -> tuple[list[list[str]], bool]:
    """TEI's `inputs` as a list of sequences (one text, or a pair) and whether it was a batch."""
    if isinstance(inputs, str):
        return [[inputs]], False
    if inputs and all(isinstance(x, str) for x in inputs):
        if len(inputs) > 2:
            raise APIError.of("validation_error", f"inputs: a list of {len(inputs)} strings; [a, b] is one "
                           "pair, a batch is a list of lists: [[text], [text], ...]")
        return [list(inputs)], False
    if not inputs:
        raise APIError.of("validation_error", "inputs: give at least one text")
    for i, seq in enumerate(inputs):
        if not 1 <= len(seq) <= 2:
            raise APIError.of("validation_error", f"inputs[{i}]: {len(seq)} strings; a text is [text], a "
                           "pair [a, b]")
    return inputs, True


def _refuse_unsupported(req: TeiRequest) -> None:
    if req.raw_scores:
        raise APIError.of("validation_error", "raw_scores: not available; the exits answer softmax probabilities")
    function = req.parameters.function_to_apply if req.parameters else None
    if function not in (None, "softmax"):
        raise APIError.of("validation_error", f"parameters.function_to_apply: {function!r} not available; the "
                       "exits answer softmax probabilities")
    if req.truncation_direction.lower() != "right":
        raise APIError.of("validation_error", "truncation_direction: only right truncation")


def _labels(model: ServedModel, outcome: Outcome, i: int, top_k: int | None) -> list[dict]:
    p, cfg = outcome.predictions[i], model.service.config
    if cfg.regression:
        return [{"label": "value", "score": p.value}]
    ranked = sorted(zip(cfg.label_names, p.probabilities, strict=True), key=lambda x: x[1], reverse=True)
    return [{"label": label, "score": score} for label, score in ranked[:top_k]]


async def classify(req: TeiRequest, request: Request, name: str | None = None) -> JSONResponse:
    """Answer a TEI / Inference API body with model `name` (else the body's, else the only one)."""
    _refuse_unsupported(req)
    if name is not None and req.model not in (None, name):
        raise APIError.of("validation_error", f"model: {req.model!r} in the body, {name!r} in the path")
    seqs, batch = sequences(req.inputs)
    threshold = req.threshold if req.threshold is not None else header_threshold(request)
    with serving(request, name or req.model) as model:
        pair = model.service.pair_input
        if any((len(s) == 2) != pair for s in seqs):
            raise APIError.of("validation_error", "inputs: this model scores pairs: [a, b], or a batch [[a, b], "
                           "...]" if pair else "inputs: this model takes single texts: a text, or a batch "
                           "[[text], ...] ([a, b] is one pair)")
        texts, pairs = [s[0] for s in seqs], [s[1] for s in seqs] if pair else None
        check_inputs(model.service, texts, pairs, ("inputs", "inputs"), single=not batch)
        outcome = await run_model(request, model, texts, pairs, threshold=threshold, truncate=req.truncate)
    top_k = req.parameters.top_k if req.parameters else None
    answers = [_labels(model, outcome, i, top_k) for i in range(len(texts))]
    layers = [str(p.exit_layer) for p in outcome.predictions]
    headers = {**answer_headers(outcome, model), THRESHOLD_HEADER: f"{outcome.thresholds[0]:g}",
               "x-exit-layers" if batch else "x-exit-layer": ",".join(layers)}
    if batch:
        return JSONResponse(answers, headers=headers)
    return JSONResponse([answers[0]] if req.parameters is not None else answers[0], headers=headers)


ROUTE = {"response_model": TeiResponse, "responses": ERRORS, "dependencies": [Depends(require_json)]}


@router.post(TEI_PATHS[0], summary="Classify (TEI; huggingface_hub InferenceClient(base_url))", **ROUTE)
async def classify_root(req: TeiRequest, request: Request) -> JSONResponse:
    return await classify(req, request)


@router.post(TEI_PATHS[1], summary="Classify (TEI's SageMaker route)", **ROUTE)
async def classify_invocations(req: TeiRequest, request: Request) -> JSONResponse:
    return await classify(req, request)


@router.post(TEI_MODEL_PREFIX + "{name}", summary="Classify with a named model (InferenceClient(base_url="
             "'http://host:port/models/NAME'))", **ROUTE)
async def classify_named(req: TeiRequest, request: Request, name: str) -> JSONResponse:
    return await classify(req, request, name)
