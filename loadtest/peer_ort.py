"""The strongest peer: the same fine-tuned model run WHOLE, at full depth, on ONNX Runtime behind a
minimal FastAPI app -- what a user who only swaps the runtime would serve.

The graph is built the way optimum builds it (optimum's `ORTModelForSequenceClassification` +
`ORTOptimizer`, which cannot be installed beside this project: optimum-onnx 0.1 pins
transformers < 4.58): `torch.onnx.export` of the stock HF classifier written by `exitserve export`
(eager attention, the pattern ORT's fusions recognise; dynamic batch and sequence axes), then
`onnxruntime.transformers.optimizer` (EmbedLayerNormalization, Attention, SkipLayerNormalization,
BiasGelu fused), loaded with `ORT_ENABLE_ALL` on the CPU provider. `build` checks that the fused
graph reproduces the PyTorch logits on a padded batch (so padding is masked) before anyone serves it.

    python -m exitserve.loadtest.peer_ort build runs/sst2-hf          # writes runs/sst2-hf/model_optimized.onnx
    PEER_MODEL=runs/sst2-hf uvicorn --factory exitserve.loadtest.peer_ort:create_app --port 8001

Same request shape as exitserve's /predict (`text`: a string or a list); one `session.run` per
request in FastAPI's thread pool, no batching across requests (infinity-emb is the batching peer).
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel

ONNX_FILE, OPTIMIZED_FILE = "model.onnx", "model_optimized.onnx"
PROBE = ["hi", "a longer probe sentence, so that the first row of the batch is padded"]


def build(model_dir: str | Path, opset: int = 17) -> Path:
    """Export `model_dir` (a HF classifier) to ONNX and fuse it; returns the optimised graph's path."""
    import torch
    from onnxruntime.transformers import optimizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    probe = tokenizer(PROBE, padding=True, return_tensors="pt")
    names = [n for n in inspect.signature(model.forward).parameters if n in probe]  # the forward's order
    with torch.inference_mode():
        expected = model(**probe).logits.numpy()
    raw = model_dir / ONNX_FILE
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    torch.onnx.export(model, ({n: probe[n] for n in names},), raw, input_names=names, output_names=["logits"],
                      dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=opset, dynamo=False)
    config = model.config
    fused = optimizer.optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                                     hidden_size=config.hidden_size)
    out = model_dir / OPTIMIZED_FILE
    fused.save_model_to_file(str(out))
    got = WholeGraph(model_dir, threads=1).logits(PROBE)
    if not np.allclose(got, expected, atol=1e-4):
        raise ValueError(f"the fused ONNX graph does not reproduce the model's logits (max diff "
                         f"{np.abs(got - expected).max():.2e})")
    return out


class PredictRequest(BaseModel):
    text: str | list[str]


class WholeGraph:
    """The fused graph in one ORT session, with its tokenizer: texts -> logits."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, max_length: int = 128,
                 shared_pool: bool = False):
        import onnxruntime as ort
        from transformers import AutoConfig, AutoTokenizer

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if shared_pool:  # the process runs every session on one global pool (ORT then requires this)
            options.use_per_session_threads = False
        elif threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(model_dir) / OPTIMIZED_FILE), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.labels = AutoConfig.from_pretrained(model_dir).id2label
        self.max_length = max_length

    def logits(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        return self.session.run(None, {name: batch[name].astype(np.int64) for name in self.inputs})[0]

    def classify(self, texts: list[str]) -> list[dict]:
        logits = self.logits(texts)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return [{"label": self.labels[int(p.argmax())], "score": float(p.max())} for p in probs]


def create_app():
    """The app (uvicorn --factory): PEER_MODEL is the exported model directory after `build`;
    PEER_THREADS, if set, ORT's intra-op threads (default: ORT's choice, one per core)."""
    from fastapi import FastAPI

    threads = int(os.environ["PEER_THREADS"]) if os.environ.get("PEER_THREADS") else None
    graph = WholeGraph(os.environ.get("PEER_MODEL", "."), threads)
    app = FastAPI(title="ONNX Runtime whole-model peer")

    @app.get("/ready")
    def ready() -> dict:
        return {"status": "ready"}

    @app.post("/predict")
    def predict(req: PredictRequest):
        out = graph.classify([req.text] if isinstance(req.text, str) else req.text)
        return out[0] if isinstance(req.text, str) else {"results": out}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.peer_ort", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["build"])
    p.add_argument("model_dir", help="a HF classifier directory (`exitserve export` output)")
    args = p.parse_args(argv)
    print(f"wrote {build(args.model_dir)}")


if __name__ == "__main__":
    main()
