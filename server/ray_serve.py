"""Scale-out on Ray Serve: the same FastAPI app and early-exit scheduler inside every replica.

Each replica is one `ExitServeReplica` actor: it loads the checkpoint into its own
`PredictionService` and serves `create_app(settings, service)` through `@serve.ingress`, so
/predict, /ready, /info, /metrics and the error format are the plain server's. Ray's HTTP proxy
routes requests to replicas; every response names its replica in the `x-exitserve-replica` header.

Backpressure: a replica takes at most `max_ongoing_requests` requests at once (its scheduler
batches them layer by layer); each proxy queues at most `max_queued_requests` more for the whole
deployment and answers the rest 429 with Retry-After at once. Ray's own plain-text errors (429,
408 timeout, 503 no replica) are put into exitserve's `{"error": ...}` format, and a request whose
replica died holding it is sent to another replica, by `proxy_middlewares`, which the proxies load
from the environment variable named by `PROXY_CALLBACK_ENV` (set automatically for a local instance).

Two entry points: `exitserve serve --ray` (`run`), and `serve run deploy/ray-serve.yaml`
(`app_builder`). See docs/RAY.md.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from typing import Any

import ray
from fastapi import FastAPI
from prometheus_client import start_http_server
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from exitserve.models.exit_config import BackboneError, CheckpointError
from exitserve.server.app import create_app
from exitserve.server.service import PredictionService
from exitserve.server.settings import Settings

log = logging.getLogger("exitserve")

APP_NAME = "exitserve"
REPLICA_HEADER = "x-exitserve-replica"
MODEL_HEADER = "x-exitserve-model"  # the checkpoint directory's name, as /info's "model": old or new in an update
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "exitserve.server.ray_proxy:proxy_middlewares"


class RayOptions(BaseModel):
    """Ray-specific options; the model and server options stay in `Settings`."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="replicas (the minimum when max_replicas is set)")
    max_replicas: int | None = Field(None, ge=1, description="autoscale between num_replicas and this")
    target_ongoing_requests: float = Field(8, gt=0, description="autoscaling target per replica")
    num_cpus: float = Field(1, gt=0, description="CPUs reserved per replica; default torch threads")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (set device=cuda in the settings)")
    max_ongoing_requests: int = Field(16, ge=1, description="requests a replica works on at once")
    max_queued_requests: int = Field(64, ge=0, description="requests each proxy queues; beyond: 429")
    metrics_port: int | None = Field(None, ge=1, le=65535,
                                     description="if set, replica k on a node serves /metrics on this + k")
    max_replicas_per_node: int | None = Field(None, ge=1, description="a hard spread: at most this many per node")
    max_surge_percent: int = Field(0, ge=0, le=100, description="extra replicas a rolling update may start first")
    upscale_delay_s: float = Field(30, ge=0, description="autoscaling: load must stay high this long to add")
    downscale_delay_s: float = Field(600, ge=0, description="autoscaling: load must stay low this long to remove")
    look_back_period_s: float = Field(30, gt=0, description="autoscaling: the window its load average covers")

    @model_validator(mode="after")
    def _replica_range(self) -> RayOptions:
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below num_replicas ({self.num_replicas})")
        return self

    def deployment_options(self) -> dict[str, Any]:
        scaling: dict[str, Any] = {"num_replicas": self.num_replicas}
        if self.max_replicas is not None:
            scaling = {"num_replicas": "auto", "autoscaling_config": {
                "min_replicas": self.num_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests, "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s, "look_back_period_s": self.look_back_period_s,
            }}
        return {
            **scaling,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 429, "retry_after_s": 1},
            "max_constructor_retry_count": 2,  # a broken checkpoint fails the deployment, not 20 retries
            "max_replicas_per_node": self.max_replicas_per_node,
            "max_surge_percent": self.max_surge_percent,
        }

    def cpus_needed(self) -> int:
        return math.ceil((self.max_replicas or self.num_replicas) * self.num_cpus)


