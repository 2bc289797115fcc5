"""`exitserve serve`: load (and validate) the checkpoints, then run the app on uvicorn.

The port is bound first (a port in use fails at once), then every model is loaded and self-tested
(models/self_test.py) before uvicorn starts, so a broken one stops start-up with a one-line reason
naming the model, exit code 2, and the server never answers at all. SIGHUP reloads every model from
its checkpoint directory in place (server/registry.py: validated and warmed up before the switch, the
old version drained; a checkpoint that cannot be served is refused and logged, the old one keeps
serving). uvicorn runs with the connection limits
of server/connections.py (slow heads, head size, number of connections) and `keep_alive_timeout`; the
CLI has already re-executed the process on jemalloc when it is installed (server/allocator.py).
On SIGTERM/SIGINT /ready turns 503 first; `drain_delay` seconds later (default 0: at once) uvicorn
stops accepting connections and finishes in-flight requests (up to `drain_timeout` seconds), then the
scheduler stops and the process exits. A second signal skips the delay.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from exitserve.server import allocator
from exitserve.server.app import create_app
from exitserve.server.connections import guarded_protocol
from exitserve.server.registry import ModelLoadError, ModelRegistry
from exitserve.server.service import PredictionService
from exitserve.server.settings import Settings

log = logging.getLogger("exitserve")


class DrainingServer(uvicorn.Server):
    """Marks the app as draining (so /ready answers 503) as soon as a stop signal arrives, and
    tells uvicorn to stop `drain_delay` seconds later, so that load balancers polling /ready take
    the instance out of rotation while it still accepts connections."""

    def __init__(self, config: uvicorn.Config, app_state, drain_delay: float = 0.0):
        super().__init__(config)
        self.app_state, self.drain_delay = app_state, drain_delay
        self.delayed: threading.Timer | None = None
        self.reloads: set[asyncio.Task] = set()

    async def serve(self, sockets=None) -> None:
        """uvicorn's, with SIGHUP reloading every model (only the main thread can take signals)."""
        loop = asyncio.get_running_loop()
        hup = hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread()
        if hup:
            loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            await super().serve(sockets)
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)

    def _reload(self) -> None:
        log.info("SIGHUP: reloading every model from its checkpoint")
        task = asyncio.ensure_future(self.app_state.models.reload_all())
        self.reloads.add(task)  # keep a reference until it is done
        task.add_done_callback(self.reloads.discard)

    def handle_exit(self, sig, frame) -> None:
        self.app_state.draining = True
        if self.drain_delay > 0 and self.delayed is None:
            log.info("draining: /ready answers 503; closing the listener in %.1f s", self.drain_delay)
            # uvicorn polls should_exit from its main loop, so setting it from a timer thread is safe
            self.delayed = threading.Timer(self.drain_delay, super().handle_exit, (sig, frame))
            self.delayed.daemon = True
            self.delayed.start()
            return
        if self.delayed is not None:
            self.delayed.cancel()  # a second signal: stop now
        super().handle_exit(sig, frame)


def listen(settings: Settings) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use fails at once, not after the
    model has loaded (uvicorn would find out only then)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def run(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = listen(settings)
    except OSError as exc:
        print(f"exitserve serve: cannot start: {exc}", file=sys.stderr)
        return 2
    with sock:
        return _serve(settings, sock)


def _serve(settings: Settings, sock: socket.socket) -> int:
    try:
        PredictionService.own_process(settings)
        models = ModelRegistry.load(settings)
    except ModelLoadError as exc:
        print(f"exitserve serve: cannot start: {exc}", file=sys.stderr)
        return 2
    log.info("allocator: %s", allocator.loaded() or "system malloc")
    for m in models.served.values():
        s = m.service
        log.info("loaded %s from %s (version %s; %s, %d layers, criterion %s, default threshold %s) on %s", m.name,
                 m.path, m.version, s.config.task, s.config.num_layers, s.criterion.name, s.default_threshold,
                 s.backend.name + ("" if s.backend.quantize == "none" else f" {s.backend.quantize}"))
    app = create_app(settings, models)
    refused = models.metrics.failures
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.drain_timeout) or None, timeout_keep_alive=settings.keep_alive_timeout,
        http=guarded_protocol(import_from_string(HTTP_PROTOCOLS[settings.http_protocol]), settings,
                              lambda reason: refused.labels(reason).inc()),
    )
    server = DrainingServer(config, app.state, settings.drain_delay)
    server.run(sockets=[sock])
    return 0 if server.started else 1
