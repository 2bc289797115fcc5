"""A multi-node Ray cluster on one machine: the head and each worker a host of its own.

Every node is its own `ray start --block` inside its own network namespace (loadtest/netns.py) with
its own CPUs and address on a private bridge; a `client` namespace on the same bridge holds the
load and the operator commands (`serve deploy`, the dashboard's REST API). Nothing is started in
the root namespace, so nothing of Ray's can listen on the machine's real interfaces; `RootWatch`
checks that while the cluster runs (every process started here carries `MARKER=<tag>` in its
environment, which is also how `marked_processes` finds leftovers).

    with RayCluster(workers=2) as cluster:             # leftovers of crashed runs are removed first
        cluster.deploy(serve_config(checkpoint, {"num_replicas": 2}))
        cluster.wait_healthy(2)
        cluster.placement()                            # replica id -> the node its process runs on
        cluster.kill_node("w1")                        # SIGKILL every process of that node
    # every process killed, namespaces and files removed, even after an exception

Tokens: Ray 2.60's token authentication, with a fresh random token per cluster in the environment of
every node and command (nothing is written to ~/.ray).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from exitserve.loadtest import netns
from exitserve.server.ray_serve import APP_NAME, PROXY_CALLBACK, PROXY_CALLBACK_ENV

MARKER = "EXITSERVE_CLUSTER"
GCS_PORT, DASHBOARD_PORT, SERVE_PORT = 6379, 8265, 8000
DEPLOY_CONFIG = Path(__file__).parents[1] / "deploy" / "ray-serve.yaml"
BIN = Path(sys.executable).parent
Condition = Callable[[str, list[dict]], bool]  # (application status, replicas) -> done?


class ClusterError(RuntimeError):
    pass


def serve_config(checkpoint: str | Path, ray: dict[str, Any], settings: dict[str, Any] | None = None) -> dict:
    """deploy/ray-serve.yaml as a cluster runs it: proxies on every node's address, this checkpoint,
    these `args.ray` options and extra settings."""
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    config["http_options"] = {"host": "0.0.0.0", "port": SERVE_PORT}
    args = config["applications"][0]["args"]
    args["settings"] = {**args["settings"], "checkpoint": str(checkpoint), **(settings or {})}
    args["ray"] = {**args["ray"], **ray}
    return config


def marked_processes(tag: str) -> list[int]:
    """Processes whose environment carries MARKER=tag: what a cluster started and has not ended."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"{MARKER}={tag}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:  # gone meanwhile
                pass
    return found


def root_listeners(tag: str) -> list[str]:
    """Sockets listening (TCP) or bound (UDP) in the root namespace by processes marked with `tag`.
    They all live in the cluster's namespaces, so this must stay empty."""
    lines = subprocess.run(["ss", "-Hltunp"], capture_output=True, text=True, check=True).stdout.splitlines()
    found = []
    for line in lines:
        for pid in re.findall(r"pid=(\d+)", line):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"{MARKER}={tag}".encode() in environ:
                found.append(" ".join(line.split()))
    return found


