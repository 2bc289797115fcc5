"""The self-test at load: before a server answers anything, the tokenizer and the runtime it will
serve on must reproduce the checkpoint's canaries (models/canaries.py), or start-up is refused with
one line naming the first part that differs.

- tokenizer: its vocabulary must be the recorded one (size and fingerprint: a reordered vocabulary, or
  two words swapped, fail it) and every canary must encode to the recorded token ids (a tokenizer that
  stopped lowercasing, or strips accents it did not strip, fails it);
- the backend (torch, ONNX Runtime fp32 or int8: only the `Backend` seam is used) runs the recorded
  token ids through every layer and exit: the embeddings' and every layer's hidden-state summary, and
  every exit's logits and LTE confidence, must lie within the tolerance of the record. The first that
  does not names the part: `embeddings`, `layer k` (its hidden states differ) or `exit k` (layer k
  agrees, its exit does not); a part that raises is named the same way.

The record is the torch model's for torch and fp32 ONNX Runtime (they agree to ~1e-6 of the spread),
and its own for a variant whose values differ from torch's (int8: recorded from graphs built afresh;
int8 moves the hidden states by up to ~0.9 of the spread on the default model, as far as a swapped
layer does, so no tolerance against torch's values could tell them apart). The tolerance is a
fraction of how far apart the canaries' own values lie at that layer (their spread, recorded with
them), so it follows each model's scale; docs/RELIABILITY.md has the measured figures. An exit
answers from its logits, so logits within the tolerance also mean the same exit layer, except for an
input whose confidence lies within that tolerance of the threshold;
- a backend that runs whole batches its own way (ONNX Runtime's composed early-exit graph,
  `early_exit.onnx`) must then exit where its layer-level calls do, with the same answers, at
  thresholds 0 (every canary leaves at exit 1), the served default and 1: the part named is
  `the early-exit graph`.

`verified` is the one place a server calls this (models/served.py `load_served`, which every server
path loads through): it runs the self-test on the backend just opened, and when ONNX graphs fail it
has them rebuilt from the checkpoint and tests again (a graph swapped or taken from another model is
never served, whatever its manifest says). Nothing here imports torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exitserve.models.backends.base import Backend, run_layers
from exitserve.models.bounded_files import file_sha256
from exitserve.models.canaries import (
    CANARIES,
    Canaries,
    CanaryFileError,
    Encoder,
    Outputs,
    PartFailed,
    outputs,
    read,
)
from exitserve.models.canaries import vocab_fingerprint as fingerprint
from exitserve.models.criteria import ExitCriterion
from exitserve.models.encoding import TextEncoder
from exitserve.models.exit_config import WEIGHTS, CheckpointError

log = logging.getLogger("exitserve")

# Largest allowed difference, as a fraction of the canaries' spread at that layer: against the torch
# reference (torch itself, fp32 ONNX Runtime: they agree to ~1e-6 of it), and against a variant's own
# record (int8: the same graphs give the same values on one machine; the allowance covers other CPUs'
# int8 kernels and is a quarter of what one wrong layer or exit moved: docs/RELIABILITY.md).
TOLERANCE_REFERENCE = 1e-3
TOLERANCE_VARIANT = 0.25
FLOOR = 1e-6  # absolute: spreads this small (a constant exit) are compared as if they were this large


class SelfTestFailed(CheckpointError):
    """The tokenizer or the runtime does not reproduce the canaries: one line names the part."""


@dataclass(frozen=True)
class Mismatch:
    part: str  # tokenizer | embeddings | layer k | exit k (1-based)
    detail: str

    @property
    def in_runtime(self) -> bool:
        """Whether rebuilding the runtime's graphs could help (not for the tokenizer)."""
        return self.part != "tokenizer"

    def __str__(self) -> str:
        return f"{self.part} does not reproduce the recorded canaries: {self.detail}"


def check_tokenizer(canaries: Canaries, encode_fn: Encoder, vocab: Mapping[str, int]) -> Mismatch | None:
    recorded, now = canaries.vocab, fingerprint(vocab)
    if now != recorded:
        if now["size"] != recorded["size"]:
            return Mismatch("tokenizer", f"its vocabulary has {now['size']} tokens, recorded {recorded['size']}")
        return Mismatch("tokenizer", f"its vocabulary maps tokens to other ids than the recorded one ({now['size']} "
                        f"tokens, fingerprint {now['sha256'][:12]} instead of {recorded['sha256'][:12]})")
    for i, (sample, expected) in enumerate(zip(encode_fn(canaries.texts, canaries.pairs), canaries.samples(),
                                               strict=True)):
        if sample != expected:
            pairs = zip(sample.input_ids, expected.input_ids, strict=False)
            at = next((j for j, (a, b) in enumerate(pairs) if a != b), min(len(sample), len(expected)))
            text = canaries.texts[i] if len(canaries.texts[i]) <= 40 else canaries.texts[i][:37] + "..."
            return Mismatch("tokenizer", f"canary {i} ({text!r}) encodes to other token ids "
                            f"({len(sample)} tokens, recorded {len(expected)}; first difference at token {at})")
    return None


