"""`exitserve serve`: load (and validate) the checkpoint, then run the app on uvicorn.

The port is bound first (a port in use fails at once), then the checkpoint is loaded and self-tested
(models/self_test.py) before uvicorn starts, so a broken one stops start-up with a one-line reason
and exit code 2 and the server never answers at all. uvicorn runs with the connection limits
of server/connections.py (slow heads, head size, number of connections) and `keep_alive_timeout`; the
CLI has already re-executed the process on jemalloc when it is installed (server/allocator.py).
On SIGTERM/SIGINT /ready turns 503 first; `drain_delay` seconds later (default 0: at once) uvicorn
stops accepting connections and finishes in-flight requests (up to `drain_timeout` seconds), then the
scheduler stops and the process exits. A second signal skips the delay.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from exitserve.models.backbones import BackboneError
from exitserve.models.backends.onnx_store import OnnxStoreError
from exitserve.models.checkpoint import CheckpointError
from exitserve.server import allocator
from exitserve.server.app import create_app
from exitserve.server.connections import guarded_protocol
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
        service = PredictionService.load(settings)
    except (CheckpointError, BackboneError, OnnxStoreError, ValueError) as exc:
        print(f"exitserve serve: cannot start: {exc}", file=sys.stderr)
        return 2
    log.info("allocator: %s", allocator.loaded() or "system malloc")
    log.info("loaded %s (%s, %d layers, criterion %s, default threshold %s) on %s", settings.checkpoint,
             service.config.task, service.config.num_layers, service.criterion.name, service.default_threshold,
             service.backend.name + ("" if service.backend.quantize == "none" else f" {service.backend.quantize}"))
    app = create_app(settings, service)
    refused = service.metrics.failures
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.drain_timeout) or None, timeout_keep_alive=settings.keep_alive_timeout,
        http=guarded_protocol(import_from_string(HTTP_PROTOCOLS[settings.http_protocol]), settings,
                              lambda reason: refused.labels(reason).inc()),
    )
    server = DrainingServer(config, app.state, settings.drain_delay)
    server.run(sockets=[sock])
    return 0 if server.started else 1
