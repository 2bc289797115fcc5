"""Where the ONNX Runtime backend's graphs live, and how they are built, checked and (re)built.

    CHECKPOINT/onnx/<variant>/          variant: fp32 | int8
      manifest.json                     format, variant, the checkpoint's weights and config sha256, the
                                        exit-config fields the graphs depend on, opset, onnx and
                                        onnxruntime versions, and every graph file's sha256
      embeddings.onnx  layer_00.onnx ... exit_00.onnx ...     the layer-level graphs (onnx_graphs.py)
      early_exit.onnx                   the whole model with the exit decision inside, for the
                                        checkpoint's criterion (onnx_compose.py)

When the checkpoint directory is not writable the same tree goes to
`$EXITSERVE_CACHE/onnx/<weights sha256[:16]>/<variant>/` (default cache: ~/.cache/exitserve).

`ensure_graphs` returns a directory whose manifest matches the checkpoint and whose files all hash to
what the manifest says; anything else (missing, stale, truncated, from another onnxruntime) is
rebuilt, into a temporary directory renamed into place, so a reader never sees a half-written export.
Only building needs the torch model (`load_model`, called then and only then): a server whose graphs
are in place never imports torch. When no location is writable it raises `OnnxStoreError` with a
one-line reason: a bad export is never served. The hashes catch accidents, not a wrong file with a
matching manifest: the load-time self-test (models/self_test.py) binds the graphs to the checkpoint,
and `rebuild_graphs` replaces graphs that fail it, or that onnxruntime cannot load. Work directories of
an export that was interrupted (the process killed) are removed when the graphs are next looked for.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime

from exitserve.models.backends.base import QUANTIZATIONS
from exitserve.models.bounded_files import file_sha256, read_json
from exitserve.models.cache import cache_dir
from exitserve.models.criteria import ExitCriterion
from exitserve.models.exit_config import WEIGHTS, ExitConfig
from exitserve.models.exit_rule import RULE_FILE

if TYPE_CHECKING:  # building imports onnx and the torch model; serving from a valid store imports neither
    from exitserve.models.early_exit import EarlyExitModel

ModelLoader = Callable[[], "EarlyExitModel"]

log = logging.getLogger("exitserve")

FORMAT = 2
MANIFEST = "manifest.json"
WORK_MARK = "-work-"  # in the names of build directories: .<variant>-work-<host>-<pid>-<random>
STALE_WORK_SECONDS = 3600  # another host's work directory this old is an interrupted export
COMPOSED = "early_exit.onnx"
# The composed graph's weights live beside it, as ONNX external data: ORT then loads them straight into its
# tensors. Kept inside the graph file, the `If` bodies holding them stay in memory as well (measured: the
# session took 2.7x the weights' size, 1.0x from external data).
COMPOSED_WEIGHTS = "early_exit.data"
OPSET = 17  # onnx_graphs.OPSET (recorded in the manifest)


class UnsupportedModel(ValueError):
    """The model cannot be written as exitserve's ONNX graphs (onnx_families.check_exportable); the message
    says why (the caller serves it on torch instead)."""


class OnnxStoreError(RuntimeError):
    """The graphs can be neither found valid nor built; the message says why in one line."""


def variant_name(quantize: str) -> str:
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    return "fp32" if quantize == "none" else quantize


@dataclass
class Source:
    """What the graphs are built from: the checkpoint's files, hashed, and the exit-config fields that matter."""

    weights_sha256: str
    config_sha256: str
    exit_config: dict  # the fields the graphs depend on (the composed graph: the criterion, and its rule)
    criterion: ExitCriterion = field(compare=False, repr=False)

    @classmethod
    def of(cls, directory: Path, cfg: ExitConfig) -> Source:
        rule = directory / RULE_FILE
        fields = {"num_layers": cfg.num_layers, "num_outputs": cfg.num_outputs, "use_lte": cfg.use_lte,
                  "pooling": cfg.pooling, "final_activation": cfg.final_activation, "max_length": cfg.max_length,
                  "criterion": cfg.criterion, "regression": cfg.regression, "patience_delta": cfg.patience_delta,
                  "exit_rule_sha256": file_sha256(rule) if cfg.criterion == "learned" and rule.is_file() else None}
        return cls(file_sha256(directory / WEIGHTS), file_sha256(directory / "config.json"), fields,
                   cfg.make_criterion())


