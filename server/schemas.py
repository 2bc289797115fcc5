"""The HTTP contract: request and response bodies (they also make the OpenAPI spec)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# /predict takes exitserve's body or TEI's (server/app.py): the tags of the two, which validation
# errors' locations carry and their messages leave out
BODY_FORMATS = ("exitserve", "tei")


class PredictRequest(BaseModel):
    # strict: what the spec says, nothing coerced ("threshold": false or "return_trace": "yes" is a 422)
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | list[str] = Field(..., description="one text, or a list of texts")
    text_pair: str | list[str] | None = Field(None, description="second texts, for pair tasks (same length)")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="exit threshold; default: the checkpoint's calibrated one. "
        "1.0 runs every layer, 0.0 exits at layer 1",
    )
    return_trace: bool = Field(False, description="include every layer's confidence and prediction")
    model: str | None = Field(None, description="which model answers (GET /models lists them); "
                              "needed only while several are served")


class LayerTraceOut(BaseModel):
    layer: int
    confidence: float
    prediction: str | float


class PredictResult(BaseModel):
    prediction: str | float = Field(..., description="label name, or the value for regression")
    label_id: int | None = None
    confidence: float
    exit_layer: int = Field(..., description="1-based layer that answered")
    num_layers: int
    threshold: float
    probabilities: dict[str, float] | None = None
    trace: list[LayerTraceOut] | None = None


class PredictBatchResponse(BaseModel):
    results: list[PredictResult]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StatusResponse(BaseModel):
    status: str


class AutopilotMove(BaseModel):
    time: float = Field(..., description="unix time")
    audits: int = Field(..., description="audits finished when it moved")
    old: float
    new: float
    lower_bound: float = Field(..., description="the agreement bound that justified it (at old: up; at new: down)")


class AutopilotInfo(BaseModel):
    target: float = Field(..., description="target_agreement: the lower bound it keeps at or above")
    threshold: float = Field(..., description="the default threshold now")
    start: float = Field(..., description="where it started: the checkpoint's threshold (within the floor)")
    floor: float
    step: float
    min_samples: int
    margin: float
    lower_bound_at_threshold: float | None = Field(
        ..., description="agreement lower bound the current threshold gives on the audit window (replayed)")
    audits_since_move: int
    moves: dict[str, int] = Field(..., description="moves up and down since start")
    recent_moves: list[AutopilotMove]


class AuditInfo(BaseModel):
    rate: float = Field(..., description="fraction of inputs audited")
    window: int = Field(..., description="finished audits the agreement covers (audit_window)")
    in_window: int
    agreement: float | None = Field(..., description="served answers agreeing with the last layer, over the window")
    lower_bound: float | None
    bound: str = Field(..., description="how the lower bound is computed")
    tolerance: float | None = Field(..., description="regression: the agreement tolerance")
    audited: int = Field(..., description="audits finished since start")
    dropped: int = Field(..., description="audits dropped since start (overload, shutdown)")
    pending: int = Field(..., description="answered audits still waiting for idle time to reach the last layer")
    extra_layers: int = Field(..., description="layers audits ran after the answers (not in layers saved)")
    autopilot: AutopilotInfo | None = Field(..., description="null unless target_agreement is set")


class ServedModelOut(BaseModel):
    name: str
    version: str = Field(..., description="first 12 hex digits of the sha256 of the checkpoint's configs and weights")
    ready: bool
    task: str
    labels: list[str]
    pair_input: bool
    num_layers: int


class ModelsResponse(BaseModel):
    models: list[ServedModelOut]


class InfoResponse(BaseModel):
    model: str
    model_version: str = Field(..., description="the checkpoint's version (see GET /models); changes on a reload")
    models: list[str] = Field(..., description="every model this server serves")
    task: str
    task_type: str
    labels: list[str]
    num_layers: int
    criterion: str
    default_threshold: float | list[float]
    calibration: dict | None
    backend: dict[str, str | None] = Field(description="runtime: name (onnxruntime | torch), quantize, calibration_key")
    scheduler: dict[str, str | float | None] = Field(description="policy, slo_ms (server/policy.py)")
    backbone: str
    strategy: str
    max_length: int
    pair_input: bool
    limits: dict[str, int | float | bool]
    audits: AuditInfo
    version: str
