"""`tamper`: damage a checkpoint as a hostile tester did -- the kinds that used to start and serve
confident wrong answers -- and record, for each, what serving it without the load-time self-test
answers and what the self-test does.

Tokenizers of the right size: the vocabulary shuffled (special tokens kept), nine word pairs swapped,
lowercasing switched off. ONNX graphs with the manifest's hashes updated to match: layer 3 <- layer 2,
exit L <- exit 1, a layer and an exit of another model, and a file onnxruntime cannot parse.
It also records how far each runtime's canary outputs lie from the record, undamaged and damaged, in
units of the canaries' spread (what the self-test's tolerances are set against). The damage functions
are what tests/models/test_self_test.py uses too. Writes OUT/tamper.json.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from exitserve.loadtest.reliability.report import write_json
from exitserve.models.backends import Backend, create_backend
from exitserve.models.backends.onnx_backend import OnnxBackend
from exitserve.models.backends.onnx_store import COMPOSED, COMPOSED_WEIGHTS, MANIFEST, ensure_graphs
from exitserve.models.bounded_files import file_sha256
from exitserve.models.canaries import REFERENCE, outputs, read
from exitserve.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.encoding import encode
from exitserve.models.exit_config import ExitConfig
from exitserve.models.inference import predict
from exitserve.models.self_test import TOLERANCE_REFERENCE, TOLERANCE_VARIANT, SelfTestFailed, part_errors
from exitserve.models.served import load_served

# common words whose ids are swapped pairwise ("nine word pairs swapped")
WORD_PAIRS = (("good", "bad"), ("the", "a"), ("is", "was"), ("film", "movie"), ("and", "but"), ("not", "very"),
              ("funny", "boring"), ("best", "worst"), ("great", "dull"))
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>", "<pad>", "<unk>", "<mask>")


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def shuffle_vocabulary(checkpoint: Path, seed: int = 0) -> None:
    """Same tokens, same size, other ids (the special tokens keep theirs, so they still frame an input)."""
    def edit(tok: dict) -> None:
        vocab = tok["model"]["vocab"]
        movable = [t for t in vocab if t not in SPECIAL]
        ids = [vocab[t] for t in movable]
        random.Random(seed).shuffle(ids)
        vocab.update(zip(movable, ids, strict=True))

    _edit_json(checkpoint / "tokenizer.json", edit)


def swap_word_pairs(checkpoint: Path, pairs=WORD_PAIRS) -> None:
    def edit(tok: dict) -> None:
        vocab = tok["model"]["vocab"]
        for a, b in pairs:
            vocab[a], vocab[b] = vocab[b], vocab[a]

    _edit_json(checkpoint / "tokenizer.json", edit)


def no_lowercasing(checkpoint: Path) -> None:
    _edit_json(checkpoint / "tokenizer.json", lambda tok: tok["normalizer"].update(lowercase=False))
    _edit_json(checkpoint / "tokenizer_config.json", lambda cfg: cfg.update(do_lower_case=False))


TOKENIZER_DAMAGE = {"vocabulary shuffled": shuffle_vocabulary, "nine word pairs swapped": swap_word_pairs,
                    "lowercasing switched off": no_lowercasing}
UPPER_CASE = ("lowercasing switched off",)  # measured on the texts in upper case (the SST-2 ones are lower case)


def replace_graphs(graphs: Path, replacements: dict[str, Path | bytes]) -> None:
    """Put other files (or bytes) in place of graphs, and the manifest's hashes to match (what hashes
    alone cannot catch)."""
    for name, source in replacements.items():
        if isinstance(source, bytes):
            (graphs / name).write_bytes(source)
        else:
            shutil.copyfile(source, graphs / name)
    _edit_json(graphs / MANIFEST, lambda m: m["files"].update({n: file_sha256(graphs / n) for n in replacements}))


def graph_damage(graphs: Path, foreign: Path, num_layers: int) -> dict[str, dict[str, Path | bytes]]:
    """The graph damages of the run: name -> replacements (for `replace_graphs`). `foreign` holds
    another model's graphs of the same architecture."""
    last = f"exit_{num_layers - 1:02d}.onnx"
    return {
        "layer 3 <- layer 2": {"layer_02.onnx": graphs / "layer_01.onnx"},
        f"exit {num_layers} <- exit 1": {last: graphs / "exit_00.onnx"},
        "layer 2 and exit 2 of another model": {n: foreign / n for n in ("layer_01.onnx", "exit_01.onnx")},
        "layer 2 not a graph": {"layer_01.onnx": b"\x08\x07garbage, not a protobuf"},
        "the early-exit graph of another model": {n: foreign / n for n in (COMPOSED, COMPOSED_WEIGHTS)},
    }


