"""What every inference route does around the model, whatever its API (exitserve's /predict, TEI's,
the Open Inference Protocol's): check the inputs, take the named model (`serving`), run the request
raced against the client leaving (`run`), and write the answer's headers.

`serving` holds the model version a request started with until it is answered (a reload drains it
before stopping it: server/registry.py) and marks the request with the model's name, under which the
request guard counts its duration. `run` answers failures from the one error table (server/errors.py).
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from fastapi import Request

from exitserve.server.errors import MODEL_KEY, APIError, ClientGone, api_error
from exitserve.server.registry import ModelRegistry, ServedModel
from exitserve.server.service import Outcome, PredictionService

THRESHOLD_HEADER = "x-exit-threshold"  # a request's threshold for clients that cannot add a body field
# what a text may hold and still be empty: whitespace, control, format (zero-width), private-use and
# unassigned characters, combining marks with nothing to combine with (U+0301, U+FE0F) ...
INVISIBLE = frozenset(("Zs", "Zl", "Zp", "Cc", "Cf", "Co", "Cn", "Mn", "Me"))
# ... and characters drawn blank or meaning "nothing": Hangul fillers, the blank Braille pattern, the
# replacement character (tokenizers drop or map them to the unknown token; whatever else a tokenizer
# keeps nothing of is refused after tokenising: models/encoding.py)
BLANK = frozenset("\u115f\u1160\u2800\u3164\uffa0\ufffd")
T = TypeVar("T")


def models_of(request: Request) -> ModelRegistry:
    return request.app.state.models


async def require_json(request: Request) -> None:  # async: FastAPI runs sync ones in a thread
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise APIError.of("unsupported_media_type",
                          f"send the body as application/json (got {media or 'no content type'})")


@contextmanager
def serving(request: Request, name: str | None) -> Iterator[ServedModel]:
    """The model called `name` (None: the only one), ready, held until the block ends."""
    with models_of(request).lease(name) as model:
        if not model.service.ready:
            raise APIError.of("not_ready", "the model is not ready")
        request.scope["state"][MODEL_KEY] = model.name
        yield model


def header_threshold(request: Request) -> float | None:
    """The `x-exit-threshold` header's threshold (0..1), if sent."""
    raw = request.headers.get(THRESHOLD_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN too
        raise APIError.of("validation_error", f"{THRESHOLD_HEADER}: {raw[:40]!r} is not a number from 0 to 1")
    return value


async def _disconnected(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (Starlette's own pattern).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (its queued samples are then skipped
    by the scheduler and never computed) and raise ClientGone. One watcher task, which cancels this
    request's own task when the client goes (cheaper than racing two tasks with asyncio.wait)."""
    handler, gone = asyncio.current_task(), asyncio.Event()

    async def watch() -> None:
        await _disconnected(request)
        gone.set()
        handler.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone.is_set():
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


async def run(request: Request, model: ServedModel, texts: list[str], pairs: list[str] | None, *,
              threshold: float | None = None, trace: bool = False, truncate: bool | None = None) -> Outcome:
    """`model` answers `texts`; every failure becomes the error table's APIError."""
    try:
        return await unless_client_leaves(request, model.service.predict(
            texts, pairs=pairs, threshold=threshold, trace=trace, truncate=truncate))
    except Exception as exc:  # answered from the one error table (server/errors.py)
        raise api_error(exc) from exc


def answer_headers(outcome: Outcome, model: ServedModel) -> dict[str, str]:
    """The timing headers (ms, TEI's names) and which model version answered."""
    t = outcome.timings
    return {
        "x-total-time": f"{t.total * 1000:.3f}", "x-tokenization-time": f"{t.tokenization * 1000:.3f}",
        "x-queue-time": f"{t.queue * 1000:.3f}", "x-inference-time": f"{t.inference * 1000:.3f}",
        "x-model": model.name, "x-model-version": model.version,
    }


def blank(text: str) -> bool:
    """True for a text with nothing in it to read: only whitespace, control characters (NUL included),
    format characters (zero-width space, BOM, ...), lone combining marks or blank-looking characters."""
    return all(c in BLANK or unicodedata.category(c) in INVISIBLE for c in text)  # stops at the first visible one


def check_inputs(service: PredictionService, texts: list[str], pairs: list[str] | None,
                 where: tuple[str, str] = ("text", "text_pair"), single: bool = False) -> None:
    """Refuse (422) what the model cannot take: no input, too many, pairs for a single-text model or
    the reverse, a text too long, empty or not valid Unicode. `where` names the two fields in messages;
    `single`: one input, named without an index."""
    settings = service.settings
    if not texts:
        raise APIError.of("validation_error", f"{where[0]}: give at least one text")
    if len(texts) > settings.max_inputs_per_request:
        raise APIError.of("validation_error",
                          f"{where[0]}: {len(texts)} inputs; at most {settings.max_inputs_per_request} per request")
    if pairs is not None and not service.pair_input:
        raise APIError.of("validation_error", f"{where[1]}: this model takes single texts, not pairs")
    if pairs is None and service.pair_input:
        raise APIError.of("validation_error", f"{where[1]}: this model scores pairs; give {where[1]}")
    for field, values in ((where[0], texts), (where[1], pairs or [])):
        for i, value in enumerate(values):
            at = field if single else f"{field}[{i}]"
            if len(value) > settings.max_chars:
                raise APIError.of("validation_error", f"{at}: {len(value)} characters; at most {settings.max_chars}")
            if blank(value):
                raise APIError.of("validation_error", f"{at}: empty text (nothing but whitespace, control, "
                              "zero-width, combining or blank characters)")
            if not value.isascii():
                try:
                    value.encode()
                except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800" in the JSON
                    raise APIError.of("validation_error", f"{at}: not valid Unicode ({exc.reason})") from exc
