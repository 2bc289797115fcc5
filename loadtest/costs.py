"""CPU-time costs behind docs/RESULTS.md's issue-10 notes, measured in one process with one torch thread
(`time.thread_time`: CPU time, which a busy shared machine inflates far less than wall-clock time).

    python -m exitserve.loadtest.costs --checkpoint server/default_model --data ../shared/data/glue/SST-2

- `model`: per sentence (median, batch 1), the stock HF classifier's forward (the `exitserve export`
  output, what the pipeline peer runs) against the library's layer-by-layer `predict` at threshold
  1.0 (full depth) and at the calibrated threshold;
- `gc`: collector-tracked objects once the service is loaded, the CPU time of one full collection
  before and after `gc.freeze()`, and the collections per generation while the real app answers
  `--requests` /predict calls in-process (with `gc_freeze=false`).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from exitserve.models.backends import create_backend
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.data import DEFAULT_DATA, load_examples
from exitserve.models.encoding import collate, encode
from exitserve.models.export import export_hf
from exitserve.models.inference import predict


def cpu_ms(fn, items) -> float:
    """Median CPU milliseconds of `fn(item)` over `items`."""
    times = []
    for item in items:
        start = time.thread_time()
        fn(item)
        times.append(time.thread_time() - start)
    return round(statistics.median(times) * 1000, 2)


def model_costs(checkpoint: str, texts: list[str]) -> dict:
    ckpt = load_checkpoint(checkpoint)
    cfg, backend, criterion = ckpt.exit_config, create_backend(ckpt), ckpt.exit_config.make_criterion()
    samples = encode(ckpt.tokenizer, texts, max_length=cfg.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        stock = AutoModelForSequenceClassification.from_pretrained(export_hf(ckpt, Path(tmp) / "hf")).eval()
    batches = [collate([s], ckpt.tokenizer.pad_token_id) for s in samples]
    with torch.inference_mode():
        return {"sentences": len(samples),
                "stock_forward_ms": cpu_ms(lambda b: stock(**b), batches),
                "exits_off_ms": cpu_ms(lambda s: predict(backend, criterion, [s], [1.0] * cfg.num_layers), samples),
                "exits_on_ms": cpu_ms(lambda s: predict(backend, criterion, [s], cfg.thresholds()), samples)}


def gc_costs(checkpoint: str, texts: list[str], requests: int) -> dict:
    from fastapi.testclient import TestClient

    from exitserve.server.app import create_app
    from exitserve.server.settings import Settings

    settings = Settings(checkpoint=checkpoint, gc_freeze=False, access_log=False)
    with TestClient(create_app(settings)) as client:
        tracked = len(gc.get_objects())
        before = [s["collections"] for s in gc.get_stats()]
        for i in range(requests):
            client.post("/predict", json={"text": texts[i % len(texts)]}).raise_for_status()
        collections = [s["collections"] - b for s, b in zip(gc.get_stats(), before, strict=True)]
        start = time.thread_time()
        gc.collect()
        full_ms = (time.thread_time() - start) * 1000
        gc.freeze()
        start = time.thread_time()
        gc.collect()
        frozen_ms = (time.thread_time() - start) * 1000
        gc.unfreeze()
    return {"tracked_objects": tracked, "full_collection_ms": round(full_ms, 1),
            "full_collection_after_freeze_ms": round(frozen_ms, 1), "requests": requests,
            "collections_per_generation": collections}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.costs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="server/default_model")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--sentences", type=int, default=100, help="model: SST-2 dev sentences, one at a time")
    p.add_argument("--requests", type=int, default=3000, help="gc: /predict calls")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, rows = load_examples(args.data, "dev")
        report = {"model": model_costs(args.checkpoint, rows.texts[: args.sentences]),
                  "gc": gc_costs(args.checkpoint, rows.texts, args.requests)}
    finally:
        torch.set_num_threads(threads)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