class AppArgs(BaseModel):
    """`args:` of an application in a `serve run` / `serve deploy` config file."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(default_factory=dict, description="Settings fields (server/settings.py)")
    ray: RayOptions = Field(default_factory=RayOptions)


class ReplicaHeader:
    """Pure ASGI: adds the replica's id and its model's name to every HTTP response."""

    def __init__(self, app, replica: str, model: str):
        self.app = app
        self.headers = [(REPLICA_HEADER.encode(), replica.encode()), (MODEL_HEADER.encode(), model.encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.deployment(name="ExitServe")
@serve.ingress()
class ExitServeReplica:
    """One replica: its own PredictionService (model, scheduler, metrics) behind the plain app."""

    def __init__(self, settings: dict[str, Any], metrics_port: int | None = None):
        # only explicitly set values travel; defaults (e.g. the embedded model's path) resolve here
        self.settings, self.metrics_port = Settings(**settings), metrics_port

    def __serve_build_asgi_app__(self) -> FastAPI:
        context = serve.get_replica_context()
        PredictionService.own_process(self.settings)
        service = PredictionService.load(self.settings)
        app = create_app(self.settings, service)
        if self.metrics_port is not None:
            port = self.metrics_port + context.rank.local_rank
            try:
                start_http_server(port, self.settings.host, app.state.models.metrics.registry)
                log.info("replica %s: metrics on %s:%d", context.replica_tag, self.settings.host, port)
            except OSError as exc:  # e.g. still held by a replica being replaced: serve anyway
                log.warning("replica %s: no metrics port %d (%s); /metrics still answers", context.replica_tag,
                            port, exc)
        app.add_middleware(ReplicaHeader, replica=context.replica_tag, model=service.name)
        return app


def build(settings: Settings, options: RayOptions) -> Application:
    """The Serve application: `options` as deployment options, `settings` for every replica."""
    values = settings.model_dump(mode="json", exclude_unset=True)
    values.setdefault("torch_threads", max(1, int(options.num_cpus)))
    values.setdefault("ort_threads", max(1, int(options.num_cpus)))
    return ExitServeReplica.options(
        **options.deployment_options(),
        logging_config={"log_level": settings.log_level.upper()},  # "warning" also drops Ray's access log
        graceful_shutdown_timeout_s=settings.drain_timeout,  # in-flight requests finish before the replica stops
    ).bind(values, options.metrics_port)


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run exitserve.server.ray_serve:app_builder` and config files; `args` as `AppArgs`."""
    parsed = AppArgs.model_validate(args)
    return build(Settings(**parsed.settings), parsed.ray)


def _wait_for_stop_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def run(settings: Settings, options: RayOptions, address: str | None = None) -> int:
    """`exitserve serve --ray`: deploy, serve until SIGINT/SIGTERM, then remove the application.

    With no `address` it starts a local Ray instance on 127.0.0.1 sized for the replicas
    (dashboard off) and stops it on exit; otherwise it joins that cluster and, on exit, deletes
    only its application."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if address is None:
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
        ray.init(num_cpus=options.cpus_needed(), include_dashboard=False, _node_ip_address="127.0.0.1")
    else:
        ray.init(address=address)
    try:
        try:
            serve.start(http_options={"host": settings.host, "port": settings.port},
                        logging_config={"log_level": settings.log_level.upper()})
            serve.run(build(settings, options), name=APP_NAME, route_prefix="/")
        except (RuntimeError, CheckpointError, BackboneError) as exc:  # the proxy's or a replica's error
            print(f"exitserve serve --ray: cannot start: {exc} (details logged above)", file=sys.stderr)
            return 2
        log.info("serving on http://%s:%d with Ray Serve (%s)", settings.host, settings.port, options)
        _wait_for_stop_signal()
        return 0
    finally:
        if address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