def another_model(checkpoint: Path, directory: Path, seed: int = 1) -> Path:
    """A checkpoint of the same architecture and task with other weights: the pretrained backbone with
    fresh exit heads."""
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.exit_config
    torch.manual_seed(seed)
    model = EarlyExitModel.from_backbone(cfg.backbone, cfg.num_outputs, cfg.use_lte, cfg.pooling)
    return save_checkpoint(directory, model, ckpt.tokenizer, cfg)


def stored_graphs(checkpoint: Path, quantize: str = "none") -> Path:
    """The checkpoint's graph directory as `serve` finds it (built when there is none)."""
    return ensure_graphs(checkpoint, ExitConfig.read(checkpoint), lambda: load_checkpoint(checkpoint).model, quantize)


def _as_stored(checkpoint: Path, name: str, quantize: str) -> tuple[Checkpoint, Backend]:
    """The checkpoint and its backend as served before the self-test: the stored graphs are used as
    they are (neither self-tested nor rebuilt when onnxruntime cannot load them)."""
    ckpt = load_checkpoint(checkpoint)
    if name == "onnxruntime":
        criterion = ckpt.exit_config.make_criterion()
        return ckpt, OnnxBackend(stored_graphs(checkpoint, quantize), ckpt.tokenizer.pad_token_id, criterion, None,
                                 quantize)
    return ckpt, create_backend(ckpt, name, quantize)


def largest_error(checkpoint: Path, name: str, quantize: str, record: str | None) -> dict:
    """How far the runtime's canary outputs lie from a record (None: torch's), in units of the spread:
    the largest error over all parts, and the first part over the tolerance the self-test applies."""
    canaries = read(checkpoint)
    _, backend = _as_stored(checkpoint, name, quantize)
    start = time.perf_counter()
    got = outputs(backend, canaries.samples(), **canaries.digest)
    seconds = time.perf_counter() - start  # what the self-test adds to start-up, besides the tokenizer's check
    errors = list(part_errors(canaries, canaries.reference(record), got))
    part, error, _ = max(errors, key=lambda e: e[1])
    tolerance = TOLERANCE_REFERENCE if record is None else TOLERANCE_VARIANT
    first = next(((p, round(e, 4)) for p, e, _ in errors if e > tolerance), None)
    return {"record": record or REFERENCE, "largest": round(error, 6), "at": part, "tolerance": tolerance,
            "first_over_tolerance": first, "run_seconds": round(seconds, 3)}


def _answers(checkpoint: Path, texts: list[str], name: str, quantize: str) -> list[tuple[int, int]]:
    """(label, exit layer) per text, served as before the self-test (`_as_stored`)."""
    ckpt, backend = _as_stored(checkpoint, name, quantize)
    cfg = ckpt.exit_config
    samples = encode(ckpt.tokenizer, texts, None, cfg.max_length)
    threshold = cfg.thresholds(cfg.threshold_for(backend.calibration_key))
    return [(p.label_id, p.exit_layer) for p in predict(backend, cfg.make_criterion(), samples, threshold)]


def _self_test(checkpoint: Path, name: str, quantize: str, log_lines: list[str]) -> str:
    """What the self-test does: 'passed', 'rebuilt, then passed', or the refusal's one line."""
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: log_lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("exitserve")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        load_served(checkpoint, name, quantize)
    except SelfTestFailed as exc:
        return f"refused: {exc}"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    rebuilt = any("building the ONNX Runtime graphs" in line for line in log_lines)
    return "graphs rebuilt, then passed" if rebuilt else "passed"