def _error(got: np.ndarray, ref: np.ndarray, spread: float) -> tuple[float, int]:
    """The largest distance between got and recorded, over the inputs, in units of the spread; and where."""
    distance = np.sqrt(((got - ref).reshape(len(ref), -1) ** 2).sum(-1))
    worst = int(np.argmax(distance))
    return float(distance[worst] / max(spread, FLOOR)), worst


def part_errors(canaries: Canaries, ref: Outputs, got: Outputs) -> Iterator[tuple[str, float, int]]:
    """(part, largest error in units of the spread, the canary it is at), in the order the parts run;
    a part with no comparable output (another shape, no LTE, NaN) has an infinite error."""
    scale = canaries.scale
    if got.logits.shape != ref.logits.shape or got.hidden.shape != ref.hidden.shape:
        yield "exit 1", math.inf, 0
        return
    checks = [("embeddings", got.hidden[0], ref.hidden[0], scale["hidden"][0])]
    for k in range(ref.logits.shape[0]):
        checks.append((f"layer {k + 1}", got.hidden[k + 1], ref.hidden[k + 1], scale["hidden"][k + 1]))
        checks.append((f"exit {k + 1}", got.logits[k], ref.logits[k], scale["logits"][k]))
        if ref.lte is not None and scale["lte"] is not None:
            checks.append((f"exit {k + 1}", got.lte[k] if got.lte is not None else None, ref.lte[k], scale["lte"][k]))
    for part, values, expected, spread in checks:
        if values is None or not np.isfinite(values).all():
            yield part, math.inf, 0
        else:
            yield part, *_error(values, expected, spread)


def check_outputs(canaries: Canaries, ref: Outputs, got: Outputs, tolerance: float) -> Mismatch | None:
    """The first part whose outputs lie beyond `tolerance` (a fraction of the spread) of the recorded ones."""
    for part, error, worst in part_errors(canaries, ref, got):
        if error == math.inf:
            return Mismatch(part, "its output is missing, of another shape, or not finite")
        if error > tolerance:
            return Mismatch(part, f"canary {worst} is {error:.3g} of the canaries' spread away from the recorded "
                            f"value (tolerance {tolerance:g})")
    return None


def run_backend(canaries: Canaries, backend: Backend) -> Outputs | Mismatch:
    """The backend's outputs for the recorded token ids, or the part that could not even run."""
    try:
        return outputs(backend, canaries.samples(), **canaries.digest)
    except PartFailed as exc:  # a runtime that fails on the canaries must not serve: name the part, do not crash
        return Mismatch(exc.part, f"it fails on them: {exc}")


def self_test(canaries: Canaries, encode_fn: Encoder, vocab: Mapping[str, int], backend: Backend) -> Mismatch | None:
    """The first part of (tokenizer, backend) that does not reproduce the canaries, or None. A runtime
    variant without a record of its own (int8 before `record-canaries --quantize int8`) is not run:
    its values are too far from torch's for a tolerance that would still catch a wrong layer."""
    mismatch = check_tokenizer(canaries, encode_fn, vocab)
    if mismatch is not None:
        return mismatch
    ref = canaries.reference(backend.calibration_key)
    if ref is None:
        log.warning("no canaries recorded for %s: its graphs are not checked (record them with `exitserve "
                    "record-canaries CHECKPOINT --quantize %s`)", backend.calibration_key, backend.quantize)
        return None
    got = run_backend(canaries, backend)
    if isinstance(got, Mismatch):
        return got
    tolerance = TOLERANCE_REFERENCE if backend.calibration_key is None else TOLERANCE_VARIANT
    return check_outputs(canaries, ref, got, tolerance)


COMPOSED_PART = "the early-exit graph"


