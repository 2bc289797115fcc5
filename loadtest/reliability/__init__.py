"""Reliability runs for exitserve: overload, soak and shutdown, each against a real `exitserve serve`
process that the run starts itself on 127.0.0.1 (loopback only; every phase is bounded in time and
in request count).

    python -m exitserve.loadtest.reliability overload   # ~4x the sustained rate, then back to normal
    python -m exitserve.loadtest.reliability soak       # ~70% of the sustained rate for 10 minutes
    python -m exitserve.loadtest.reliability shutdown   # SIGTERM under load
    python -m exitserve.loadtest.reliability slow-clients   # idle, trickling and stalled connections
    python -m exitserve.loadtest.reliability flood      # 1,000 idle connections while real clients ask
    python -m exitserve.loadtest.reliability tamper     # damaged tokenizers and graphs vs the self-test (in process)

Modules: `process` (the server process; its memory and CPU), `client` (a light open-loop HTTP
client and the request records), `report` (statistics, JSON, table, plot), `scenarios` (the runs),
`shutdown`, `slow_clients` (raw slow connections), `flood` (idle connections vs real clients), `tamper`
(damaged checkpoints, no server).
"""
