"""Several models in one server (server/registry.py): naming, threads, versions, every API by name,
metrics per model; and a reload in place: validated before the switch, the old version drained."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import threading
import weakref

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exitserve.models.checkpoint import WEIGHTS
from exitserve.server.main import run
from exitserve.server.registry import (
    ModelLoadError,
    ModelNotNamed,
    ModelRegistry,
    UnknownModel,
    model_version,
    threads_per_model,
)
from exitserve.server.settings import Settings
from tests.server.conftest import make_client

TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is a mess", "fine", "an utter delight"]


def test_names_threads_and_versions(tiny_checkpoint, tiny_other_checkpoint, tmp_path):
    assert threads_per_model(Settings(), 1) is None  # one model: ONNX Runtime's own choice
    assert threads_per_model(Settings(ort_threads=3), 2) == 3  # set: per model
    assert threads_per_model(Settings(), 64) == 1  # never below one
    with pytest.raises(ValueError, match="model name"):
        Settings(models={"a/b": tiny_checkpoint})
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    assert model_version(copy) == model_version(tiny_checkpoint) != model_version(tiny_other_checkpoint)
    config = copy / "exit_config.json"
    config.write_text(config.read_text().replace('"default_threshold": 0.55', '"default_threshold": 0.6'))
    assert model_version(copy) != model_version(tiny_checkpoint)  # a recalibrated threshold is a new version


def test_the_models_setting_is_json_in_the_environment(monkeypatch, tiny_checkpoint, tiny_pair_checkpoint):
    monkeypatch.setenv("EXITSERVE_MODELS", json.dumps({"sst": str(tiny_checkpoint), "sts": str(tiny_pair_checkpoint)}))
    assert Settings().models == {"sst": tiny_checkpoint, "sts": tiny_pair_checkpoint}


def test_every_api_addresses_each_model_by_name(tiny_checkpoint, tiny_pair_checkpoint):
    with make_client(tiny_checkpoint, models={"sst": tiny_checkpoint, "sts": tiny_pair_checkpoint},
                     warmup=False) as c:
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["sst", "sts"]
        assert c.get("/info", params={"model": "sts"}).json()["task"] == "stsb"
        assert "serves sst, sts" in c.get("/info").json()["error"]["message"]
        assert c.post("/predict", json={"text": "x", "model": "sst"}).json()["prediction"] in ("negative", "positive")
        pair = c.post("/predict", json={"text": "x", "text_pair": "y", "model": "sts"})
        assert isinstance(pair.json()["prediction"], float) and pair.headers["x-model"] == "sts"
        assert c.post("/predict", json={"text": "x"}).status_code == 422  # several models: name one
        assert c.post("/predict", json={"text": "x", "model": "nope"}).status_code == 404
        assert c.post("/models/sst", json={"inputs": "x"}).headers["x-model"] == "sst"
        assert c.post("/", json={"inputs": "x", "model": "sst"}).status_code == 200
        pair_tensors = [{"name": n, "shape": [1], "datatype": "BYTES", "data": [n]} for n in ("text", "text_pair")]
        assert c.post("/v2/models/sts/infer", json={"inputs": pair_tensors}).status_code == 200
        metrics = c.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(metrics)}  # valid exposition: one family each
    served = {s.labels["model"] for s in families["exitserve_predictions"].samples if "model" in s.labels}
    assert served == {"sst", "sts"}
    versions = {(s.labels["model"], s.value) for s in families["exitserve_model_version"].samples}
    assert versions == {("sst", 1.0), ("sts", 1.0)}
    durations = {s.labels["model"] for s in families["exitserve_request_duration_seconds"].samples}
    assert durations == {"sst", "sts"}


def test_a_model_that_fails_to_load_stops_start_up_naming_it(tiny_checkpoint, tmp_path, capsys):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    (broken / WEIGHTS).write_bytes((broken / WEIGHTS).read_bytes()[:1000])
    code = run(Settings(models={"good": tiny_checkpoint, "toxicity": broken}))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("exitserve serve: cannot start: model 'toxicity'") and "corrupt or truncated" in err


def answers(registry: ModelRegistry, name: str | None = None) -> list[tuple[str, int]]:
    async def ask():
        with registry.lease(name) as model:
            outcome = await model.service.predict(TEXTS)
        return [(p.label_id, p.exit_layer) for p in outcome.predictions]

    return ask()


def test_reload_switches_after_warm_up_and_drains_the_old_version(tiny_checkpoint, tiny_other_checkpoint, tmp_path):
    """A request on the old version when the switch happens finishes there; the old scheduler stops only
    then; later requests get the new version; the old version is freed."""
    link = tmp_path / "current"
    link.symlink_to(tiny_checkpoint)

    async def main():
        registry = ModelRegistry.load(Settings(checkpoint=link))
        await registry.start()
        old = registry.get()
        before = await answers(registry)
        gate, entered = threading.Event(), threading.Event()
        run = old.service.backend.run  # the step the default policy takes

        def held(*args, **kwargs):
            entered.set()
            gate.wait(30)
            return run(*args, **kwargs)

        old.service.backend.run = held
        in_flight = asyncio.ensure_future(answers(registry))
        await asyncio.to_thread(entered.wait, 30)
        link.unlink()
        link.symlink_to(tiny_other_checkpoint)  # what SIGHUP re-reads: the same path, a new version
        reload = asyncio.ensure_future(registry.reload("current"))
        while registry.get() is old:  # loaded and warmed up beside the old one, then switched
            await asyncio.sleep(0.01)
        assert old.leases == 1 and not reload.done() and old.service.scheduler._thread.is_alive()
        after = await answers(registry)  # served by the new version while the old one drains
        gate.set()
        assert await in_flight == before
        outcome = await reload
        assert not old.service.scheduler._thread.is_alive()
        assert outcome["changed"] and outcome["previous"] == old.version == model_version(tiny_checkpoint)
        assert registry.get().version == outcome["version"] == model_version(tiny_other_checkpoint)
        unchanged = await registry.reload("current")
        freed = weakref.ref(old.service)
        registry.stop()
        return before, after, unchanged, registry.metrics, freed

    before, after, unchanged, metrics, freed = asyncio.run(main())
    assert after != before  # the other model answers differently
    assert not unchanged["changed"]
    done = {"model": "current", "outcome": "done"}
    assert metrics.registry.get_sample_value("exitserve_model_reloads_total", done) == 1
    gc.collect()
    assert freed() is None  # nothing keeps the old version alive


def test_a_damaged_checkpoint_is_refused_and_the_old_version_keeps_serving(tiny_checkpoint, tmp_path):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    (broken / WEIGHTS).write_bytes(b"not safetensors")

    async def main():
        registry = ModelRegistry.load(Settings(checkpoint=tiny_checkpoint))
        await registry.start()
        old = registry.get()
        with pytest.raises(ModelLoadError, match="corrupt or truncated"):
            await registry.reload("tiny-sst2", broken)
        with pytest.raises(ModelLoadError, match="does not exist"):
            await registry.reload("tiny-sst2", tmp_path / "missing")
        with pytest.raises(UnknownModel):
            await registry.reload("nope")
        assert registry.get() is old and old.service.ready
        result = await answers(registry)
        registry.stop()
        return result, registry.metrics

    result, metrics = asyncio.run(main())
    assert len(result) == len(TEXTS)
    refused = {"model": "tiny-sst2", "outcome": "refused"}
    assert metrics.registry.get_sample_value("exitserve_model_reloads_total", refused) == 2


def test_several_models_need_a_name_and_one_does_not(tiny_checkpoint, tiny_other_checkpoint):
    registry = ModelRegistry(Settings())
    assert registry.sole() is None and not registry.ready
    registry = ModelRegistry.load(Settings(models={"a": tiny_checkpoint, "b": tiny_other_checkpoint}, ort_threads=1))
    with pytest.raises(ModelNotNamed, match="serves a, b"):
        registry.get()
    assert registry.get("b").name == "b" and registry.sole() is None
    assert registry.get("a").service.backend.name == "onnxruntime"