class RootWatch:
    """Samples `root_listeners` every `period` seconds in a thread while the cluster runs."""

    def __init__(self, tag: str, period: float = 1.0):
        self.tag, self.period, self.seen, self.samples = tag, period, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="root-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def sample(self) -> None:
        self.seen += [line for line in root_listeners(self.tag) if line not in self.seen]
        self.samples += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.sample()

    def __enter__(self) -> RootWatch:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RayCluster:
    """A head and `workers` worker nodes of `num_cpus` CPUs each, plus a client namespace."""

    def __init__(self, workers: int = 2, num_cpus: float = 1, extra_env: dict[str, str] | None = None):
        self.workers = [f"w{i}" for i in range(1, workers + 1)]
        self.num_cpus = num_cpus
        self.network = netns.Network(["head", *self.workers, "client"])
        self.tag = self.network.tag
        self.hosts = self.network.hosts
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, MARKER: self.tag,
                    "RAY_USAGE_STATS_ENABLED": "0", PROXY_CALLBACK_ENV: PROXY_CALLBACK,
                    # all load enters at the head's proxy: let it spread requests over every replica
                    # instead of filling one on its own node first (Ray's default, right behind a load
                    # balancer over every node's proxy)
                    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0", **(extra_env or {})}
        self.dir: Path | None = None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.watch = RootWatch(self.tag)
        self.dashboard = f"http://{self.hosts['head'].address}:{DASHBOARD_PORT}"

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> RayCluster:
        netns.remove_leftovers()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir="/tmp"))  # short: Ray's socket paths
        try:
            self.network.create()
            self.watch.start()
            self.start_node("head")
            self.wait_nodes(1, timeout)
            for name in self.workers:
                self.start_node(name)
            self.wait_nodes(1 + len(self.workers), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, name: str) -> None:
        host = self.hosts[name]
        args = [str(BIN / "ray"), "start", "--block", "--node-ip-address", host.address, "--num-cpus",
                f"{self.num_cpus:g}", "--temp-dir", str(self.dir / name), "--disable-usage-stats"]
        if name == "head":
            args += ["--head", "--port", str(GCS_PORT), "--include-dashboard", "true", "--dashboard-host", "0.0.0.0",
                     "--dashboard-port", str(DASHBOARD_PORT)]
        else:
            args += ["--address", f"{self.hosts['head'].address}:{GCS_PORT}"]
        with (self.dir / f"{name}.log").open("a") as log:
            self.nodes[name] = subprocess.Popen(netns.command(host.namespace, args), stdout=log,
                                                stderr=subprocess.STDOUT, env=self.env)

    def kill_node(self, name: str) -> None:
        """What a power cut does to a node: every one of its processes gets SIGKILL at once."""
        netns.kill_all(self.hosts[name].namespace)
        self.nodes.pop(name).wait(10)

    def cut_node(self, name: str) -> None:
        """What a network partition does to a node: it runs on, unreachable."""
        self.network.cut(name)

    def stop(self) -> None:
        """Kill every node, remove the namespaces and Ray's files; safe after a failed start."""
        try:
            for name in [*self.workers, "head"]:
                if name in self.nodes:
                    self.kill_node(name)
        finally:
            self.network.remove()
            self.watch.stop()
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- operator commands, run from the client namespace ----------------------------------------
    def api(self, method: str, path: str, **kwargs) -> Any:
        """The head's dashboard REST API (what `serve status` and `serve deploy` use)."""
        with netns.entered(self.hosts["client"].namespace):
            r = httpx.request(method, f"{self.dashboard}{path}", timeout=30,
                              headers={"authorization": f"Bearer {self.token}"}, **kwargs)
        r.raise_for_status()
        return r.json() if r.content else None

    def run_client(self, argv: list[str], timeout: float = 120) -> str:
        """A command inside the client namespace with the cluster's token; its output, or ClusterError."""
        done = subprocess.run(netns.command(self.hosts["client"].namespace, argv), env=self.env, text=True,
                              capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        return done.stdout

    def deploy(self, config: dict) -> None:
        """`serve deploy` of a config (a new one rolls the application over to it)."""
        path = self.dir / f"serve-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.run_client([str(BIN / "serve"), "deploy", str(path), "--address", self.dashboard])

    def wait_nodes(self, count: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise ClusterError(f"node {name} exited ({proc.returncode}): {self.log(name)}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except httpx.HTTPError:
                pass  # the dashboard is not up yet
            time.sleep(1)
        raise ClusterError(f"fewer than {count} nodes alive after {timeout:g} s: {self.log('head')}")

    def alive_nodes(self) -> list[str]:
        nodes = self.api("GET", "/api/v0/nodes")["data"]["result"]["result"]
        return sorted(n["node_ip"] for n in nodes if n["state"] == "ALIVE")

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text()[-3000:]

    # -- the application ------------------------------------------------------------------------
    def application(self) -> tuple[str, list[dict]]:
        """Ray's view: the application's status and its replicas (id, state, node_ip, pid, ...)."""
        apps = self.api("GET", "/api/serve/applications/")["applications"]
        if APP_NAME not in apps:
            return "NOT_DEPLOYED", []
        app = apps[APP_NAME]
        return app["status"], [r for d in app["deployments"].values() for r in d["replicas"]]

    def poll(self, seconds: float, condition: Condition | None = None,
             seen: Callable[[str, list[dict]], None] | None = None) -> bool:
        """Ask Ray's view every half second for up to `seconds` (passing each answer to `seen`): True as
        soon as `condition(status, replicas)` holds, False when the time is up."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            status, replicas = self.application()
            if seen is not None:
                seen(status, replicas)
            if condition is not None and condition(status, replicas):
                return True
            time.sleep(0.5)
        return False

    def wait_healthy(self, replicas: int, timeout: float = 180) -> None:
        """Wait for exactly `replicas` running replicas and nothing else; a failed deployment is an error."""

        def done(status: str, found: list[dict]) -> bool:
            if status == "DEPLOY_FAILED":
                app = self.api("GET", "/api/serve/applications/")["applications"][APP_NAME]
                raise ClusterError(f"the deployment failed: {[d['message'] for d in app['deployments'].values()]}")
            return healthy(status, found, replicas)

        if not self.poll(timeout, done):
            raise ClusterError(f"not {replicas} healthy replicas after {timeout:g} s: {self.application()}")

    def placement(self) -> dict[str, str]:
        """Each running replica's node, found by which namespace holds its process; checked against the
        node address Ray reports for it."""
        members = {name: set(netns.pids(host.namespace)) for name, host in self.hosts.items()}
        found = {}
        for r in self.application()[1]:
            if r["state"] != "RUNNING":
                continue
            node = next((name for name, pids in members.items() if r["pid"] in pids), None)
            if node is None or self.hosts[node].address != r["node_ip"]:
                raise ClusterError(f"replica {r['replica_id']} (pid {r['pid']}, Ray says {r['node_ip']}) is in {node}")
            found[r["replica_id"]] = node
        return found


def running(replicas: list[dict]) -> list[dict]:
    return [r for r in replicas if r["state"] == "RUNNING"]


def healthy(status: str, replicas: list[dict], count: int) -> bool:
    """The application runs exactly `count` replicas, none starting or stopping."""
    return status == "RUNNING" and len(replicas) == count == len(running(replicas))
