"""The peer: what a user writes by hand to serve a Hugging Face classifier -- FastAPI + a
transformers `pipeline`, no exits. Same request shape as exitserve's /predict (text, list of texts).

    PEER_MODEL=path/to/exported-hf-model uvicorn exitserve.loadtest.peer_pipeline:app --port 8001
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

classifier = pipeline("text-classification", model=os.environ.get("PEER_MODEL", "."), device=-1)
app = FastAPI(title="transformers pipeline peer")


class Request(BaseModel):
    text: str | list[str]


@app.get("/ready")
def ready() -> dict:
    return {"status": "ready"}


@app.post("/predict")
def predict(req: Request):
    out = classifier(req.text, truncation=True, max_length=128)
    return out[0] if isinstance(req.text, str) else {"results": out}
