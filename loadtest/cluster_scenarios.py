"""What happens to requests when a Ray cluster changes under load: a node dies, the model is rolled
over to a new checkpoint, the deployment autoscales. Each runs on a fresh 3-node cluster in network
namespaces (loadtest/cluster.py: head + 2 workers, 1 CPU each) with steady closed-loop load from the
client namespace (loadtest/cluster_load.py), and writes OUT/<scenario>.json and .png and prints a
table. Needs root; one scenario at a time (they are CPU-heavy).

    python -m exitserve.loadtest.cluster_scenarios node-loss      [--checkpoint DIR] [--clients 4]
    python -m exitserve.loadtest.cluster_scenarios rolling-update --new-checkpoint DIR [--rounds 2]
    python -m exitserve.loadtest.cluster_scenarios autoscale      [--high 12]

node-loss: 2 replicas (at most one per node), SIGKILL of every process of a worker node that runs
one; counts failed and wrong answers, when Ray noticed, when 2 replicas ran again (the
deployment healthy) and when throughput was back to 80 % of the rate before.
rolling-update: 2 replicas, then `serve deploy` of the same config with `--new-checkpoint` (and back
again, `--rounds`), with max_surge_percent replicas started before old ones stop; every answer must
come from the old or the new model and match that model's own answer.
autoscale: 1..3 replicas on queue depth (Ray's ongoing + queued requests per replica), a load step
from --low to --high clients and back; time to 3 replicas, time back to 1, failures in each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    plot_timeline,
    recovered_after,
    sentences,
)

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

    def replicas(self) -> list[tuple[float, int]]:
        return [(t, n) for t, _, n, _ in self.points if n is not None]


def since(t: float | None, event: float) -> float | None:
    return None if t is None else round(t - event, 1)


def node_loss(cluster: RayCluster, args: argparse.Namespace) -> dict:
    texts = sentences()
    name, want = expected_answers(args.checkpoint, texts)
    cluster.deploy(serve_config(args.checkpoint, {"num_replicas": 2, "max_replicas_per_node": 1}, REPLICA_SETTINGS))
    cluster.wait_healthy(2)
    before = cluster.placement()
    victim = min(node for node in before.values() if node != "head")
    address = cluster.hosts[victim].address
    load = SteadyLoad(cluster.hosts["client"].namespace, cluster.hosts["head"].address, SERVE_PORT, texts,
                      {name: want}, args.clients).start()
    watch = Watch(cluster, load)
    watch.until(args.warmup)
    killed = load.now()
    cluster.kill_node(victim)
    noticed = watch.until(120, lambda _, rs: all(r["node_ip"] != address for r in running(rs)), "Ray notices")
    back = watch.until(180, lambda s, rs: healthy(s, rs, 2) and all(r["node_ip"] != address for r in rs),
                       "2 replicas again")
    watch.until(args.after)
    answers = load.stop()
    baseline, recovered = recovered_after(answers, killed, baseline_from=2)
    failed_at = [a.done - killed for a in answers if a.verdict != "ok"]
    result = {
        "killed_node": victim, "placement_before": before, "placement_after": cluster.placement(),
        **counts(answers), "ok_per_s_before": baseline,
        "ray_noticed_s": since(noticed, killed), "healthy_again_s": since(back, killed),
        "throughput_back_s": recovered,
        "failures_between_s": [round(min(failed_at), 2), round(max(failed_at), 2)] if failed_at else None,
    }
    return finish("node-loss", args, result, answers, {"kill": killed, "healthy": back}, watch)


def rolling_update(cluster: RayCluster, args: argparse.Namespace) -> dict:
    texts = sentences()
    models = [expected_answers(path, texts) for path in (args.checkpoint, args.new_checkpoint)]
    if models[0][0] == models[1][0]:
        raise SystemExit(f"both checkpoints are named {models[0][0]!r}: name the directories by version")
    paths = [args.checkpoint, args.new_checkpoint]
    options = {"num_replicas": 2, "max_surge_percent": args.surge}
    cluster.deploy(serve_config(paths[0], options, REPLICA_SETTINGS))
    cluster.wait_healthy(2)
    load = SteadyLoad(cluster.hosts["client"].namespace, cluster.hosts["head"].address, SERVE_PORT, texts,
                      dict(models), args.clients).start()
    watch = Watch(cluster, load)
    watch.until(args.warmup)
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
    return finish("rolling-update", args, result, answers, events, watch)


def autoscale(cluster: RayCluster, args: argparse.Namespace) -> dict:
    texts = sentences()
    name, want = expected_answers(args.checkpoint, texts)
    options = {"num_replicas": 1, "max_replicas": 3, "target_ongoing_requests": args.target,
               "max_ongoing_requests": args.max_ongoing, "upscale_delay_s": args.upscale_delay,
               "downscale_delay_s": args.downscale_delay, "look_back_period_s": args.look_back}
    cluster.deploy(serve_config(args.checkpoint, options, REPLICA_SETTINGS))
    cluster.wait_healthy(1)
    load = SteadyLoad(cluster.hosts["client"].namespace, cluster.hosts["head"].address, SERVE_PORT, texts,
                      {name: want}, args.low).start()
    watch = Watch(cluster, load)
    watch.until(args.warmup)
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
    result = {**counts(answers), "scale_up_s": since(at3, up), "scale_down_s": since(at1, down), "phases": {
        phase: {**counts([a for a in answers if a0 <= a.sent < a1]), "ok_per_s": round(sum(
            a.verdict == "ok" and a0 <= a.done < a1 for a in answers) / max(a1 - a0, 1e-9), 1)}
        for phase, (a0, a1) in phases.items()}}
    events = {f"{args.high} clients": up, "3 replicas": at3, f"{args.low} client(s)": down, "1 replica": at1}
    return finish("autoscale", args, result, answers, events, watch)


def finish(scenario: str, args: argparse.Namespace, result: dict, answers: list[Answer], events: dict,
           watch: Watch) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    header = {"scenario": scenario, "date": str(date.today()), "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
              "args": {k: str(v) for k, v in vars(args).items() if k != "run"}}
    plot_timeline(args.out / f"{scenario}.png", answers, events, watch.replicas(),
                  f"{scenario}: {args.checkpoint}, {args.clients if scenario != 'autoscale' else args.high} clients")
    return {**header, **result, "ray_timeline": watch.points}


SCENARIOS = {"node-loss": node_loss, "rolling-update": rolling_update, "autoscale": autoscale}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.cluster_scenarios", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--checkpoint", type=Path, default=Path(__file__).parents[1] / "server" / "default_model")
    p.add_argument("--new-checkpoint", type=Path, help="rolling-update: the version rolled out")
    p.add_argument("--clients", type=int, default=4, help="closed-loop clients (node-loss, rolling-update)")
    p.add_argument("--warmup", type=float, default=15, help="seconds of load before the event")
    p.add_argument("--after", type=float, default=20, help="seconds of load after each event settled")
    p.add_argument("--rounds", type=int, default=2, help="rolling-update: deploys, alternating the checkpoints")
    p.add_argument("--surge", type=int, default=50, help="rolling-update: max_surge_percent")
    p.add_argument("--low", type=int, default=1, help="autoscale: clients before and after the step")
    p.add_argument("--high", type=int, default=12, help="autoscale: clients during the step")
    p.add_argument("--target", type=float, default=2, help="autoscale: target_ongoing_requests per replica")
    p.add_argument("--max-ongoing", type=int, default=4, help="autoscale: max_ongoing_requests per replica")
    p.add_argument("--upscale-delay", type=float, default=5)
    p.add_argument("--downscale-delay", type=float, default=20)
    p.add_argument("--look-back", type=float, default=15, help="autoscale: look_back_period_s (> the 10 s push interval)")
    p.add_argument("--out", type=Path, default=Path("runs/cluster"))
    args = p.parse_args(argv)
    if args.scenario == "rolling-update" and args.new_checkpoint is None:
        p.error("rolling-update needs --new-checkpoint")
    with RayCluster(workers=2) as cluster:
        report = SCENARIOS[args.scenario](cluster, args)
    report["root_listeners"] = cluster.watch.seen  # sampled every second while the cluster ran
    report["left_behind"] = marked_processes(cluster.tag) + [n for n in netns.ours() if n.startswith(cluster.tag)]
    (args.out / f"{args.scenario}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("ray_timeline", "args")}, indent=1))
    if report["root_listeners"] or report["left_behind"]:
        raise SystemExit(f"Ray listened in the root namespace or was left behind: {report}")


if __name__ == "__main__":
    main()
