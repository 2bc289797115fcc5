"""All server settings in one object; every field is also an `EXITSERVE_<NAME>` environment variable.

A name that is not a setting -- `--set apikey=x`, `EXITSERVE_APIKEY=x` -- is refused with the setting
it probably meant, never ignored (it used to start a server without the key, silently), and so is an
empty API key. `settings_from` (what `exitserve serve` uses) says what is wrong in one line.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from exitserve.models.problems import first_problem

DEFAULT_MODEL = Path(__file__).parent / "default_model"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ENV_PREFIX = "EXITSERVE_"
# EXITSERVE_* variables that other parts read, not settings: the cache directory (models/backbones.py),
# the allocator's re-execution mark (server/allocator.py), the Ray test cluster's mark (loadtest/cluster.py),
# test and experiment knobs
OTHER_VARIABLES = frozenset(("EXITSERVE_CACHE", "EXITSERVE_ALLOCATOR_PRELOADED", "EXITSERVE_FUZZ_EXAMPLES",
                             "EXITSERVE_CLUSTER",
                             "EXITSERVE_GLUE_DIR"))


class SettingsError(ValueError):
    """Settings that cannot be used: the message says why in one line."""


def did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    checkpoint: Path = Field(DEFAULT_MODEL, description="checkpoint directory (default: the embedded SST-2 model)")
    models: dict[str, Path] = Field(
        default_factory=dict, description="several models in one server: name -> checkpoint directory (JSON in "
        "EXITSERVE_MODELS); when set, `checkpoint` is not served. Each model has its own scheduler"
    )
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    backend: Literal["onnxruntime", "torch"] | None = Field(
        None, description="runtime: onnxruntime (default on the CPU) or torch (default on a GPU)"
    )
    quantize: Literal["none", "int8"] = Field("none", description="onnxruntime weights: none (fp32) or int8")
    ort_threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (default: one per core)")
    ort_arena: Literal["auto"] | bool = Field(
        "auto", description="onnxruntime's CPU memory arena: keeps the largest batch's buffers for reuse (false: each "
        "run's buffers go back to the allocator); auto: off on jemalloc (which returns them to the system: RSS ~0.5x "
        "of the arena's), on with the system malloc (which fragments without it: ~2x)")
    torch_threads: int | None = Field(None, description="intra-op threads (default: torch's choice)")
    criterion: str | None = Field(None, description="override the checkpoint's exit criterion")
    policy: Literal["fcfs", "edf", "slo", "layered", "oldest"] = Field(
        "fcfs", description="scheduling policy (server/policy.py): fcfs, edf, slo run each batch to its exits; "
        "layered, oldest re-batch between layers"
    )
    slo_ms: float | None = Field(None, gt=0, description="latency objective: a request predicted to be answered "
                                 "later is refused at once (429, Retry-After); deadline-aware policies order by it")
    max_batch_size: int = Field(32, ge=1, description="rows per step")
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per step")
    max_queue_size: int = Field(512, ge=1, description="inputs waiting to start; beyond: 429")
    max_inputs_per_request: int = Field(64, ge=1)
    max_chars: int = Field(20000, ge=1, description="characters per text")
    max_body_bytes: int = Field(1_000_000, ge=1, description="request body limit; beyond: 413")
    truncate: bool = Field(True, description="truncate inputs over the model's max tokens (else 422)")
    request_timeout: float = Field(30.0, gt=0, description="seconds from arrival a request may wait to start; then 503")
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a connection may take to send a request's head (from connecting, or from "
        "the next request's first byte); then 408 and the connection is closed"
    )
    body_timeout: float = Field(
        20.0, gt=0, description="seconds from a request's head to the end of its body; then 408, connection closed"
    )
    keep_alive_timeout: int = Field(5, ge=1, description="seconds an idle kept-alive connection stays open")
    max_connections: int = Field(
        1024, ge=1, description="open connections; one more is answered 503 and closed at once"
    )
    allocator: Literal["auto", "jemalloc", "system"] = Field(
        "auto", description="C allocator `exitserve serve` re-executes itself with (auto: jemalloc if installed, "
        "else the system's); see server/allocator.py"
    )
    http_protocol: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="uvicorn's HTTP parser (auto: httptools when installed, else h11)"
    )
    drain_delay: float = Field(
        0.0, ge=0, description="seconds between /ready turning 503 and closing the listener on SIGTERM "
        "(set it above the load balancer's readiness poll interval)"
    )
    drain_timeout: float = Field(30.0, ge=0, description="seconds to finish in-flight requests on SIGTERM")
    api_key: str | None = Field(None, description="if set, /predict, /info and the model routes need "
                                "'Authorization: Bearer KEY'")
    admin_key: str | None = Field(None, description="if set, the admin routes (reload a model) answer to "
                                  "'Authorization: Bearer ADMIN_KEY'; unset: they are off")
    warmup: bool = True
    gc_freeze: bool = Field(
        True, description="after warm-up, exempt every object alive (the model, the libraries) from garbage "
        "collection: full collections then skip ~400k objects (a 100-200 ms pause of every thread, a latency tail)"
    )
    log_level: str = "info"
    access_log: bool = Field(True, description="one log line per request (~10 % of the event loop under overload)")

    # shadow audits and the threshold autopilot (server/audit.py, server/autopilot.py)
    audit_rate: float = Field(0.02, ge=0, le=1, description="fraction of inputs audited: answered at their exit, "
                              "then run to the last layer in idle time to measure agreement (0: off)")
    audit_window: int = Field(1000, ge=1, description="finished audits the agreement metric covers")
    audit_tolerance: float = Field(0.1, ge=0, description="regression: an exit agrees when within this of the "
                                   "last layer's value")
    target_agreement: float | None = Field(None, gt=0, le=1, description="turns the autopilot on: keep the "
                                           "agreement's lower bound >= this by moving the default threshold")
    autopilot_floor: float | None = Field(None, ge=0, le=1, description="lowest default threshold the autopilot "
                                          "may set (default: the checkpoint's calibrated threshold)")
    autopilot_step: float = Field(0.05, gt=0, le=1, description="largest autopilot move; lowering moves a fifth of it")
    autopilot_min_samples: int = Field(100, ge=1, description="audits finished between two autopilot moves")
    autopilot_margin: float = Field(0.01, ge=0, description="hysteresis: lower only while the bound one step down "
                                    "stays >= target + this")

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, Path]) -> dict[str, Path]:
        for name in models:
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (at most 64, "
                                 "starting with a letter or digit): it is part of URLs and metric labels")
        return models
    @model_validator(mode="before")
    @classmethod
    def _no_unknown_variables(cls, values: Any) -> Any:
        known = [ENV_PREFIX + name.upper() for name in cls.model_fields]
        for variable in os.environ:
            if variable.startswith(ENV_PREFIX) and variable not in OTHER_VARIABLES and variable not in known:
                raise ValueError(f"unknown setting {variable} in the environment{did_you_mean(variable, known)}")
        return values

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: str | None) -> str | None:
        if key is not None and not key.strip():
            raise ValueError("an empty API key would let anyone in: set one, or unset api_key to serve without")
        return key

    @model_validator(mode="after")
    def _autopilot_needs_audits(self) -> Settings:
        if self.target_agreement is not None and self.audit_rate == 0:
            raise ValueError("target_agreement needs audits: set audit_rate above 0")
        return self

    @property
    def arena(self) -> bool:
        """Whether onnxruntime keeps its CPU arena (`ort_arena`; auto: only without jemalloc)."""
        if self.ort_arena == "auto":
            from exitserve.server.allocator import loaded

            return loaded() != "jemalloc"
        return self.ort_arena

    @property
    def runtime(self) -> str:
        """The backend to serve on: `backend`, or the device's default."""
        from exitserve.models.backends import default_backend

        return self.backend or default_backend(self.device)


def settings_from(overrides: dict[str, Any]) -> Settings:
    """Settings from the environment and `overrides` (`--set NAME=VALUE`); SettingsError in one line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "extra_forbidden":
            name = str(error["loc"][0])
            raise SettingsError(f"unknown setting {name!r}{did_you_mean(name, list(Settings.model_fields))}") from exc
        raise SettingsError(f"setting {first_problem(exc)}" if error["loc"] else first_problem(exc)) from exc
