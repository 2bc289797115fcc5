"""Canaries: a few fixed inputs recorded with the checkpoint, with what the reference model makes of
them, so that every load can prove the tokenizer and the runtime still compute that model
(models/self_test.py checks them).

    CHECKPOINT/canaries.json   (a file of its own: calibration rewrites exit_config.json)
      format               1
      texts, pairs         16 inputs of mixed length and case, accents, digits, CJK, an emoji, one
                           over 128 tokens (pairs: null for single-text models)
      input_ids            what each input encodes to (token_type_ids too, when the tokenizer makes them)
      vocab                size and sha256 of the tokenizer's (token, id) pairs: a vocabulary
                           reordered, or two words swapped, changes it
      digest               how hidden states are summarised: `dims` random projections (seeded) of
                           each input's mean state over its tokens and of its first token's state
      scale                per layer, how far apart the inputs' summaries / logits / LTE values lie
                           (root mean square distance to their mean): the unit of the tolerances
      weights_sha256       the model.safetensors they were recorded from
      references           per runtime: "torch" (the reference: the torch model, which fp32 ONNX Runtime
                           must match too) and each variant whose answers differ from the checkpoint's own,
                           under its calibration key ("onnxruntime-int8", from graphs built afresh), with
        hidden[k][i]       the summary of input i after the embeddings (k = 0) and after layer k
        logits[k][i]       exit k+1's logits for input i; lte[k][i] its LTE confidence (or null)
        recorded_with      backend, quantize, date

`save_checkpoint` records them (torch); `exitserve record-canaries` records them for an older
checkpoint (with `--quantize int8` the int8 variant too); `exitserve calibrate` of the int8 variant
adds its record. `outputs` runs them through any runtime backend the same way: one batch, every
layer, every exit, through the `Backend` seam only.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exitserve.models.backends.base import Backend
from exitserve.models.bounded_files import SMALL_JSON, UnsafeFile, file_sha256, read_json
from exitserve.models.encoding import Encoded, encode
from exitserve.models.exit_config import WEIGHTS

if TYPE_CHECKING:  # recording runs the torch model; reading and checking (serving) import no torch
    from exitserve.models.checkpoint import Checkpoint

CANARIES = "canaries.json"
FORMAT = 1
REFERENCE = "torch"
DIGEST_DIMS = 8
DIGEST_SEED = 0

# Short and long, lower and upper case (a tokenizer that stops lowercasing changes their ids), accents
# (stripped or not), digits, punctuation, CJK, an emoji; the last is over 128 tokens (truncated).
TEXTS = (
    "a gorgeous, witty, seductive movie.",
    "The Plot Is A MESS and the ACTING is wooden.",
    "fine",
    "An utter delight from start to finish; I laughed, I cried, I went back the next day with my parents.",
    "it's not that it's bad -- it's that it's forgettable, which might be worse.",
    "Crème brûlée, naïve café owners and a façade: Amélie à la française.",
    "In 1997 the budget was $12,500,000 (about 3.5x the 2nd film's).",
    "BORING!!! Two hours I will never get back :(",
    "the director's previous work showed promise, but this one squanders a talented cast on a script "
    "that never decides whether it is a comedy or a tragedy",
    "東京の映画館で見た。とても良かった。",
    "Not bad at all 👍 -- surprisingly moving, even if the ending drags a little.",
    "\"Why?\" she asked. \"Because,\" he said.",
    "unwatchable",
    "Mr. O'Neil's e-mail (sent 03/04) said: re-edit the third act & drop the voice-over.",
    "Quietly Devastating, Beautifully Shot, And Never Once Sentimental About Its Characters.",
    " ".join(["an endless, meandering story that goes nowhere slowly"] * 20),
)
PAIRS = (
    "a charming, clever film.",
    "The plot is a mess.",
    "good",
    "I did not enjoy it at all.",
    "It is forgettable.",
    "A French dessert and a cafe.",
    "The budget was twelve and a half million dollars.",
    "It was boring.",
    "The cast is talented but the script is undecided.",
    "I saw it at a cinema in Tokyo.",
    "The ending drags.",
    "She asked why.",
    "Unwatchable.",
    "Re-edit the third act.",
    "Sentimental and badly shot.",
    " ".join(["a story that goes somewhere quickly"] * 20),
)


class CanaryFileError(ValueError):
    """A canaries file that cannot be used: the message says why in one line."""


class PartFailed(RuntimeError):
    """A part of the backend (`embeddings`, `layer k`, `exit k`) raised while running the canaries."""

    def __init__(self, part: str, exc: Exception):
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        super().__init__(f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__)
        self.part = part


@dataclass
class Outputs:
    """What a backend makes of the canaries: hidden summaries `[L+1, N, 2*dims]`, logits `[L, N, C]`,
    LTE `[L, N]` (or None)."""

    hidden: np.ndarray
    logits: np.ndarray
    lte: np.ndarray | None

    def as_json(self, recorded_with: dict[str, str]) -> dict[str, Any]:
        return {"hidden": self.hidden.tolist(), "logits": self.logits.tolist(),
                "lte": self.lte.tolist() if self.lte is not None else None, "recorded_with": recorded_with}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Outputs:
        lte = raw.get("lte")
        return cls(np.asarray(raw["hidden"], dtype=np.float64), np.asarray(raw["logits"], dtype=np.float64),
                   np.asarray(lte, dtype=np.float64) if lte is not None else None)


@dataclass
class Canaries:
    texts: list[str]
    pairs: list[str] | None
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    vocab: dict[str, Any]
    digest: dict[str, int]
    scale: dict[str, list[float] | None]
    weights_sha256: str
    references: dict[str, dict[str, Any]]  # REFERENCE (torch) and runtime variants (calibration keys)
    format: int = FORMAT

    def samples(self) -> list[Encoded]:
        types = self.token_type_ids or [None] * len(self.input_ids)
        return [Encoded(list(ids), list(t) if t is not None else None)
                for ids, t in zip(self.input_ids, types, strict=True)]

    def reference(self, key: str | None = None) -> Outputs | None:
        """What the torch model computed (key None), or a runtime variant (e.g. onnxruntime-int8: its
        answers differ from the checkpoint's own); None when not recorded."""
        raw = self.references.get(key or REFERENCE)
        return Outputs.from_json(raw) if raw is not None else None

    def save(self, directory: Path) -> Path:
        path = directory / CANARIES
        path.write_text(json.dumps(asdict(self)) + "\n")
        return path


def vocab_fingerprint(vocab: Mapping[str, int]) -> dict[str, Any]:
    """Size and sha256 of the (token, id) pairs, in id order."""
    pairs = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
    return {"size": len(pairs), "sha256": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()}


def _numpy(array: Any) -> np.ndarray:
    """A backend's array (a torch tensor on any device, or numpy) as float64 numpy."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def _projection(hidden_size: int, dims: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((hidden_size, dims)) / np.sqrt(hidden_size)


def summarise(backend: Backend, hidden: Any, lengths: Sequence[int], projection: np.ndarray) -> np.ndarray:
    """Each input's hidden-state summary `[N, 2*dims]`: its mean state and its first token's, projected."""
    rows = [_numpy(row) for row in backend.rows(hidden, lengths)]
    return np.stack([np.concatenate([row.mean(0) @ projection, row[0] @ projection]) for row in rows])


def outputs(backend: Backend, samples: Sequence[Encoded], dims: int = DIGEST_DIMS, seed: int = DIGEST_SEED) -> Outputs:
    """Run the canaries through `backend` as one batch: every layer, every exit (the Backend seam only)."""
    lengths = np.array([len(s) for s in samples])
    try:
        hidden = backend.embed(samples)
        attention = backend.attention(lengths)
        projection = _projection(int(hidden.shape[-1]), dims, seed)
        summaries = [summarise(backend, hidden, lengths, projection)]
    except Exception as exc:
        raise PartFailed("embeddings", exc) from exc
    logits, lte = [], []
    for k in range(backend.num_layers):
        try:
            next_hidden, out = backend.layer(k, hidden, attention, need_exit=True)
        except Exception as exc:  # the layer or its exit? the layer alone tells
            try:
                backend.layer(k, hidden, attention, need_exit=False)
            except Exception:
                raise PartFailed(f"layer {k + 1}", exc) from exc
            raise PartFailed(f"exit {k + 1}", exc) from exc
        hidden = next_hidden
        try:
            summaries.append(summarise(backend, hidden, lengths, projection))
        except Exception as exc:  # e.g. states of another hidden size
            raise PartFailed(f"layer {k + 1}", exc) from exc
        if tuple(out.logits.shape) != (len(samples), backend.num_outputs):
            raise PartFailed(f"exit {k + 1}", ValueError(f"logits of shape {tuple(out.logits.shape)}, expected "
                                                         f"{(len(samples), backend.num_outputs)}"))
        logits.append(_numpy(out.logits))
        lte.append(_numpy(out.lte) if out.lte is not None else None)
    has_lte = all(x is not None for x in lte)
    return Outputs(np.stack(summaries), np.stack(logits), np.stack(lte) if has_lte else None)


def spread(values: np.ndarray) -> list[float]:
    """Per layer (first axis), the root mean square distance of the inputs (second axis) to their mean."""
    values = values.reshape(values.shape[0], values.shape[1], -1)
    centred = values - values.mean(axis=1, keepdims=True)
    return [float(x) for x in np.sqrt((centred**2).sum(-1).mean(-1))]


Encoder = Callable[[Sequence[str], Sequence[str] | None], list[Encoded]]


def _recorded_with(backend: Backend) -> dict[str, str]:
    return {"backend": backend.name, "quantize": backend.quantize, "date": datetime.date.today().isoformat()}


def record(backend: Backend, encode: Encoder, vocab: Mapping[str, int], pair_input: bool,
           weights_sha256: str) -> Canaries:
    """The canaries as `backend` (the reference: the torch model) computes them."""
    texts, pairs = list(TEXTS), list(PAIRS) if pair_input else None
    samples = encode(texts, pairs)
    out = outputs(backend, samples)
    with_types = samples[0].token_type_ids is not None
    return Canaries(
        texts=texts, pairs=pairs, input_ids=[list(s.input_ids) for s in samples],
        token_type_ids=[list(s.token_type_ids) for s in samples] if with_types else None,
        vocab=vocab_fingerprint(vocab), digest={"dims": DIGEST_DIMS, "seed": DIGEST_SEED},
        scale={"hidden": spread(out.hidden), "logits": spread(out.logits),
               "lte": spread(out.lte) if out.lte is not None else None},
        weights_sha256=weights_sha256, references={REFERENCE: out.as_json(_recorded_with(backend))},
    )


def _reference_backend(checkpoint: Checkpoint) -> Backend:
    from exitserve.models.backends.torch_backend import TorchBackend  # the reference is the torch model

    return TorchBackend(checkpoint.model, checkpoint.tokenizer.pad_token_id)


def _variant(checkpoint: Checkpoint, canaries: Canaries, quantize: str) -> None:
    """Add what ONNX Runtime with `quantize` weights (int8) computes, on graphs built afresh from the
    checkpoint (never the stored ones: those are what the record will check)."""
    import onnxruntime

    from exitserve.models.backends.onnx_backend import OnnxBackend
    from exitserve.models.backends.onnx_store import Source, build, variant_name

    cfg = checkpoint.exit_config
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / variant_name(quantize)
        build(checkpoint.model, Source.of(checkpoint.path, cfg), variant_name(quantize), target)
        backend = OnnxBackend(target, checkpoint.tokenizer.pad_token_id, cfg.make_criterion(), None, quantize)
        out = outputs(backend, canaries.samples(), **canaries.digest)
    recorded_with = {**_recorded_with(backend), "onnxruntime": onnxruntime.__version__}  # its quantiser may change
    canaries.references[backend.calibration_key or REFERENCE] = out.as_json(recorded_with)


def record_canaries(checkpoint: Checkpoint, quantize: Sequence[str] = ()) -> Path:
    """Record a loaded checkpoint's canaries on its torch model (the reference), and for each of
    `quantize` (int8) on ONNX Runtime, and write them into it (`save_checkpoint`, `exitserve
    record-canaries`)."""
    cfg, tokenizer = checkpoint.exit_config, checkpoint.tokenizer

    def encode_fn(texts: Sequence[str], pairs: Sequence[str] | None) -> list[Encoded]:
        return encode(tokenizer, texts, pairs, cfg.max_length, truncate=True)

    canaries = record(_reference_backend(checkpoint), encode_fn, tokenizer.get_vocab(), cfg.pair_column is not None,
                      file_sha256(checkpoint.path / WEIGHTS))
    for q in quantize:
        _variant(checkpoint, canaries, q)
    return canaries.save(checkpoint.path)


def record_variant(checkpoint: Checkpoint, quantize: str) -> Path:
    """Add (or replace) one runtime variant's record, keeping the recorded inputs and reference
    (`exitserve calibrate` of an int8 variant); everything is recorded when there are no canaries yet."""
    canaries = read(checkpoint.path)
    if canaries is None:
        return record_canaries(checkpoint, [quantize])
    _variant(checkpoint, canaries, quantize)
    return canaries.save(checkpoint.path)


def _shape_problem(c: Canaries) -> str | None:
    n = len(c.texts)
    if n == 0 or len(c.input_ids) != n or (c.pairs is not None and len(c.pairs) != n):
        return "texts, pairs and input_ids differ in length"
    if c.token_type_ids is not None and [len(t) for t in c.token_type_ids] != [len(i) for i in c.input_ids]:
        return "token_type_ids do not match input_ids"
    if REFERENCE not in c.references:
        return f"no {REFERENCE} reference"
    for key in c.references:
        out = c.reference(key)
        hidden, logits = out.hidden, out.logits
        if hidden.ndim != 3 or logits.ndim != 3 or hidden.shape[:2] != (logits.shape[0] + 1, n) or \
                logits.shape[1] != n:
            return f"{key}: hidden and logits have the wrong shapes"
        if out.lte is not None and out.lte.shape != logits.shape[:2]:
            return f"{key}: lte has the wrong shape"
        if len(c.scale.get("hidden") or ()) != hidden.shape[0] or len(c.scale.get("logits") or ()) != logits.shape[0]:
            return "scale has the wrong length"
        if not (np.isfinite(hidden).all() and np.isfinite(logits).all()):
            return f"{key}: non-finite values"
    return None


def read(directory: Path) -> Canaries | None:
    """The checkpoint's canaries; None when it has none; CanaryFileError when they cannot be used."""
    path = directory / CANARIES
    try:
        raw = read_json(path, SMALL_JSON)
    except FileNotFoundError:
        return None
    except UnsafeFile as exc:
        raise CanaryFileError(str(exc)) from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CanaryFileError(f"{path}: format {raw.get('format') if isinstance(raw, dict) else None!r} is not "
                              f"supported (expected {FORMAT})")
    missing = [f.name for f in fields(Canaries) if f.default is MISSING and f.name not in raw]
    if missing:
        raise CanaryFileError(f"{path} is damaged: {', '.join(missing)} missing")
    try:
        canaries = Canaries(**raw)
        problem = _shape_problem(canaries)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        problem = (str(exc).splitlines() or [type(exc).__name__])[0]
    if problem is not None:
        raise CanaryFileError(f"{path} is damaged: {problem}")
    return canaries
