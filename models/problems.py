"""One line out of a pydantic ValidationError, for the messages a user reads: a checkpoint's exit
config (models/checkpoint.py) and the server's settings (server/settings.py)."""

from __future__ import annotations

from pydantic import ValidationError


def first_problem(exc: ValidationError) -> str:
    """One line naming the field: "num_layers: Input should be a valid integer (got '6')"."""
    errors = exc.errors()
    if not errors[0]["loc"]:  # a check of the whole object
        return str(errors[0]["msg"]).removeprefix("Value error, ")
    field_errors = [e for e in errors if e["loc"][0] == errors[0]["loc"][0]]
    err = max(field_errors, key=lambda e: len(e["loc"]))  # in a union: the member that got furthest
    loc = err["loc"]  # the field, then list indices (and, inside a union, the member tried: left out)
    where = str(loc[0]) + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
    if err["type"] == "literal_error":
        return f"unknown {where} {err['input']!r} (expected {err['ctx']['expected']})"
    if err["type"] == "missing":
        return f"{where}: missing"
    got = repr(err["input"])
    message = str(err["msg"]).removeprefix("Value error, ")  # what a validator raised
    return f"{where}: {message} (got {got if len(got) <= 60 else got[:57] + '...'})"
