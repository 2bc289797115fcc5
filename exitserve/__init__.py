"""exitserve: early-exit (BERxiT) inference for transformer encoders.

The installed namespace maps the repository's folders: `exitserve.models` (models/, the library),
`exitserve.server` (server/, the HTTP service), `exitserve.loadtest` (loadtest/), `exitserve.experiments`
(experiments/), and `exitserve.cli` (this folder), the command line above both library and server.
"""