def tamper(checkpoint: Path, texts: list[str], out: Path, quantize: str = "none", foreign: Path | None = None) -> dict:
    """Every damage on a copy of `checkpoint` (tokenizers: on torch; graphs: on onnxruntime with
    `quantize`); `foreign`: another checkpoint of the same architecture (default: `another_model`).
    Writes OUT/tamper.json."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        foreign = foreign or another_model(checkpoint, Path(tmp) / "foreign")
        clean = Path(tmp) / "clean"
        shutil.copytree(checkpoint, clean, ignore=shutil.ignore_patterns("onnx"))
        graphs = stored_graphs(clean, quantize)
        other = stored_graphs(foreign, quantize)
        num_layers = load_checkpoint(clean).exit_config.num_layers
        cases = [(name, "torch", "none", damage) for name, damage in TOKENIZER_DAMAGE.items()]
        cases += [(name, "onnxruntime", quantize, repl)
                  for name, repl in graph_damage(graphs, other, num_layers).items()]
        variant = f"onnxruntime-{quantize}" if quantize != "none" else None
        compared = [("torch", "none", None), ("onnxruntime", quantize, None)]
        if variant in read(clean).references:
            compared.append(("onnxruntime", quantize, variant))
        clean_errors = [{"runtime": n, "quantize": q, **largest_error(clean, n, q, r)} for n, q, r in compared]
        runtimes = {("torch", "none"), ("onnxruntime", quantize)}
        reference = {(n, q, upper): _answers(clean, [t.upper() for t in texts] if upper else texts, n, q)
                     for n, q in runtimes for upper in (False, True)}
        for name, runtime, q, damage in tqdm(cases, desc="tamper", unit="damage", mininterval=5):
            upper = name in UPPER_CASE
            inputs, expected = [t.upper() for t in texts] if upper else texts, reference[(runtime, q, upper)]
            broken = Path(tmp) / "broken"
            shutil.rmtree(broken, ignore_errors=True)
            shutil.copytree(clean, broken)
            if callable(damage):
                damage(broken)
            else:
                replace_graphs(broken / graphs.relative_to(clean), damage)
            try:
                served = _answers(broken, inputs, runtime, q)
                differ = sum(a != b for a, b in zip(served, expected, strict=True))
                errors = largest_error(broken, runtime, q, variant) if runtime == "onnxruntime" else None
            except Exception as exc:  # e.g. onnxruntime cannot load the graph: it never served
                differ, errors = f"{type(exc).__name__}", None
            lines: list[str] = []
            verdict = _self_test(broken, runtime, q, lines)
            found = next((line for line in lines if "fail the self-test" in line or "cannot load them" in line), None)
            after = None
            if verdict != "passed" and not verdict.startswith("refused"):
                after = sum(a != b for a, b in zip(_answers(broken, inputs, runtime, q), expected, strict=True))
            rows.append({"damage": name, "runtime": runtime, "quantize": q, "texts": len(texts), "upper_case": upper,
                         "answers_differing_without_self_test": differ, "canary_errors": errors,
                         "self_test": verdict, "found": found,
                         "answers_differing_after": after})
            print(f"{name:>40} ({runtime} {q}): without the self-test {differ} of {len(texts)} answers differ; "
                  f"self-test: {verdict}")
    result = {"run": "tamper", "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(" ", "seconds"),
              "platform": platform.platform(), "cpus": os.cpu_count(), "checkpoint": str(checkpoint),
              "quantize": quantize, "undamaged_canary_errors": clean_errors, "cases": rows}
    for row in clean_errors:
        print(f"undamaged, {row['runtime']} {row['quantize']} against the {row['record']} record: largest canary "
              f"error {row['largest']:.3g} of the spread ({row['at']}; tolerance {row['tolerance']:g}); the canaries "
              f"ran in {row['run_seconds']:.2f} s")
    print(f"wrote {write_json(out / 'tamper.json', result)}")
    return result