def check_whole_batches(canaries: Canaries, backend: Backend, criterion: ExitCriterion,
                        thresholds: Sequence[Sequence[float]]) -> Mismatch | None:
    """A backend with a `run` of its own (the composed graph) against its layer-level calls, which the
    self-test has just checked: the same exit layers and logits within the reference tolerance."""
    if type(backend).run is Backend.run:
        return None
    samples = canaries.samples()
    spreads = np.maximum(np.asarray(canaries.scale["logits"]), FLOOR)
    for vector in thresholds:
        matrix = np.tile(np.asarray(vector, np.float32), (len(samples), 1))
        try:
            got = backend.run(samples, matrix, criterion)
        except Exception as exc:  # a graph that fails must not serve: name it, do not crash
            return Mismatch(COMPOSED_PART, f"it fails on them: {PartFailed(COMPOSED_PART, exc)}")
        want = run_layers(backend, samples, matrix, criterion)
        where = f"threshold {vector[0]:g}" if len(set(vector)) == 1 else "the default thresholds"
        differ = np.flatnonzero(got.exit_layer != want.exit_layer)
        if differ.size:
            i = int(differ[0])
            return Mismatch(COMPOSED_PART, f"canary {i} exits at layer {got.exit_layer[i]}, its layers at "
                            f"{want.exit_layer[i]} ({where})")
        error = np.linalg.norm(got.logits - want.logits, axis=-1) / spreads[want.exit_layer - 1]
        worst = int(error.argmax())
        if error[worst] > TOLERANCE_REFERENCE:
            return Mismatch(COMPOSED_PART, f"canary {worst} is {error[worst]:.3g} of the canaries' spread away "
                            f"from its layers' answer ({where}; tolerance {TOLERANCE_REFERENCE:g})")
    return None


def _failed(directory: Path, canaries: Canaries, backend: Backend, mismatch: Mismatch) -> SelfTestFailed:
    where = backend.name + ("" if backend.quantize == "none" else f" {backend.quantize}")
    record = "" if backend.quantize == "none" else f" --quantize {backend.quantize}"
    hint = ""
    variant = canaries.references.get(backend.calibration_key) if backend.calibration_key else None
    recorded_ort = (variant or {}).get("recorded_with", {}).get("onnxruntime")  # a quantiser's output may change
    if mismatch.in_runtime and file_sha256(directory / WEIGHTS) != canaries.weights_sha256:
        hint = (f" ({CANARIES} was recorded for another {WEIGHTS}: if the weights were replaced on purpose, "
                f"record new canaries with `exitserve record-canaries {directory}{record}`)")
    elif mismatch.in_runtime and recorded_ort and recorded_ort != ort_version():
        hint = (f" (recorded with onnxruntime {recorded_ort}, this is {ort_version()}: if its new quantiser is "
                f"trusted, record new canaries with `exitserve record-canaries {directory}{record}`)")
    return SelfTestFailed(f"self-test on {where}: {mismatch}{hint}")


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def verified(directory: Path, encoder: TextEncoder, backend: Backend, criterion: ExitCriterion,
             thresholds: Sequence[float], rebuild: Callable[[str], Backend] | None = None) -> Backend:
    """The self-test (module docstring) of `backend`, just opened for the checkpoint in `directory`;
    `rebuild(why)` opens it again on graphs built afresh (ONNX Runtime). Returns the backend to serve;
    raises SelfTestFailed with one line."""
    try:
        canaries = read(directory)
    except CanaryFileError as exc:
        raise CheckpointError(str(exc)) from exc
    if canaries is None:
        log.warning("%s has no %s: the load-time self-test is skipped (record them with `exitserve "
                    "record-canaries %s`)", directory, CANARIES, directory)
        return backend
    vocab = encoder.vocab()

    def test(backend: Backend) -> Mismatch | None:
        mismatch = self_test(canaries, encoder.encode, vocab, backend)
        if mismatch is None and canaries.reference(backend.calibration_key) is not None:
            sweep = [[0.0] * backend.num_layers, list(thresholds), [1.0] * backend.num_layers]
            mismatch = check_whole_batches(canaries, backend, criterion, sweep)
        return mismatch

    mismatch = test(backend)
    if mismatch is not None and mismatch.in_runtime and rebuild is not None:
        log.warning("the %s graphs fail the self-test (%s): rebuilding them from the checkpoint", backend.name,
                    mismatch)
        backend = rebuild(f"self-test: {mismatch}")
        mismatch = test(backend)
    if mismatch is not None:
        raise _failed(directory, canaries, backend, mismatch)
    backend.release_checks()
    log.info("self-test passed: %d canaries reproduced on %s (%s)", len(canaries.texts), backend.name,
             backend.quantize)
    return backend
