"""Prometheus metrics, one per pipeline stage (seconds as units, TEI's conventions), and the Python
garbage collector's pauses (a full collection stops every thread of the process: a tail-latency source).

Two kinds: `Metrics`, one served model's (label `model="name"`), owned by its PredictionService and
replaced with it on a reload (a counter reset, as after a restart); and `ServerMetrics`, the process's
own (requests, failures, GC pauses, which model versions are served, reloads), whose registry is what
GET /metrics renders: it also collects every served model's families, merged by name so that each
metric appears once with one series per model. Each app gets its own registries, so several apps
(tests, Ray replicas) never collide.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

# geometric from 15 us x 1.5 up to ~60 s: fine enough for sub-millisecond stages
DURATION_BUCKETS = tuple(round(15e-6 * 1.5**i, 7) for i in range(38))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The process's metrics, and the registry GET /metrics renders (with every model's, from `models`).
    The request guard counts every request and failure here; `request_duration` is by model."""

    def __init__(self, models: Callable[[], Iterable[Metrics]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("exitserve_requests", "HTTP requests", ["route", "status"], registry=r)
        self.failures = Counter("exitserve_request_failures", "Failed requests", ["reason"], registry=r)
        self.request_duration = Histogram("exitserve_request_duration_seconds", "Whole inference request "
                                          "(/predict, TEI, Open Inference Protocol)", ["model"],
                                          buckets=DURATION_BUCKETS, registry=r)
        self.gc_pause = Histogram("exitserve_gc_pause_seconds", "Python garbage-collector pauses", ["generation"],
                                  buckets=DURATION_BUCKETS, registry=r)
        self.model_version = Gauge("exitserve_model_version", "1 for the checkpoint version each model serves now",
                                   ["model", "version"], registry=r)
        self.reloads = Counter("exitserve_model_reloads", "Model reloads by outcome: done, unchanged (same "
                               "version), refused (the old version kept serving)", ["model", "outcome"], registry=r)
        r.register(_ModelFamilies(models))
        # process-wide: drop the timers of metrics that are gone (tests build many), then add this one's
        gc.callbacks[:] = [c for c in gc.callbacks if getattr(c, "owner", lambda: True)() is not None]
        gc.callbacks.append(_gc_timer(weakref.ref(self)))

    def serving(self, model: str, version: str, previous: str | None = None) -> None:
        """`model` now serves `version` (instead of `previous`)."""
        if previous is not None:
            self.model_version.remove(model, previous)
        self.model_version.labels(model, version).set(1)


class _ModelFamilies:
    """A collector yielding the metric families of every served model, one family per name with the
    samples of all models (two registries each yielding a family of the same name would repeat its
    HELP and TYPE lines, which Prometheus refuses)."""

    def __init__(self, models: Callable[[], Iterable[Metrics]]):
        self.models = models

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for metrics in self.models():
            for family in metrics.registry.collect():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                into.samples.extend(family.samples)
        return merged.values()


class Metrics:
    """The Prometheus metrics of one served model, in their own registry (ServerMetrics collects them).
    `observe_exit` records one answered input: its exit layer and the layers it saved."""

    def __init__(self, model_name: str, num_layers: int):
        self.registry = CollectorRegistry()
        self.model = model_name
        self.num_layers = num_layers
        r = self.registry
        self.predictions = Counter("exitserve_predictions", "Inputs answered", ["model"], registry=r)
        self.exit_layer = Histogram(
            "exitserve_exit_layer", "Layer at which inputs exited (1-based)", ["model"],
            buckets=tuple(range(1, num_layers + 1)), registry=r,
        )
        self.layers_saved = Counter("exitserve_layers_saved", "Layers skipped by early exit", ["model"], registry=r)
        self.average_layers_saved = Gauge(
            "exitserve_average_layers_saved", "Layers saved per prediction since start", ["model"], registry=r
        )
        self.tokenization_duration = self._hist("exitserve_tokenization_duration_seconds", "Tokenisation")
        self.queue_duration = self._hist("exitserve_queue_duration_seconds", "Submit to first layer, per input")
        self.inference_duration = self._hist("exitserve_inference_duration_seconds", "First layer to exit, per input")
        self.batch_size = Histogram(
            "exitserve_batch_size", "Rows per layer step", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_size = Gauge("exitserve_queue_size", "Inputs waiting to start", ["model"], registry=r)
        # with slo_ms set: requests answered within it (met), after it (missed), refused at admission (shed)
        self.slo = Counter("exitserve_slo_requests", "Requests against slo_ms, by outcome", ["model", "outcome"],
                           registry=r)
        for outcome in ("met", "missed", "shed"):
            self.slo.labels(model_name, outcome)
        self.predicted_wait = self._hist("exitserve_predicted_wait_seconds", "Wait predicted at admission (slo_ms)")
        self.wait = self._hist("exitserve_wait_seconds", "Submit to answer of a request's last input (slo_ms)")
        self.audit = AuditMetrics(r, model_name, num_layers)
        self._answered = 0
        self._saved = 0

    def _hist(self, name: str, doc: str) -> Histogram:
        return Histogram(name, doc, ["model"], buckets=DURATION_BUCKETS, registry=self.registry)

    def observe_exit(self, exit_layer: int) -> None:
        saved = self.num_layers - exit_layer
        self._answered += 1
        self._saved += saved
        self.predictions.labels(self.model).inc()
        self.exit_layer.labels(self.model).observe(exit_layer)
        self.layers_saved.labels(self.model).inc(saved)
        self.average_layers_saved.labels(self.model).set(self._saved / self._answered)


def _gc_timer(metrics: weakref.ref):
    """A `gc.callbacks` entry that observes each collection's duration into `metrics().gc_pause` (a no-op
    once that `ServerMetrics` is gone; the next one removes it: removing it from inside a callback would
    make the collector skip the callback after it)."""
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        owner = metrics()
        if owner is None:
            return
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            owner.gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - started[0])

    callback.owner = metrics
    return callback


class AuditMetrics:
    """The shadow audits' and the autopilot's metrics (server/audit.py, server/autopilot.py), bound to
    one model. The agreement gauges and the threshold gauge read their values when scraped."""

    def __init__(self, registry: CollectorRegistry, model: str, num_layers: int):
        r, m = registry, model
        self.audited = Counter("exitserve_audited", "Audited inputs: answered at their exit, then run to the "
                               "last layer", ["model"], registry=r).labels(m)
        self._disagreements = Counter("exitserve_audit_disagreements", "Audited inputs whose served answer "
                                      "disagreed with the last layer's, by exit layer", ["model", "layer"], registry=r)
        for layer in range(1, num_layers):  # every series exists from the start (the last layer always agrees)
            self._disagreements.labels(m, str(layer))
        self.audit_layers = Counter("exitserve_audit_layers", "Layers run by audits after the answer "
                                    "(not in layers saved)", ["model"], registry=r).labels(m)
        self.dropped = Counter("exitserve_audits_dropped", "Audits dropped: overload, shutdown or a failed step",
                               ["model"], registry=r).labels(m)
        self.agreement = Gauge("exitserve_exit_agreement", "Agreement of served answers with the last layer "
                               "over the audit window", ["model"], registry=r).labels(m)
        self.agreement_lower_bound = Gauge("exitserve_exit_agreement_lower_bound", "One-sided 95 % Wilson lower "
                                           "bound of exitserve_exit_agreement", ["model"], registry=r).labels(m)
        self.default_threshold = Gauge("exitserve_default_threshold", "The default exit threshold now (layer "
                                       "1's; the autopilot may move it)", ["model"], registry=r).labels(m)
        self._moves = Counter("exitserve_autopilot_moves", "Autopilot moves of the default threshold",
                              ["model", "direction"], registry=r)
        for direction in ("up", "down"):
            self._moves.labels(m, direction)
        self.model = m

    def disagreement(self, layer: int) -> None:
        self._disagreements.labels(self.model, str(layer)).inc()

    def autopilot_moved(self, direction: str) -> None:
        self._moves.labels(self.model, direction).inc()
