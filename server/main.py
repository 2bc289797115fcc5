"""`exitserve serve`: load (and validate) the checkpoint, then run the app on uvicorn.

The checkpoint is loaded before uvicorn starts, so a broken one stops start-up with a one-line
reason and exit code 2 and the server never answers at all. On SIGTERM/SIGINT /ready turns 503
first, uvicorn stops accepting connections and finishes in-flight requests (up to
`drain_timeout` seconds), then the scheduler stops and the process exits.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from models.backbones import BackboneError
from models.checkpoint import CheckpointError
from server.app import create_app
from server.service import PredictionService
from server.settings import Settings

log = logging.getLogger("exitserve")


class DrainingServer(uvicorn.Server):
    """Marks the app as draining (so /ready answers 503) as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, app_state):
        super().__init__(config)
        self.app_state = app_state

    def handle_exit(self, sig, frame) -> None:
        self.app_state.draining = True
        super().handle_exit(sig, frame)


def run(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        service = PredictionService.load(settings)
    except (CheckpointError, BackboneError) as exc:
        print(f"exitserve serve: cannot start: {exc}", file=sys.stderr)
        return 2
    log.info("loaded %s (%s, %d layers, criterion %s, default threshold %s)", settings.checkpoint,
             service.config.task, service.config.num_layers, service.criterion.name, service.config.default_threshold)
    app = create_app(settings, service)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout) or None,
    )
    server = DrainingServer(config, app.state)
    server.run()
    return 0 if server.started else 1
