"""What happens to requests when a Ray cluster changes under load: a node dies, a replica crashes,
the model is rolled over to a new checkpoint, the deployment autoscales, or it is overloaded. Each
runs on a fresh 3-node cluster in network namespaces (loadtest/cluster.py: head + 2 workers, 1 CPU
each) with steady closed-loop load on the head's proxy from the client namespace, every answer
checked (loadtest/cluster_load.py); it writes OUT/NAME.json and NAME.png and prints the numbers.
Needs root; one scenario at a time (they are CPU-heavy).

    python -m exitserve.loadtest.cluster_scenarios node-loss      [--fault node|partition|replica] [--no-retry]
    python -m exitserve.loadtest.cluster_scenarios rolling-update --checkpoint V1 --new-checkpoint V2
    python -m exitserve.loadtest.cluster_scenarios bad-update     --new-checkpoint DAMAGED [--surge 50]
    python -m exitserve.loadtest.cluster_scenarios autoscale      [--low 1] [--high 12]
    python -m exitserve.loadtest.cluster_scenarios overload       [--high 32]

node-loss: 2 replicas (at most one per node), then a fault on a worker node that runs one: `node`
SIGKILLs every process of the node (a power cut), `partition` unplugs its network (it runs on,
unreachable), `replica` SIGKILLs only the replica's process. Counts failed and wrong answers, when
Ray noticed, when 2 replicas ran again (healthy) and when throughput was back to 80 % of before.
`--no-retry` runs the proxies without exitserve's callback (server/ray_proxy.py): no retry of a
request whose replica died. rolling-update: 2 replicas, then `serve deploy` of the same config with
`--new-checkpoint` (and back, `--rounds`), max_surge_percent replicas started before old ones stop;
every answer must come from the old or the new model and match that model's own answer.
bad-update: the same with a damaged checkpoint: the deploy must fail and the old model keep serving.
autoscale: 1..3 replicas on queue depth (Ray's ongoing + queued requests per replica), a load step
from --low to --high clients and back; time to 3 replicas, back to 1, failures in each phase.
overload: 2 replicas with small limits (--max-ongoing, --max-queued) under --high clients: how many
are refused (429), how fast, and that nothing else fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
from collections.abc import Callable
from datetime import date
from pathlib import Path

from exitserve.loadtest import netns
from exitserve.loadtest.cluster import (
    SERVE_PORT,
    ClusterError,
    Condition,
    RayCluster,
    healthy,
    marked_processes,
    running,
    serve_config,
)
from exitserve.loadtest.cluster_load import (
    Answer,
    SteadyLoad,
    counts,
    expected_answers,
    latencies,
    plot_timeline,
    recovered_after,
    sentences,
)
from exitserve.server.ray_serve import PROXY_CALLBACK_ENV

REPLICA_SETTINGS = {"log_level": "warning"}  # no per-request access log: it costs CPU the replicas need


class Watch:
    """Ray's view of the application over time (on the load's clock), polled while the load runs."""

    def __init__(self, cluster: RayCluster, load: SteadyLoad):
        self.cluster, self.load, self.points = cluster, load, []

    def seen(self, status: str, replicas: list[dict]) -> None:
        # while an update rebuilds the application Ray lists no replicas at all: unknown, not zero
        known = bool(replicas) or status != "DEPLOYING"
        self.points.append((self.load.now(), status, len(running(replicas)) if known else None, len(replicas)))

    def until(self, seconds: float, condition: Condition | None = None, what: str = "") -> float | None:
        """Poll for `seconds`, or until `condition` holds: then the load's time when it did. A
        condition that never holds is an error."""
        if self.cluster.poll(seconds, condition, self.seen):
            return self.points[-1][0]
        if condition is not None:
            raise ClusterError(f"not within {seconds:g} s: {what} (last: {self.points[-1]})")
        return None

    def first(self, after: float, condition: Callable[[int, int], bool]) -> float | None:
        """The first time after `after` that (running, listed) replicas met `condition`: when Ray acted."""
        return next((t for t, _, n, listed in self.points if t >= after and n is not None and condition(n, listed)),
                    None)

    def replicas(self) -> list[tuple[float, int]]:
        return [(t, n) for t, _, n, _ in self.points if n is not None]


def since(t: float | None, event: float) -> float | None:
    return None if t is None else round(t - event, 1)


def start_load(cluster: RayCluster, expected: dict[str, list[dict]], clients: int, warmup: float,
               ) -> tuple[SteadyLoad, Watch]:
    load = SteadyLoad(cluster.hosts["client"].namespace, cluster.hosts["head"].address, SERVE_PORT, TEXTS,
                      expected, clients).start()
    watch = Watch(cluster, load)
    watch.until(warmup)
    return load, watch


def node_loss(cluster: RayCluster, args: argparse.Namespace) -> dict:
    name, want = expected_answers(args.checkpoint, TEXTS)
    cluster.deploy(serve_config(args.checkpoint, {"num_replicas": 2, "max_replicas_per_node": 1}, REPLICA_SETTINGS))
    cluster.wait_healthy(2)
    before = cluster.placement()
    victim = min(node for node in before.values() if node != "head")
    address, replica = cluster.hosts[victim].address, next(r for r, node in before.items() if node == victim)
    pid = next(r["pid"] for r in cluster.application()[1] if r["replica_id"] == replica)

    def gone(replicas: list[dict]) -> bool:
        if args.fault == "replica":
            return replica not in {r["replica_id"] for r in replicas}
        return all(r["node_ip"] != address for r in replicas)

    load, watch = start_load(cluster, {name: want}, args.clients, args.warmup)
    hit = load.now()
    if args.fault == "node":
        cluster.kill_node(victim)
    elif args.fault == "partition":
        cluster.cut_node(victim)
    else:
        os.kill(pid, signal.SIGKILL)
    noticed = watch.until(180, lambda _, rs: gone(running(rs)), "Ray notices")
    back = watch.until(240, lambda s, rs: healthy(s, rs, 2) and gone(rs), "2 replicas again")
    watch.until(args.after)
    answers = load.stop()
    baseline, recovered = recovered_after(answers, hit, baseline_from=2)
    failed_at = [a.done - hit for a in answers if a.verdict != "ok"]
    result = {
        "fault": args.fault, "retry": not args.no_retry, "victim_node": victim, "victim_replica": replica,
        "placement_before": before, "placement_after": cluster.placement(), **counts(answers),
        "ok_per_s_before": baseline, "ray_noticed_s": since(noticed, hit), "healthy_again_s": since(back, hit),
        "throughput_back_s": recovered,
        "failures_between_s": [round(min(failed_at), 2), round(max(failed_at), 2)] if failed_at else None,
        "slowest_answer_s": round(max(a.done - a.sent for a in answers), 2),
    }
    return finish(args, result, answers, {args.fault: hit, "healthy": back}, watch)


def rolling_update(cluster: RayCluster, args: argparse.Namespace) -> dict:
    models = [expected_answers(path, TEXTS) for path in (args.checkpoint, args.new_checkpoint)]
    if models[0][0] == models[1][0]:
        raise SystemExit(f"both checkpoints are named {models[0][0]!r}: name the directories by version")
    paths = [args.checkpoint, args.new_checkpoint]
    options = {"num_replicas": 2, "max_surge_percent": args.surge}
    cluster.deploy(serve_config(paths[0], options, REPLICA_SETTINGS))
    cluster.wait_healthy(2)
    load, watch = start_load(cluster, dict(models), args.clients, args.warmup)
    events, rounds = {}, []
    for k in range(1, args.rounds + 1):
        old = {r["replica_id"] for r in cluster.application()[1]}
        deployed = load.now()
        cluster.deploy(serve_config(paths[k % 2], options, REPLICA_SETTINGS))
        done = watch.until(300, lambda s, rs, old=old: healthy(s, rs, 2) and not old & {r["replica_id"] for r in rs},
                           f"round {k}: 2 new replicas")
        events |= {f"deploy {k}": deployed, f"done {k}": done}
        rounds.append({"round": k, "to": models[k % 2][0], "rollout_s": since(done, deployed)})
        watch.until(args.after)
    answers = load.stop()
    for r in rounds:
        start, end = events[f"deploy {r['round']}"], events[f"done {r['round']}"]
        r |= counts([a for a in answers if start <= a.sent <= end])
    result = {"surge_percent": args.surge, **counts(answers), "rounds": rounds}
    return finish(args, result, answers, events, watch)


def bad_update(cluster: RayCluster, args: argparse.Namespace) -> dict:
    name, want = expected_answers(args.checkpoint, TEXTS)
    options = {"num_replicas": 2, "max_surge_percent": args.surge}
    cluster.deploy(serve_config(args.checkpoint, options, REPLICA_SETTINGS))
    cluster.wait_healthy(2)
    load, watch = start_load(cluster, {name: want}, args.clients, args.warmup)
    deployed = load.now()
    cluster.deploy(serve_config(args.new_checkpoint, options, REPLICA_SETTINGS))
    refused = watch.until(600, lambda s, _: s == "DEPLOY_FAILED", "the deploy fails")
    watch.until(args.after)
    answers = load.stop()
    status, replicas = cluster.application()
    fewest = min((n for t, _, n, _ in watch.points if t >= deployed and n is not None), default=None)
    result = {"surge_percent": args.surge, **counts(answers), "deploy_failed_s": since(refused, deployed),
              "status_after": status, "running_after": len(running(replicas)), "fewest_running": fewest}
    return finish(args, result, answers, {"bad deploy": deployed, "failed": refused}, watch)


def autoscale(cluster: RayCluster, args: argparse.Namespace) -> dict:
    name, want = expected_answers(args.checkpoint, TEXTS)
    options = {"num_replicas": 1, "max_replicas": 3, "target_ongoing_requests": args.target,
               "max_ongoing_requests": args.max_ongoing, "upscale_delay_s": args.upscale_delay,
               "downscale_delay_s": args.downscale_delay, "look_back_period_s": args.look_back}
    cluster.deploy(serve_config(args.checkpoint, options, REPLICA_SETTINGS))
    cluster.wait_healthy(1)
    load, watch = start_load(cluster, {name: want}, args.low, args.warmup)
    up = load.now()
    load.clients_now(args.high)
    at3 = watch.until(300, lambda s, rs: healthy(s, rs, 3), "3 replicas")
    watch.until(args.after)
    down = load.now()
    load.clients_now(args.low)
    at1 = watch.until(args.downscale_delay + 300, lambda s, rs: healthy(s, rs, 1), "back to 1 replica")
    watch.until(args.after)
    answers = load.stop()
    phases = {"low": (0, up), "scaling up": (up, at3), "high, 3 replicas": (at3, down),
              "scaling down": (down, at1), "low again": (at1, load.now())}
    result = {**counts(answers), "scale_up_s": since(at3, up), "scale_down_s": since(at1, down),
              "up_decided_s": since(watch.first(up, lambda n, listed: listed > 1), up),  # new replicas listed
              "down_decided_s": since(watch.first(down, lambda n, listed: n < 3), down),  # one stopping
              "phases": {
        phase: {**counts([a for a in answers if a0 <= a.sent < a1]), "ok_per_s": round(sum(
            a.verdict == "ok" and a0 <= a.done < a1 for a in answers) / max(a1 - a0, 1e-9), 1)}
        for phase, (a0, a1) in phases.items()}}
    events = {f"{args.high} clients": up, "3 replicas": at3, f"{args.low} client(s)": down, "1 replica": at1}
    return finish(args, result, answers, events, watch)


def overload(cluster: RayCluster, args: argparse.Namespace) -> dict:
    name, want = expected_answers(args.checkpoint, TEXTS)
    limits = {"max_ongoing_requests": args.max_ongoing, "max_queued_requests": args.max_queued}
    cluster.deploy(serve_config(args.checkpoint, {"num_replicas": 2, **limits}, REPLICA_SETTINGS))
    cluster.wait_healthy(2)
    load, watch = start_load(cluster, {name: want}, args.high, args.warmup)
    watch.until(args.after)
    answers = load.stop()
    refused = [a for a in answers if a.status == 429]
    result = {"limits": limits, **counts(answers), "ok_ms": latencies([a for a in answers if a.verdict == "ok"]),
              "refused_ms": latencies(refused), "other_failures": sum(a.verdict != "ok" and a.status != 429
                                                                     for a in answers)}
    return finish(args, result, answers, {}, watch)


def finish(args: argparse.Namespace, result: dict, answers: list[Answer], events: dict, watch: Watch) -> dict:
    clients = args.high if args.scenario in ("autoscale", "overload") else args.clients
    plot_timeline(args.out / f"{args.name}.png", answers, events, watch.replicas(),
                  f"{args.name}: {args.checkpoint.name}, {clients} clients")
    return {"scenario": args.scenario, "date": str(date.today()),
            "machine": f"{platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
            "args": {k: str(v) for k, v in vars(args).items()}, **result, "ray_timeline": watch.points}


SCENARIOS = {"node-loss": node_loss, "rolling-update": rolling_update, "bad-update": bad_update,
             "autoscale": autoscale, "overload": overload}
TEXTS = sentences()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.cluster_scenarios", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--fault", choices=["node", "partition", "replica"], default="node", help="node-loss: what fails")
    p.add_argument("--no-retry", action="store_true", help="proxies without exitserve's callback (no retry)")
    p.add_argument("--node-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of every Ray node, e.g. RAY_health_check_timeout_ms=1000")
    p.add_argument("--checkpoint", type=Path, default=Path(__file__).parents[1] / "server" / "default_model")
    p.add_argument("--new-checkpoint", type=Path, help="rolling-update: the version rolled out; bad-update: a "
                   "damaged one")
    p.add_argument("--clients", type=int, default=4, help="closed-loop clients (node-loss, rolling-update)")
    p.add_argument("--warmup", type=float, default=15, help="seconds of load before the event")
    p.add_argument("--after", type=float, default=20, help="seconds of load after each event settled")
    p.add_argument("--rounds", type=int, default=2, help="rolling-update: deploys, alternating the checkpoints")
    p.add_argument("--surge", type=int, default=50, help="rolling-update: max_surge_percent")
    p.add_argument("--low", type=int, default=1, help="autoscale: clients before and after the step")
    p.add_argument("--high", type=int, default=12, help="autoscale: clients during the step")
    p.add_argument("--target", type=float, default=2, help="autoscale: target_ongoing_requests per replica")
    p.add_argument("--max-ongoing", type=int, default=4, help="autoscale, overload: max_ongoing_requests")
    p.add_argument("--max-queued", type=int, default=8, help="overload: max_queued_requests (at the proxy)")
    p.add_argument("--upscale-delay", type=float, default=5)
    p.add_argument("--downscale-delay", type=float, default=20)
    p.add_argument("--look-back", type=float, default=15, help="autoscale: look_back_period_s (> 10 s)")
    p.add_argument("--out", type=Path, default=Path("runs/cluster"))
    p.add_argument("--name", default=None, help="output file names (default: the scenario and its options)")
    args = p.parse_args(argv)
    if args.scenario in ("rolling-update", "bad-update") and args.new_checkpoint is None:
        p.error(f"{args.scenario} needs --new-checkpoint")
    fault = f"-{args.fault}" if args.scenario == "node-loss" else ""
    surge = f"-surge{args.surge}" if args.scenario == "bad-update" else ""
    args.name = args.name or f"{args.scenario}{fault}{surge}{'-no-retry' if args.no_retry else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    node_env = dict(item.split("=", 1) for item in args.node_env) | ({PROXY_CALLBACK_ENV: ""} if args.no_retry else {})
    with RayCluster(workers=2, extra_env=node_env) as cluster:
        report = SCENARIOS[args.scenario](cluster, args)
    report["root_listeners"] = cluster.watch.seen  # sampled every second while the cluster ran
    report["left_behind"] = marked_processes(cluster.tag) + [n for n in netns.ours() if n.startswith(cluster.tag)]
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("ray_timeline", "args")}, indent=1))
    if report["root_listeners"] or report["left_behind"]:
        raise SystemExit(f"Ray listened in the root namespace or was left behind: {report}")


if __name__ == "__main__":
    main()