def layer_files(num_layers: int) -> list[str]:
    return ["embeddings.onnx", *(f"layer_{k:02d}.onnx" for k in range(num_layers)),
            *(f"exit_{k:02d}.onnx" for k in range(num_layers))]


def graph_files(num_layers: int) -> list[str]:
    return [*layer_files(num_layers), COMPOSED, COMPOSED_WEIGHTS]


def candidates(directory: Path, source: Source, variant: str) -> list[Path]:
    """Where the graphs may live, in the order they are looked for (and built)."""
    return [directory / "onnx" / variant, cache_dir() / "onnx" / source.weights_sha256[:16] / variant]


def problem(directory: Path, source: Source, variant: str) -> str | None:
    """Why `directory` cannot be served (None: it can)."""
    try:
        manifest = read_json(directory / MANIFEST)
    except FileNotFoundError:
        return "no export"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return "another export format"
    expected = {"variant": variant, "weights_sha256": source.weights_sha256, "config_sha256": source.config_sha256,
                "exit_config": source.exit_config, "onnxruntime": onnxruntime.__version__}
    for key, value in expected.items():
        if manifest.get(key) != value:
            return f"stale ({key} changed)"
    files = manifest.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(graph_files(source.exit_config["num_layers"])):
        return "incomplete file list"
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} is corrupt or truncated"
    return None


