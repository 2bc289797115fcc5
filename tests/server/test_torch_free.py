"""A server on ONNX Runtime never imports torch or transformers once its graphs are built: the tokenizer
runs from tokenizer.json, the graphs carry the weights (models/served.py)."""

from __future__ import annotations

import subprocess
import sys

from exitserve.models.backends import create_backend
from exitserve.models.checkpoint import load_checkpoint

SERVE_ONE = """
import asyncio, sys
import exitserve.server.main  # the whole server: every API's routes, the registry, uvicorn's set-up
from exitserve.server.service import PredictionService
from exitserve.server.settings import Settings
from exitserve.cli import build_parser
build_parser().parse_args(["serve"])
service = PredictionService.load(Settings(checkpoint=sys.argv[1], warmup=False))
async def main():
    await service.start()
    out = await service.predict(["a gorgeous, witty, seductive movie."])
    service.stop()
    return out
outcome = asyncio.run(main())
print(outcome.predictions[0].exit_layer, "torch" in sys.modules, "transformers" in sys.modules)
"""


def test_serving_on_onnxruntime_imports_neither_torch_nor_transformers(tiny_checkpoint):
    create_backend(load_checkpoint(tiny_checkpoint), "onnxruntime")  # the graphs, built (that needs torch)
    done = subprocess.run([sys.executable, "-c", SERVE_ONE, str(tiny_checkpoint)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    layer, torch_loaded, transformers_loaded = done.stdout.split()
    assert int(layer) >= 1 and (torch_loaded, transformers_loaded) == ("False", "False")
