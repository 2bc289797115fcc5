"""The served models by name: load them, look one up for a request, reload one in place.

Every API addresses a model by name (/predict's `model` field, /info?model=, TEI's /models/{name}, the
Open Inference Protocol's /v2/models/{name}); while one model is served the name may be left out. Each
model is a `PredictionService` of its own: its checkpoint, runtime backend, scheduler (worker thread)
and metrics (label `model="name"`).

Start-up and reload load a model with the same function, `load_model`, and start it the same way
(warm-up, before it takes traffic): whatever validation start-up does, a reload does too. A reload
loads and starts the new version beside the old one, which keeps serving meanwhile; only then is it
switched in, with one assignment on the event loop. A request holds the version it started with
(`lease`) until it is answered, so the old version drains (every request that took it finishes on it)
and only then stops. A checkpoint that fails to load or start is refused, and the old version keeps
serving. Reloads run one at a time.

CPU threads: in `exitserve serve` every ONNX Runtime session of every model runs on ONE process-wide
pool of `ort_threads` threads (default: one per core; models/backends/onnx_backend.py), so models busy
at the same time share the cores instead of oversubscribing them. Where no such pool exists (an app
built in-process, as tests do), each model's sessions get an equal share of the cores (at least one).
torch's intra-op pool (`torch_threads`) is one per process, shared by every model on the torch backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from exitserve.models.backends.onnx_store import OnnxStoreError
from exitserve.models.exit_config import EXIT_CONFIG, WEIGHTS, BackboneError, CheckpointError
from exitserve.server.metrics import ServerMetrics
from exitserve.server.service import PredictionService
from exitserve.server.settings import Settings

log = logging.getLogger("exitserve")

LOAD_ERRORS = (CheckpointError, BackboneError, OnnxStoreError, ValueError, OSError)  # a refused checkpoint
VERSION_FILES = (EXIT_CONFIG, "config.json", WEIGHTS)  # what a model answers with: its version


class UnknownModel(LookupError):
    """No served model has that name."""


class ModelNotNamed(ValueError):
    """Several models are served and the request named none."""


class ModelLoadError(CheckpointError):
    """A model's checkpoint cannot be served; the message names the model and says why, in one line."""


@dataclass(eq=False)
class ServedModel:
    """One served model: its name, where its checkpoint is, the checkpoint's version and its service."""

    name: str
    path: Path
    version: str
    service: PredictionService
    leases: int = 0  # requests using this version now
    drained: asyncio.Event | None = None  # set once replaced and no request holds it any more