def _quantize(fp32, target: Path) -> None:
    """Dynamic int8 weights (activations quantised per call): MatMul and the fused Attention."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # the quantiser logs a dozen generic lines per graph to the root logger
    try:
        quantize_dynamic(fp32, target, op_types_to_quantize=["MatMul", "Attention"], weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # contrib ops' outputs
    finally:
        logging.disable(logging.NOTSET)


def build(model: EarlyExitModel, source: Source, variant: str, target: Path) -> None:
    """Write the graphs and their manifest into `target` (replaced whole, never left half-written)."""
    import onnx

    from exitserve.models.backends.onnx_families import model_weights
    from exitserve.models.backends.onnx_graphs import embeddings_graph, exit_graph, layer_graph

    cfg = source.exit_config
    weights = model_weights(model, cfg["max_length"])
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}{_work_tag()}", dir=target.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would hide an image's build-time export from its non-root user
    try:
        onnx.save(embeddings_graph(weights.embeddings), work / "embeddings.onnx")
        for k, layer in enumerate(weights.layers):
            graph = layer_graph(layer, weights.heads, weights.activation, weights.position_bias)
            if variant == "int8":
                _quantize(graph, work / f"layer_{k:02d}.onnx")
            else:
                onnx.save(graph, work / f"layer_{k:02d}.onnx")
            onnx.save(exit_graph(weights.exits[k]), work / f"exit_{k:02d}.onnx")  # exits stay fp32: tiny
        save_composed(compose_stored(work, source.criterion, cfg["num_outputs"]), work)
        names = graph_files(len(weights.layers))
        manifest = {
            "format": FORMAT, "variant": variant, "weights_sha256": source.weights_sha256,
            "config_sha256": source.config_sha256, "exit_config": source.exit_config, "family": weights.family,
            "opset": OPSET, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "files": {name: file_sha256(work / name) for name in names},
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}{_work_tag()}old")
            target.rename(old)
        try:
            work.rename(target)
        except OSError:  # another process put its export there first: keep it if it checks out
            if problem(target, source, variant) is not None:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _work_tag() -> str:
    return f"{WORK_MARK}{socket.gethostname()}-{os.getpid()}-"


def _interrupted(path: Path) -> bool:
    """A work directory whose export will never finish: its process (on this host) is gone, or, from
    another host sharing the directory, it is over an hour old."""
    host, _, rest = path.name.partition(WORK_MARK)[2].rpartition("-")[0].rpartition("-")
    if host == socket.gethostname() and rest.isdigit():
        try:
            os.kill(int(rest), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
    try:
        return time.time() - path.stat().st_mtime > STALE_WORK_SECONDS
    except OSError:
        return False


def clean_interrupted(places: list[Path]) -> None:
    """Remove the work directories interrupted exports left next to `places`."""
    for parent in {p.parent for p in places}:
        try:
            leftovers = [p for p in parent.iterdir() if WORK_MARK in p.name and p.name.startswith(".")]
        except OSError:
            continue
        for path in leftovers:
            if path.is_dir() and _interrupted(path):
                log.info("removing %s, left by an interrupted ONNX export", path)
                shutil.rmtree(path, ignore_errors=True)


def _writable(directory: Path) -> bool:
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".probe-", dir=directory.parent)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def compose_stored(directory: Path, criterion, num_outputs: int):
    """The composed early-exit graph for `criterion` (onnx_compose.py), from the layer-level graphs in
    `directory` (no torch: the weights are read out of those graphs)."""
    import onnx

    from exitserve.models.backends.onnx_compose import compose

    num_layers = criterion.num_layers
    load = lambda name: onnx.load(directory / name)  # noqa: E731
    return compose(load("embeddings.onnx"), [load(f"layer_{k:02d}.onnx") for k in range(num_layers)],
                   [load(f"exit_{k:02d}.onnx") for k in range(num_layers)], criterion, num_outputs)


def save_composed(model, directory: Path) -> Path:
    """Write a composed graph into `directory` (COMPOSED, its weights in COMPOSED_WEIGHTS); returns its path."""
    import onnx

    onnx.save(model, directory / COMPOSED, save_as_external_data=True, all_tensors_to_one_file=True,
              location=COMPOSED_WEIGHTS, size_threshold=1024)
    return directory / COMPOSED


def _build_checked(load_model: ModelLoader, source: Source, variant: str, directory: Path, why: str) -> Path:
    log.info("building the ONNX Runtime graphs (%s) in %s: %s", variant, directory, why)
    build(load_model(), source, variant, directory)
    still = problem(directory, source, variant)
    if still is not None:
        raise OnnxStoreError(f"the ONNX graphs just built in {directory} do not check out: {still}")
    return directory


def _nowhere(places: list[Path]) -> OnnxStoreError:
    return OnnxStoreError(f"no valid ONNX export and neither {' nor '.join(map(str, places))} is writable "
                          "(set EXITSERVE_CACHE to a writable directory, or use backend=torch)")


def _build_first_writable(load_model: ModelLoader, source: Source, variant: str, places: list[Path],
                          why: str) -> Path:
    for place in places:
        if _writable(place):
            return _build_checked(load_model, source, variant, place, why)
    raise _nowhere(places)


def ensure_graphs(directory: Path, exit_config: ExitConfig, load_model: ModelLoader, quantize: str = "none") -> Path:
    """A valid graph directory for the checkpoint in `directory` (what `serve` uses): the first valid one
    among the checkpoint's and the cache's, else one built (and logged) in the first writable of them,
    from the torch model `load_model` returns."""
    variant, source = variant_name(quantize), Source.of(directory, exit_config)
    places = candidates(directory, source, variant)
    clean_interrupted(places)
    reasons = []
    for place in places:
        why = problem(place, source, variant)
        if why is None:
            return place
        reasons.append(f"{place}: {why}")
    return _build_first_writable(load_model, source, variant, places, "; ".join(reasons))


def rebuild_graphs(directory: Path, exit_config: ExitConfig, load_model: ModelLoader, quantize: str, why: str) -> Path:
    """Graphs built afresh from the checkpoint (in the first writable place), whatever is stored: for
    graphs whose manifest checks out but that fail the self-test or that onnxruntime cannot load."""
    variant, source = variant_name(quantize), Source.of(directory, exit_config)
    return _build_first_writable(load_model, source, variant, candidates(directory, source, variant), why)


def export_graphs(directory: Path, exit_config: ExitConfig, load_model: ModelLoader,
                  quantize: str = "none") -> tuple[Path, bool]:
    """`exitserve export-onnx`: a valid export in the checkpoint, or in the cache when the checkpoint is
    not writable; returns where, and whether it was (re)built."""
    variant, source = variant_name(quantize), Source.of(directory, exit_config)
    places = candidates(directory, source, variant)
    for place in places:
        if _writable(place):
            why = problem(place, source, variant)
            if why is None:
                return place, False
            return _build_checked(load_model, source, variant, place, why), True
    raise _nowhere(places)
