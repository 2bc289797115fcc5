"""The prediction service: the served model + tokenizer + scheduler + metrics, with no HTTP in it.

A request goes: `predict` -> admission (QueueFull unless the queue has room for its inputs, counting
the inputs still being tokenised, so nothing waits unbounded in front of the queue) -> tokenise -> with
`slo_ms`, a request predicted to miss it is refused (SloUnreachable) -> one `Sample` per input submitted
to the `Scheduler` -> await every sample's future (each resolves the moment its step answers it) ->
results in input order plus per-stage timings. The request's deadline runs from its arrival.

A small request (at most `INLINE_TOKENIZE_CHARS` characters, a few hundred tokens: ~0.1-0.5 ms) is
tokenised on the event loop itself, a larger one in a worker thread: handing a small one to a thread
and back costs more than tokenising it (two context switches, and more of the loop's own time than
the tokeniser's), and adds a wait for a free core under load. If the request fails or is cancelled
(its client went away) while waiting, its other samples are cancelled, and the scheduler drops them
before their next step instead of computing them.
A fraction `audit_rate` of inputs is also audited (server/audit.py: the agreement metrics and, with
`target_agreement`, the autopilot that moves the default threshold requests without one get).
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from dataclasses import dataclass

import numpy as np

from exitserve.models.answers import Prediction
from exitserve.models.served import LoadedCheckpoint, load_served
from exitserve.server.audit import create_monitor
from exitserve.server.cost import StepCost
from exitserve.server.metrics import Metrics
from exitserve.server.policy import Limits, make_policy
from exitserve.server.scheduler import Scheduler, SloUnreachable, StepStats
from exitserve.server.settings import Settings
from exitserve.server.steps import Sample

WARMUP_TEXT = "warming up"
WARMUP_SINGLES = 3
INLINE_TOKENIZE_CHARS = 2000  # requests up to this many characters are tokenised on the event loop
INFO_KEYS, INFO_CHARS = 40, 200  # /info shows at most this many fields per object, this many characters per text


def summary(record: dict | None, depth: int = 3) -> dict | None:
    """A calibration record as /info shows it, small however large the record: numbers, flags, short
    texts and short lists of numbers (per-layer thresholds), and objects `depth` deep (a variant's
    record, its report rows); other lists (the per-threshold tests) are left out."""
    if record is None:
        return None
    out: dict = {}
    for key, value in list(record.items())[:INFO_KEYS]:
        if isinstance(value, str):
            out[key] = value[:INFO_CHARS]
        elif value is None or isinstance(value, (bool, int, float)):
            out[key] = value
        elif isinstance(value, dict) and depth > 1:
            out[key] = summary(value, depth - 1)
        elif isinstance(value, list) and len(value) <= INFO_KEYS and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            out[key] = value
    return out


class NonFiniteOutput(RuntimeError):
    """The model answered NaN or infinity (damaged weights, an overflow): never sent as an answer."""


def check_finite(predictions: list[Prediction]) -> None:
    """Raise NonFiniteOutput unless every number of every prediction (and of its trace) is finite."""
    for i, p in enumerate(predictions):
        numbers = [p.value, p.confidence, *(p.probabilities or ())]
        numbers += [x for t in p.trace or () for x in (t.confidence, t.prediction)]
        if not all(math.isfinite(x) for x in numbers):
            raise NonFiniteOutput(f"the model's output for input {i} is not a finite number (NaN or infinity)")


@dataclass
class Timings:
    tokenization: float
    queue: float  # the slowest input's wait for its first layer
    inference: float  # the slowest input's first layer to exit
    total: float


@dataclass
class Outcome:
    predictions: list[Prediction]
    thresholds: list[float]  # the threshold each input ran with (layer 1's, for per-layer configs)
    timings: Timings


class PredictionService:
    """One loaded model served: its exit config, tokenizer and runtime backend, the scheduler that runs
    it, and the metrics. `predict` is the whole request path below HTTP (see the module docstring);
    `start`/`stop` bracket the server's life (warm-up before ready, drain on stop)."""

    def __init__(self, loaded: LoadedCheckpoint, settings: Settings, name: str | None = None):
        self.loaded, self.settings = loaded, settings
        self.path = loaded.path
        self.config = loaded.exit_config
        self.encoder = loaded.encoder
        self.criterion = self.config.make_criterion(settings.criterion)
        self.name = name or loaded.path.name  # the name it is served under (server/registry.py)
        self.metrics = Metrics(self.name, self.config.num_layers)
        self.backend = loaded.backend
        # the checkpoint's threshold for this backend (int8 weights have their own calibration)
        self.calibrated_threshold = self.config.threshold_for(self.backend.calibration_key)
        self.audits = create_monitor(settings, self.config, self.calibrated_threshold, self.criterion,
                                     self.backend.num_outputs, self.metrics.audit)
        cost = StepCost()
        slo = settings.slo_ms / 1000 if settings.slo_ms is not None else None
        self.scheduler = Scheduler(
            self.backend, self.criterion, make_policy(settings.policy, cost.run_seconds),
            Limits(settings.max_batch_size, settings.max_batch_tokens), settings.max_queue_size, slo, cost,
            on_step=self._on_step, on_audit=self.audits.record,
        )
        self.metrics.queue_size.labels(self.name).set_function(lambda: self.scheduler.queue_size)
        self.metrics.audit.default_threshold.set_function(lambda: self.config.thresholds(self.default_threshold)[0])
        self.tokenizing = 0  # inputs admitted but not yet queued (only touched on the event loop)
        self.ready = False
        self.warming_up = False  # warm-up batches are not traffic: the metrics skip them

    @staticmethod
    def own_process(settings: Settings) -> None:
        """Called by a process that serves and nothing else (`exitserve serve`, a Ray replica), before
        `load`: every ONNX Runtime session then runs on one shared thread pool."""
        if settings.runtime == "onnxruntime":
            from exitserve.models.backends.onnx_backend import share_one_thread_pool

            share_one_thread_pool(settings.ort_threads)

    @classmethod
    def load(cls, settings: Settings, name: str | None = None) -> PredictionService:
        """Load and validate the checkpoint (raises CheckpointError with a one-line reason)."""
        if settings.runtime == "torch" and settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        loaded = load_served(settings.checkpoint, settings.runtime, settings.quantize, settings.ort_threads,
                             settings.device, settings.criterion, settings.arena)
        return cls(loaded, settings, name)

    @property
    def room(self) -> int:
        """Inputs that can still be admitted: the queue's room less the inputs being tokenised."""
        return self.scheduler.room - self.tokenizing

    @property
    def default_threshold(self) -> float | list[float]:
        """The threshold of requests that name none: the checkpoint's, or where the autopilot moved it."""
        autopilot = self.audits.autopilot
        return self.calibrated_threshold if autopilot is None else autopilot.threshold

    @property
    def pair_input(self) -> bool:
        return self.config.pair_column is not None

    def _on_step(self, stats: StepStats) -> None:
        if self.warming_up:
            return
        self.metrics.batch_size.labels(self.name).observe(stats.batch_size)
        for prediction in stats.answered:
            self.metrics.observe_exit(prediction.exit_layer)

    async def start(self) -> None:
        self.scheduler.start()
        if self.settings.warmup:
            self.warming_up = True
            try:
                await self._warm_up()
            finally:
                self.warming_up = False
        # the cost model's layers per input: what the calibration measured (warm-up ran every layer)
        report = (self.config.calibration or {}).get("report") or {}
        self.scheduler.cost.mean_layers = report.get("mean_exit_layer") or self.config.num_layers / 2
        if self.settings.gc_freeze:
            # Everything alive now (modules, model, tokenizer: ~400k objects) lives as long as the server; a
            # full collection would scan it all with every thread stopped (~100-200 ms here). Frozen, it is
            # never scanned again: collections see only what serving allocates.
            gc.collect()
            gc.freeze()
        self.ready = True

    async def _warm_up(self) -> None:
        """A few steps of growing size, up to the largest step the scheduler can form, run through every
        layer: kernels are loaded, the allocator has reached the high-water mark of its biggest batch
        before /ready answers 200 (text-embeddings-inference warms up at its token budget for the same
        reason), and the scheduler's cost model has seen steps of several sizes (server/cost.py)."""
        s = self.settings
        rows = max(1, min(s.max_batch_size, s.max_batch_tokens // self.config.max_length, s.max_queue_size))
        longest = " ".join(["a"] * 2 * self.config.max_length)  # truncated to exactly max_length tokens
        for _ in range(WARMUP_SINGLES):
            await self.predict([WARMUP_TEXT], threshold=1.0)
        for count in sorted({max(1, rows // 4), max(1, rows // 2), rows}):
            await self.predict([longest] * count, threshold=1.0, truncate=True)

    def stop(self) -> None:
        self.ready = False
        self.scheduler.stop(self.settings.drain_timeout)
        if self.settings.gc_freeze:
            gc.unfreeze()  # a process that goes on (tests, a restarted app) collects normally again

    async def predict(
        self, texts: list[str], *, pairs: list[str] | None = None, threshold: float | None = None,
        trace: bool = False, truncate: bool | None = None,
    ) -> Outcome:
        """Answer `texts` (with `pairs` for pair tasks) at `threshold` (None: the default threshold);
        raises QueueFull, DeadlineExceeded, SchedulerStopped, InputTooLong or the model's error."""
        start = time.monotonic()
        self.scheduler.check_room(len(texts), reserved=self.tokenizing)  # 429 before paying for tokenisation
        loop = asyncio.get_running_loop()
        truncate = self.settings.truncate if truncate is None else truncate
        args = (texts, pairs, truncate)
        if sum(map(len, texts)) + sum(map(len, pairs or ())) <= INLINE_TOKENIZE_CHARS:
            encoded = self.encoder.encode(*args)
        else:
            self.tokenizing += len(texts)
            try:
                encoded = await loop.run_in_executor(None, self.encoder.encode, *args)
            finally:
                self.tokenizing -= len(texts)
        tokenized = time.monotonic()
        self.metrics.tokenization_duration.labels(self.name).observe(tokenized - start)

        predicted = None
        if not self.warming_up and self.scheduler.slo is not None:
            try:
                predicted = self.scheduler.check_slo([len(e) for e in encoded])
            except SloUnreachable:
                self.metrics.slo.labels(self.name, "shed").inc()
                raise
        thresholds = self.config.thresholds(self.default_threshold if threshold is None else threshold)
        per_layer = np.array(thresholds, dtype=np.float32)
        deadline = start + self.settings.request_timeout
        samples = [
            Sample(e, per_layer, loop.create_future(), loop, deadline, trace=trace,
                   audit=not self.warming_up and self.audits.should_audit())
            for e in encoded
        ]
        self.scheduler.submit(samples)
        try:
            predictions = [await samples[0].future] if len(samples) == 1 else \
                await asyncio.gather(*(s.future for s in samples))
        except BaseException:  # a failed input, or the request was cancelled: the rest are not wanted
            for s in samples:
                s.future.cancel()
            raise
        check_finite(predictions)
        if predicted is not None:  # the SLO's bookkeeping: the wait the admission predicted, and the real one
            waited = max(s.finished for s in samples) - samples[0].submitted
            self.metrics.predicted_wait.labels(self.name).observe(predicted)
            self.metrics.wait.labels(self.name).observe(waited)
            self.metrics.slo.labels(self.name, "met" if time.monotonic() - start <= self.scheduler.slo
                                    else "missed").inc()
        for s in samples:
            self.metrics.queue_duration.labels(self.name).observe(s.started - s.submitted)
            self.metrics.inference_duration.labels(self.name).observe(s.finished - s.started)
        timings = Timings(
            tokenization=tokenized - start,
            queue=max(s.started - s.submitted for s in samples),
            inference=max(s.finished - s.started for s in samples),
            total=time.monotonic() - start,
        )
        return Outcome(list(predictions), [thresholds[0]] * len(samples), timings)

    def info(self) -> dict:
        cfg, s = self.config, self.settings
        return {
            "model": self.name, "task": cfg.task, "task_type": cfg.task_type, "labels": cfg.label_names,
            "num_layers": cfg.num_layers, "criterion": self.criterion.name,
            "default_threshold": self.default_threshold, "calibration": summary(cfg.calibration),
            "backend": {"name": self.backend.name, "quantize": self.backend.quantize,
                        "calibration_key": self.backend.calibration_key},
            "scheduler": {"policy": self.scheduler.policy.name, "slo_ms": s.slo_ms},
            "backbone": cfg.backbone, "strategy": cfg.strategy, "max_length": cfg.max_length,
            "pair_input": self.pair_input,
            "limits": {
                "max_inputs_per_request": s.max_inputs_per_request, "max_chars": s.max_chars,
                "max_body_bytes": s.max_body_bytes, "max_batch_size": s.max_batch_size,
                "max_batch_tokens": s.max_batch_tokens, "max_queue_size": s.max_queue_size,
                "request_timeout": s.request_timeout, "truncate": s.truncate,
            },
            "audits": {**self.audits.info(), "pending": self.scheduler.audits_pending},
        }