def model_version(path: Path) -> str:
    """The checkpoint's version: the first 12 hex digits of the sha256 of its exit config, backbone config
    and weights. A recalibrated threshold is a new version; the same files copied elsewhere are not."""
    digest = hashlib.sha256()
    for name in VERSION_FILES:
        with open(path / name, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def threads_per_model(settings: Settings, count: int) -> int | None:
    """ONNX Runtime intra-op threads for each of `count` models (None: ORT's own choice, one per core)."""
    if settings.ort_threads is not None or count == 1:
        return settings.ort_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // count)


def model_paths(settings: Settings) -> dict[str, Path]:
    """Name -> checkpoint of every model to serve: `models`, or `checkpoint` under its directory's name."""
    return dict(settings.models) or {settings.checkpoint.name: settings.checkpoint}


def load_model(name: str, path: Path, settings: Settings, threads: int | None) -> ServedModel:
    """Load and validate one model (start-up and reload alike); ModelLoadError names it and says why. A
    symbolic link is resolved once, so a link switched to another directory meanwhile cannot mix files
    of two versions."""
    source = path.resolve()
    try:
        service = PredictionService.load(settings.model_copy(update={"checkpoint": source, "ort_threads": threads}),
                                         name)
        version = model_version(source)
    except LOAD_ERRORS as exc:
        raise ModelLoadError(f"model {name!r} ({path}): {exc}") from exc
    return ServedModel(name, path, version, service)


class ModelRegistry:
    """The served models (see the module docstring) and the server's metrics, which collect theirs."""

    def __init__(self, settings: Settings, models: list[ServedModel] | None = None):
        self.settings = settings
        self.served: dict[str, ServedModel] = {}
        self.metrics = ServerMetrics(lambda: [m.service.metrics for m in self.served.values()])
        self.threads = threads_per_model(settings, len(model_paths(settings)))
        self._reloading: asyncio.Lock | None = None
        for model in models or ():
            self._add(model)

    @classmethod
    def of(cls, settings: Settings, service: PredictionService) -> ModelRegistry:
        """One model already loaded (Ray Serve replicas and tests load their service themselves)."""
        path = service.path
        return cls(settings, [ServedModel(service.name, path, model_version(path), service)])

    @classmethod
    def load(cls, settings: Settings) -> ModelRegistry:
        registry = cls(settings)
        registry.load_all()
        return registry

    def load_all(self) -> None:
        """Load every model of the settings; the first that fails stops it (ModelLoadError)."""
        for name, path in model_paths(self.settings).items():
            self._add(load_model(name, path, self.settings, self.threads))

    def _add(self, model: ServedModel) -> None:
        self.served[model.name] = model
        self.metrics.serving(model.name, model.version)

    @property
    def names(self) -> list[str]:
        return list(self.served)

    @property
    def ready(self) -> bool:
        return bool(self.served) and all(m.service.ready for m in self.served.values())

    def sole(self) -> PredictionService | None:
        """The service of the only model, or None while several (or none) are served."""
        return next(iter(self.served.values())).service if len(self.served) == 1 else None

    def get(self, name: str | None = None) -> ServedModel:
        """The model called `name`; None names the only one (ModelNotNamed while several are served)."""
        if name is None:
            if len(self.served) != 1:
                raise ModelNotNamed(f"model: this server serves {', '.join(self.served)}; name one")
            return next(iter(self.served.values()))
        model = self.served.get(name)
        if model is None:
            raise UnknownModel(f"no model named {name!r}; served: {', '.join(self.served)}")
        return model

    @contextmanager
    def lease(self, name: str | None = None) -> Iterator[ServedModel]:
        """The model called `name`, held until the block ends: a reload waits for it before stopping it."""
        model = self.get(name)
        model.leases += 1
        try:
            yield model
        finally:
            model.leases -= 1
            if model.leases == 0 and model.drained is not None:
                model.drained.set()

    async def start(self) -> None:
        for model in self.served.values():
            await model.service.start()

    def stop(self) -> None:
        for model in self.served.values():
            model.service.stop()

    async def reload(self, name: str, path: str | Path | None = None) -> dict:
        """Load `path` (default: the model's own, re-read) as model `name`'s new version, start it, switch
        to it, then drain and stop the old one. ModelLoadError (the old version keeps serving) if it
        cannot be served; a checkpoint of the version already served there is left alone."""
        self._reloading = self._reloading or asyncio.Lock()
        async with self._reloading:
            old, started = self.get(name), time.monotonic()
            path = Path(path) if path is not None else old.path
            new = await self._start_new(name, path, old)
            outcome = {"model": name, "version": (new or old).version, "previous": old.version,
                       "changed": new is not None}
            if new is None:
                self.metrics.reloads.labels(name, "unchanged").inc()
            else:
                self.served[name] = new  # the switch: requests from here on take the new version
                self.metrics.serving(name, new.version, old.version)
                self.metrics.reloads.labels(name, "done").inc()
                log.info("model %s: now serving %s (version %s, was %s); draining the old version", name, path,
                         new.version, old.version)
                await self._retire(old)
                del old, new
                if self.settings.gc_freeze:  # the old version's stop() unfroze the heap: collect it, refreeze
                    gc.collect()
                    gc.freeze()
            return {**outcome, "seconds": round(time.monotonic() - started, 3)}

    async def _start_new(self, name: str, path: Path, old: ServedModel) -> ServedModel | None:
        """The new version loaded (in a thread: the event loop keeps serving) and started, or None when
        `path` holds the version already served there."""
        try:
            with contextlib.suppress(OSError):  # unreadable: loading it says why
                if path == old.path and await asyncio.to_thread(model_version, path.resolve()) == old.version:
                    return None
            new = await asyncio.to_thread(load_model, name, path, self.settings, self.threads)
        except Exception as exc:  # whatever fails (a missing file, a corrupt graph): refused, never switched in
            error = exc if isinstance(exc, ModelLoadError) else ModelLoadError(f"model {name!r} ({path}): {exc}")
            raise self._refusal(name, error) from exc
        try:
            await new.service.start()
        except Exception as exc:  # a warm-up (or load-time self-test) that fails: never switched in
            new.service.stop()
            raise self._refusal(name, ModelLoadError(f"model {name!r} ({path}) does not start: {exc}")) from exc
        return new

    def _refusal(self, name: str, error: ModelLoadError) -> ModelLoadError:
        self.metrics.reloads.labels(name, "refused").inc()
        log.error("reload refused, the old version keeps serving: %s", error)
        return error

    async def _retire(self, old: ServedModel) -> None:
        """Wait until no request holds `old` (at most `drain_timeout`), then stop it."""
        old.drained = asyncio.Event()
        if old.leases:
            try:
                await asyncio.wait_for(old.drained.wait(), self.settings.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("model %s: %d requests still on the old version after %.0f s; stopping it", old.name,
                            old.leases, self.settings.drain_timeout)
        await asyncio.to_thread(old.service.stop)  # it may wait for its worker: not on the event loop

    async def reload_all(self) -> None:
        """Reload every model from its own path (SIGHUP); a refused one is logged and keeps serving."""
        for name in self.names:
            with contextlib.suppress(ModelLoadError):  # logged as refused; the old version keeps serving
                await self.reload(name)
