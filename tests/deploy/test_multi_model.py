"""Several models behind one endpoint (issue 13 item 3), end to end: three registered models on
the same EfficientNet-Lite0 backbone (different CIFAR-10 class subsets) in one Ray Serve app with
the default engine, real MLflow registry, real HTTP. One application for the module, in file order:
routes -> per-model admin and monitoring -> hot reload of one model onto another backbone.

Plus an in-process check (no Ray) that requests of different models ride in ONE forward pass.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import HEAD_CLASSES, LITE0, NEW_CLASS, ServedApp, free_port, register_in_tmp_store  # noqa: E402

APP, TOKEN = "tlpipe-multi", "multi-token"
# model name -> its head's classes; "cifar-a" is the conftest's predictor
CLASSES = {"cifar-a": HEAD_CLASSES, "cifar-b": ("cat", "deer", "ship"), "cifar-c": ("dog", "horse", "truck")}
CLEAR = 0.6  # in-process top probability a test photo must reach (engines differ a little)


@dataclass
class Multi:
    dirs: dict  # name -> predictor dir (v1)
    photos: dict  # name -> [(path, label, score)] answered clearly and rightly in process
    b_v2: Path  # cifar-b refitted on Lite0 at 80 px: another backbone fingerprint
    b_v2_photos: list


def _fit(backbone, classes, cifar10_dir, out: Path):
    from feature_store.index import SupportIndex
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor
    from pipeline.preprocess import load_pixels

    spec = backbone.spec

    def embed(paths):
        return backbone.embed(np.stack([load_pixels(p, spec) for p in paths]))

    train = [(p, c) for c in classes for p in sorted((cifar10_dir / "train" / c).glob("*.jpg"))[:30]]
    test = [(p, c) for c in classes for p in sorted((cifar10_dir / "test" / c).glob("*.jpg"))[:10]]
    X = embed([p for p, _ in train])
    head = LinearProbe(weight_decays=[0.1], max_iter=200, n_threads=1).fit(X, [c for _, c in train])
    support = SupportIndex(X.shape[1])
    support.add(X, [c for _, c in train])
    predictor = Predictor(spec, head, support=support, knn_k=3, top_k=3)
    predictor.save(out)
    preds = predictor.predict_embeddings(embed([p for p, _ in test]))
    clear = [(p, c, q.score) for (p, c), q in zip(test, preds) if q.label == c and q.score >= CLEAR]
    if {c for _, c, _ in clear} != set(classes):
        raise AssertionError(f"no clear photo of every class of {classes}: {[(p.name, c) for p, c, _ in clear]}")
    return out, clear


@pytest.fixture(scope="module")
def multi(serving_model, lite0_64, cifar10_dir, tmp_path_factory) -> Multi:
    from pipeline.backbones import load_backbone

    root = tmp_path_factory.mktemp("multi-models")
    dirs, photos = {"cifar-a": serving_model.predictor_dir}, {}
    photos["cifar-a"] = [(p.path, p.label, None) for p in serving_model.classifier]
    backbone = load_backbone(lite0_64, engine="torch")
    for name in ("cifar-b", "cifar-c"):
        dirs[name], photos[name] = _fit(backbone, CLASSES[name], cifar10_dir, root / name)
    b_v2, b_v2_photos = _fit(load_backbone(lite0_64.replace(input_size=80), engine="torch"), CLASSES["cifar-b"],
                             cifar10_dir, root / "b-v2")
    return Multi(dirs, photos, b_v2, b_v2_photos)


@dataclass
class Served(ServedApp):
    root: Path
    tracking_uri: str
    versions: dict


@pytest.fixture(scope="module")
def served(ray_serve, multi, tmp_path_factory):
    """The three models registered at @champion; `tlpipe serve`'s preflight (every reference
    resolved in the driver) gives the distinct backbones; one app with a Backbone deployment each."""
    import httpx
    from ray import serve

    from deploy.app import build_app
    from deploy.preflight import check_models, distinct_backbones

    root = tmp_path_factory.mktemp("multi-state")
    versions = {}
    for name, d in multi.dirs.items():
        tracking_uri, _, versions[name] = register_in_tmp_store(root, "multi", d, name)
    refs = [f"{name}@champion" for name in multi.dirs]
    keys = distinct_backbones(check_models(refs, tracking_uri=tracking_uri, state_root=str(root)))
    assert len(keys) == 1  # three models, one backbone
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    app = build_app(refs, tracking_uri=tracking_uri, state_root=str(root), poll_interval_s=0.5, admin_token=TOKEN,
                    decode_threads=2, max_batch_size=8, ingress_options=small, backbone_options=small,
                    backbone_keys=keys)  # the default engine: OpenVINO on a CPU
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    with httpx.Client(timeout=60.0) as client:
        s = Served(f"http://127.0.0.1:{port}", client, root, tracking_uri, versions)
        assert s.get("/readyz").json()["status"] == "ready"
        yield s
    serve.shutdown()


def _photo(path: Path):
    return [("file", (path.name, path.read_bytes(), "image/jpeg"))]


def test_each_model_answers_from_its_own_head_on_one_backbone(served, multi):
    from ray import serve

    listed = served.get("/v1/models").json()
    assert [m["name"] for m in listed["models"]] == list(CLASSES)
    (group,) = listed["shared_backbones"]  # one fingerprint, all three models share it
    assert group["models"] == list(CLASSES) and group["backbones"] == [LITE0]
    for name, classes in CLASSES.items():
        info = served.get(f"/v1/models/{name}").json()
        assert (info["name"], info["version"], info["alias"]) == (name, served.versions[name], "champion")
        assert info["classes"] == list(classes) and info["fingerprint"] == group["fingerprint"]
        assert info["engine"] == "openvino"
        for path, label, score in multi.photos[name][:3]:
            r = served.post(f"/v1/models/{name}/predict", files=_photo(path))
            assert r.status_code == 200, r.text
            (p,) = r.json()["predictions"]
            assert (p["label"], p["model"]) == (label, f"{name}@{served.versions[name]}"), path
            assert {t["label"] for t in p["top_k"]} <= set(classes)
            if score is not None:
                assert p["top_k"][0]["score"] == pytest.approx(score, abs=0.05)
    # the same airplane photo through another model: that model's head answers, in its classes
    airplane = multi.photos["cifar-a"][0][0]
    (p,) = served.post("/v1/models/cifar-b/predict", files=_photo(airplane)).json()["predictions"]
    assert p["label"] in CLASSES["cifar-b"] and p["model"].startswith("cifar-b@")

    r = served.post("/v1/models/nope/predict", files=_photo(airplane))
    assert (r.status_code, r.json()["error"]) == (404, "unknown_model")
    assert all(name in r.json()["message"] for name in CLASSES)
    r = served.post("/v1/predict", files=_photo(airplane))  # several models: the name is required
    assert (r.status_code, r.json()["error"]) == (404, "model_required")
    assert r.json()["details"] == [{"models": list(CLASSES)}]

    status = serve.status().applications[APP]
    assert set(status.deployments) == {"Ingress", "Backbone"}  # one backbone deployment for three models
    loaded = serve.get_deployment_handle("Backbone", app_name=APP).batching.remote().result()["loaded"]
    assert loaded == [{"backbone": LITE0, "engine": "openvino"}]


def test_admin_monitoring_and_metrics_are_per_model(served, serving_model):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = served.post(f"/v1/models/cifar-b/classes/{NEW_CLASS}/examples", headers=auth,
                    files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in serving_model.new_class_examples])
    assert r.status_code == 200, r.text
    assert r.json()["model"] == f"cifar-b@{served.versions['cifar-b']}" and len(r.json()["added"]) == 10
    b = {c["name"]: c for c in served.get("/v1/models/cifar-b/classes").json()["classes"]}
    a = {c["name"] for c in served.get("/v1/models/cifar-a/classes").json()["classes"]}
    assert b[NEW_CLASS]["added_examples"] == 10 and b[NEW_CLASS]["needs_retraining"] and NEW_CLASS not in a
    assert (served.root / "serve" / "cifar-b" / "support" / "examples.jsonl").is_file()
    assert not (served.root / "serve" / "cifar-a" / "support" / "examples.jsonl").exists()
    assert served.post("/v1/models/cifar-a/reload", headers={"Authorization": "Bearer wrong"}).status_code == 403

    counted = {}
    for name in CLASSES:
        mon = served.get(f"/v1/models/{name}/monitor").json()
        label = f"{name}@{served.versions[name]}"
        assert mon["current"] == label and set(mon["models"]) == {label}
        counted[name] = mon["models"][label]["images_total"]
    assert counted == {"cifar-a": 3, "cifar-b": 4, "cifar-c": 3}  # the previous test's requests, per model
    assert served.get("/v1/monitor").json()["error"] == "model_required"

    text = served.get("/metrics").text
    for name in CLASSES:
        assert f'tlpipe_model_info{{name="{name}",version="{served.versions[name]}"}} 1.0' in text
    assert 'tlpipe_support_added_examples{model="cifar-b"} 10.0' in text


def test_serve_checks_every_model_before_starting(served, monkeypatch):
    """`tlpipe serve` with several models: every wrong reference named in one `error:` line, exit 2,
    nothing started; a model given twice is refused the same way."""
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served.tracking_uri)
    for refs, expected in ((["cifar-a@champion", "nope@champion", "cifar-c@staging"],
                            ["nope@champion: ", "cifar-c@staging: ", "cifar-c has versions 1; aliases: champion -> 1"]),
                           (["cifar-a@champion", "cifar-a/1"], ["'cifar-a' is given twice"])):
        argv = ["serve", "--root", str(served.root), "--port", str(free_port())]
        res = CliRunner().invoke(app, argv + [a for ref in refs for a in ("--model", ref)])
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
        assert all(e in errors[0] for e in expected) and "cifar-a@champion:" not in errors[0], errors[0]


def test_hot_reload_moves_one_model_onto_another_backbone(served, multi):
    """cifar-b@champion moves to a version on Lite0 @80 px (another fingerprint): only cifar-b
    reloads; its new backbone is loaded by the running Backbone deployment (no deployment of its
    own until the app is redeployed), its added examples are re-embedded; the others are untouched."""
    from ray import serve

    before = {name: served.get(f"/v1/models/{name}").json() for name in CLASSES}
    _, _, v2 = register_in_tmp_store(served.root, "multi", multi.b_v2, "cifar-b")
    deadline = time.time() + 60
    while time.time() < deadline and served.get("/v1/models/cifar-b").json()["version"] != v2:
        time.sleep(0.3)
    after = {name: served.get(f"/v1/models/{name}").json() for name in CLASSES}
    assert (after["cifar-b"]["version"], after["cifar-b"]["input_size"]) == (v2, 80)
    assert after["cifar-b"]["fingerprint"] != before["cifar-b"]["fingerprint"]
    assert after["cifar-b"]["added_examples"] == 10  # re-embedded with the new backbone
    for name in ("cifar-a", "cifar-c"):
        assert after[name]["loaded_at"] == before[name]["loaded_at"] and after[name]["version"] == before[name]["version"]
    for path, label, score in multi.b_v2_photos[:3]:
        (p,) = served.post("/v1/models/cifar-b/predict", files=_photo(path)).json()["predictions"]
        assert (p["label"], p["model"]) == (label, f"cifar-b@{v2}")
    (p,) = served.post("/v1/models/cifar-a/predict", files=_photo(multi.photos["cifar-a"][0][0])).json()["predictions"]
    assert p["label"] == multi.photos["cifar-a"][0][1]
    groups = served.get("/v1/models").json()["shared_backbones"]
    assert sorted(g["models"] for g in groups) == [["cifar-a", "cifar-c"], ["cifar-b"]]
    loaded = serve.get_deployment_handle("Backbone", app_name=APP).batching.remote().result()["loaded"]
    assert len(loaded) == 2 and set(serve.status().applications[APP].deployments) == {"Ingress", "Backbone"}


def test_requests_of_different_models_share_one_forward_pass(multi, lite0_64, tmp_path, monkeypatch):
    """In process, no Ray: three models' services on one batched embedder over a real OpenVINO
    backbone. While a forward pass runs, one request per model arrives: the three ride in the
    next pass together (one embedding, three heads), and each gets its own head's answer."""
    from ray import serve
    from ray.serve import batching

    from deploy.app import BatchedEmbedder
    from deploy.backbone import BackbonePool, backbone_identity
    from deploy.models import ModelSet, per_model_settings
    from deploy.service import ImageInput

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)

    class SlowFirstPool(BackbonePool):  # the real pool; the first pass is held 0.3 s longer
        def __init__(self):
            super().__init__("openvino")
            self.passes = []

        def embed_many(self, keys, pixels):  # (requests, distinct backbones = forward passes) per batch
            self.passes.append((len(keys), len({backbone_identity(k) for k in keys})))
            if len(self.passes) == 1 + len(CLASSES):  # after the three probes at start: keep it busy
                time.sleep(0.3)
            return super().embed_many(keys, pixels)

    Isolated = type("Isolated", (BatchedEmbedder,), {
        "_batch": serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)(BatchedEmbedder._batch.__wrapped__)})

    async def scenario():
        pool = SlowFirstPool()
        embedder = Isolated(pool)
        embedder.configure(max_batch_size=16, batch_wait_timeout_s=0.5)
        settings = per_model_settings([str(d) for d in multi.dirs.values()],
                                      {"state_root": str(tmp_path), "poll_interval_s": 0, "monitor": False},
                                      environ={})
        models = ModelSet.build(settings, embedder)
        for s in models.services.values():  # one at a time: each start probes the backbone once
            await s.start()
        embedder.forward_s = 0.3  # passes take 0.3 s here: while one runs, the window is the full 0.5 s
        first = asyncio.create_task(models.get(multi.dirs["cifar-a"].name).predict(
            [ImageInput(multi.photos["cifar-a"][0][0].read_bytes())]))
        await asyncio.sleep(0.1)  # the held pass is running now
        asks = {name: multi.photos[name][1] for name in CLASSES}
        rest = await asyncio.gather(*(models.get(multi.dirs[name].name).predict([ImageInput(path.read_bytes())])
                                      for name, (path, _, _) in asks.items()))
        await first
        return pool, asks, rest

    pool, asks, rest = asyncio.run(scenario())
    # 3 probes, the held pass, then ONE forward pass for the three models' requests (their spec
    # keys differ in params_m, which the loaded backbone fills in; the fingerprint is the same)
    assert pool.passes == [(1, 1)] * 4 + [(3, 1)], pool.passes
    assert pool.loaded() == [{"backbone": LITE0, "engine": "openvino"}]
    for (name, (_, label, _)), (state, preds) in zip(asks.items(), rest):
        assert preds[0].label == label and set(state.base.classes) == set(CLASSES[name])
