"""`python -m exitserve.loadtest.reliability {overload,soak,shutdown,slow-clients,flood,tamper} [options]`:
see its __init__.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from exitserve.loadtest.reliability.flood import FLOOD_ADDRESS, flood
from exitserve.loadtest.reliability.scenarios import FIXTURE_TEXTS, Options, load_texts, overload, soak
from exitserve.loadtest.reliability.shutdown import shutdown
from exitserve.loadtest.reliability.slow_clients import slow_clients
from exitserve.loadtest.reliability.tamper import tamper


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m exitserve.loadtest.reliability", description=__doc__)
    parser.add_argument("run", choices=["overload", "soak", "shutdown", "slow-clients", "flood", "tamper"])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: the embedded model)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a server setting")
    parser.add_argument("--out", type=Path, default=Path("runs/reliability"),
                        help="where the JSON and PNG go (the server's log: runs/reliability)")
    parser.add_argument("--texts", type=Path, default=FIXTURE_TEXTS, help="TSV (first column) or one per line")
    parser.add_argument("--rate", type=float, help="the sustained rate (req/s); measured first when absent")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients to measure the rate")
    parser.add_argument("--measure-seconds", type=float, default=20)
    parser.add_argument("--factor", type=float, default=4.0, help="overload: offered / sustained rate")
    parser.add_argument("--seconds", type=float, nargs=3, default=[30, 60, 30], metavar=("BEFORE", "DURING", "AFTER"),
                        help="overload: phase lengths")
    parser.add_argument("--fraction", type=float, default=0.7, help="soak/shutdown: offered / sustained rate")
    parser.add_argument("--minutes", type=float, default=10, help="soak: duration")
    parser.add_argument("--count", type=int, default=300, help="slow-clients: connections of each kind")
    parser.add_argument("--idle", type=int, default=1000, help="flood: idle connections")
    parser.add_argument("--clients", type=int, default=4, help="flood: real clients")
    parser.add_argument("--flood-address", default=FLOOD_ADDRESS,
                        help="flood: where the idle connections come from (the real clients: 127.0.0.1)")
    parser.add_argument("--hold-seconds", type=float, default=45, help="slow-clients, flood: how long to keep them")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none", help="tamper: the graphs' weights")
    parser.add_argument("--note", default="", help="what else ran on the machine (goes into the JSON)")
    args = parser.parse_args(argv)
    if args.run == "tamper":
        from exitserve.server.settings import DEFAULT_MODEL

        tamper(args.checkpoint or DEFAULT_MODEL, load_texts(args.texts), args.out, args.quantize)
        return
    opts = Options(args.checkpoint, args.set, args.out, load_texts(args.texts), args.rate, args.concurrency,
                   args.measure_seconds, note=args.note)
    if args.run == "overload":
        overload(opts, args.factor, *args.seconds)
    elif args.run == "soak":
        soak(opts, args.fraction, args.minutes)
    elif args.run == "slow-clients":
        slow_clients(opts, args.count, args.hold_seconds)
    elif args.run == "flood":
        flood(opts, args.idle, args.hold_seconds, args.clients, args.flood_address)
    else:
        shutdown(opts, args.fraction)


if __name__ == "__main__":
    main()
