"""The server under test: an `exitserve serve` process on 127.0.0.1 whose resident memory and CPU
time (and the load generator's CPU time: it shares the machine) are sampled."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

from exitserve.loadtest.servers import exitserve_command, free_port, wait_ready

HOST = "127.0.0.1"  # loopback only, always (exitserve_command binds the server there)


class ServerProcess:
    """`with ServerProcess(...) as server:` starts the server, waits for /ready and, every `every`
    seconds until the block ends, appends to `server.samples`: (seconds since ready, server RSS
    bytes, server CPU seconds, this process's CPU seconds)."""

    def __init__(self, checkpoint: Path | None, settings: list[str], log: Path, every: float = 0.5):
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.command = exitserve_command(checkpoint, self.port, *settings)
        self.log_path, self.every = log, every
        self.samples: list[tuple[float, int, float, float]] = []
        self._stop = threading.Event()
        self.started = 0.0

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        try:
            self._wait_ready()
        except BaseException:  # never leave a server behind that did not become ready
            self.__exit__()
            raise
        self.started = time.monotonic()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def _wait_ready(self, timeout: float = 180) -> None:
        try:
            wait_ready(self.base, self.proc, timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}; see {self.log_path}") from exc

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.every):
            try:
                with self.ps.oneshot():
                    rss, cpu = self.rss(), sum(self.ps.cpu_times()[:2])
            except psutil.NoSuchProcess:
                return
            self.samples.append((time.monotonic() - self.started, rss, cpu, sum(me.cpu_times()[:2])))

    def terminate(self) -> float:
        """Send SIGTERM; returns when it was sent (time.monotonic())."""
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()
