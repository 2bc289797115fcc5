"""A real multi-node Ray cluster on this machine (loadtest/cluster.py): a head and two workers, each
its own `ray start` in its own network namespace with 1 CPU, the load in a client namespace. Two
replicas on two nodes answer like the plain server; SIGKILL of a worker node under load costs no
more than 1 % of requests and Ray starts a replacement elsewhere; nothing of Ray's listens in the
root namespace at any point (sampled every second), and nothing is left afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install '.[ray]')")

from exitserve.loadtest import netns
from exitserve.loadtest.cluster import (
    MARKER,
    SERVE_PORT,
    RayCluster,
    healthy,
    marked_processes,
    root_listeners,
    running,
    serve_config,
)
from exitserve.loadtest.cluster_load import SteadyLoad, counts, expected_answers, sentences

UNAVAILABLE = netns.available()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


@pytest.mark.timeout(360)
def test_multinode_cluster_spreads_replicas_survives_a_node_and_leaves_nothing(tiny_checkpoint):
    texts = sentences(32)
    model, want = expected_answers(tiny_checkpoint, texts)  # also builds the ONNX graphs the replicas load
    cluster = RayCluster(workers=2)
    with cluster:
        assert cluster.alive_nodes() == sorted(cluster.hosts[n].address for n in ("head", "w1", "w2"))
        cluster.deploy(serve_config(tiny_checkpoint, {"num_replicas": 2, "max_replicas_per_node": 1},
                                    {"log_level": "warning"}))
        cluster.wait_healthy(2)
        before = cluster.placement()
        assert len(set(before.values())) == 2, before  # two nodes, found by where the processes live

        load = SteadyLoad(cluster.hosts["client"].namespace, cluster.hosts["head"].address, SERVE_PORT, texts,
                          {model: want}, clients=2).start()
        cluster.poll(4)
        steady = list(load.answers)
        assert steady and counts(steady)["ok"] == len(steady), counts(steady)  # every answer right
        assert {a.replica for a in steady} == set(before)  # both replicas serve through the head's proxy

        victim = min(node for node in before.values() if node != "head")
        address = cluster.hosts[victim].address
        cluster.kill_node(victim)
        assert cluster.poll(120, lambda s, rs: healthy(s, rs, 2) and all(r["node_ip"] != address for r in rs))
        after = cluster.placement()
        cluster.poll(3)
        answers = load.stop()
        assert victim not in after.values() and len(set(after.values())) == 2, after
        summary = counts(answers)
        assert summary["wrong"] == 0 and summary["failed"] <= 0.01 * summary["requests"], summary
        replacement = set(after) - set(before)
        assert replacement and replacement & {a.replica for a in answers if a.verdict == "ok"}
        assert len(running(cluster.application()[1])) == 2

    assert cluster.watch.samples >= 10 and cluster.watch.seen == []
    assert marked_processes(cluster.tag) == []
    assert not [name for name in netns.ours() if name.startswith(cluster.tag)]
    assert not cluster.dir.exists()


def test_the_root_namespace_check_sees_a_marked_listener_and_nothing_else():
    """The check the cluster relies on can fail: a marked process listening in the root namespace (on
    loopback, to stay harmless) is found, with its address; the same process unmarked is not."""
    listen = ("import socket, time; s = socket.create_server(('127.0.0.1', 0)); "
              "print(s.getsockname()[1], flush=True); time.sleep(60)")
    for marked in (True, False):
        env = {**os.environ, **({MARKER: "exs-probe"} if marked else {})}
        proc = subprocess.Popen([sys.executable, "-c", listen], env=env, stdout=subprocess.PIPE, text=True)
        try:
            port = proc.stdout.readline().strip()
            found = root_listeners("exs-probe")
            assert [f"127.0.0.1:{port}" in line for line in found] == ([True] if marked else [])
            assert (marked_processes("exs-probe") == [proc.pid]) == marked
        finally:
            proc.kill()
            proc.wait()
