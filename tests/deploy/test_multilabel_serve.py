"""Multi-label models served end to end (issue 16 items 4-5), on real photos over real HTTP.

A `MultiLabelPredictor` is trained here with the pipeline's own code on real CIFAR-10 mosaics
(`tests.multilabel_mosaics`: one to three vehicle photos per image, labels = the classes shown):
EfficientNet-Lite0 with its real weights at 96 px (ONNX Runtime), a one-vs-rest probe whose
per-label thresholds are tuned on validation mosaics, a FAISS support index keyed by label set,
a drift reference. It is registered in a real MLflow store and served beside the serving tests'
single-label model by ONE Ray Serve app (`--model mosaics@champion --model <dir>/cifar3`) with
capture on. In file order: label lists over HTTP == the in-process predictor == the MLflow pyfunc
model -> abstain is an empty list -> model info shows the task and per-label thresholds
-> a label added through the admin route is answered by the k-NN fallback -> monitoring counts
each label -> `tlpipe predict` prints the label lists.

The photos a test asserts on are picked in process with a margin from every threshold (as
tests/deploy/conftest.py does), so engine noise cannot flip them.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import ServedApp, free_port, lite0_embedder, register_in_tmp_store  # noqa: E402

from tests.multilabel_mosaics import build_mosaics, read_manifest  # noqa: E402

CLASSES = ("airplane", "automobile", "ship", "truck")
UNSEEN = ("bird", "cat", "deer", "dog", "frog", "horse")  # single-tile mosaics: abstentions, a new label
ML, SL = "mosaics", "cifar3"
APP, TOKEN = "tlpipe-multilabel", "ml-token"
KNN_K, KNN_THRESHOLD = 5, 0.6
MARGIN = 0.03  # a picked photo's scores stay this far from every threshold (engines differ a little)
EXAMPLES = 10  # support examples of the new label sent through the admin route
ABSTAIN_SENT = 3  # abstaining photos sent (at most)


@dataclass
class MLModel:
    dir: Path
    thresholds: dict
    reference_prior: dict  # the drift reference's prior over label-set keys
    clear: list  # [(path, true labels, in-process answer dict)] decided clearly
    abstain: list  # [path] abstaining clearly (no label passes, no vote reaches knn_threshold)
    new_label: str
    examples: list  # [path] of the new label
    new_query: Path  # abstains / falls back before the examples, answered new_label after


def _votes(support, X):
    from pipeline.multilabel.predictor import vote_label_sets

    scores, keys, _ = support.search(X, KNN_K)
    return vote_label_sets(scores, keys)


def _vote_clear(vote: dict) -> bool:
    return all(abs(v - KNN_THRESHOLD) >= MARGIN for v in vote.values())


@pytest.fixture(scope="module")
def ml_model(cifar10_dir, tmp_path_factory) -> MLModel:
    from feature_store.index import SupportIndex
    from pipeline.multilabel.labelsets import label_key
    from pipeline.multilabel.predictor import MultiLabelPredictor
    from pipeline.multilabel.probe import OneVsRestProbe

    spec, embed = lite0_embedder(96)

    root = tmp_path_factory.mktemp("ml-serve")
    mosaics = dict(classes=list(CLASSES), min_tiles=1, max_tiles=3)
    train = read_manifest(build_mosaics(cifar10_dir, root / "train", 150, seed=1, **mosaics))
    val = read_manifest(build_mosaics(cifar10_dir, root / "val", 60, seed=2, skip=150, **mosaics))
    query = read_manifest(build_mosaics(cifar10_dir, root / "query", 16, split="test", seed=3, **mosaics))
    pool = {c: [Path(p) for p, _ in read_manifest(build_mosaics(
        cifar10_dir, root / c, 40, split="test", seed=5, classes=[c], min_tiles=1, max_tiles=1))] for c in UNSEEN}
    X_tr, X_val = embed([p for p, _ in train]), embed([p for p, _ in val])
    head = OneVsRestProbe(weight_decays=[0.1, 1.0], n_threads=1).fit(
        X_tr, [labs for _, labs in train], X_val, [labs for _, labs in val], classes=list(CLASSES))
    keys = [label_key(labs) for _, labs in train]
    support = SupportIndex(X_tr.shape[1])
    support.add(X_tr, keys)
    predictor = MultiLabelPredictor(spec, head, support=support, knn_k=KNN_K, knn_threshold=KNN_THRESHOLD,
                                    top_k=3, info={"task": "multilabel", "test": "serve"})
    predictor.fit_reference(X_tr, keys, seed=0)
    thr = np.asarray(head.thresholds_)

    def decided(X):
        """(answers, clear?, no label near passing?) per row, with the model as it is now."""
        P = head.predict_proba(X)
        near = np.abs(P - thr) < MARGIN
        low = (P <= thr - MARGIN).all(axis=1)
        votes = _votes(predictor.support, X)
        answers = predictor.predict_embeddings(X)
        clear = [not near[i].any() and (a.decision == "classifier" or _vote_clear(votes[i]))
                 for i, a in enumerate(answers)]
        return answers, clear, low

    X_q = embed([Path(p) for p, _ in query])
    answers, clear, _ = decided(X_q)
    picked = [(Path(p), labs, a.to_dict()) for (p, labs), a, ok in zip(query, answers, clear) if ok]
    abstain, new = [], None
    for c in UNSEEN:
        X_c = embed(pool[c])
        answers, clear, low = decided(X_c)
        abstain += [p for p, a, ok in zip(pool[c], answers, clear) if ok and a.decision == "abstain"]
        picked += [(p, (c,), a.to_dict()) for p, a, ok in zip(pool[c], answers, clear)
                   if ok and a.decision == "fallback"][:2]  # the fallback voting trained label sets
        if new is None:  # c as a support-only label: its examples make the fallback answer it
            votes = _votes(support.with_added(X_c[:EXAMPLES], [c] * EXAMPLES), X_c)
            hits = [i for i in range(EXAMPLES, len(X_c)) if low[i] and votes[i].get(c, 0) >= KNN_THRESHOLD + MARGIN
                    and all(v <= KNN_THRESHOLD - MARGIN for lab, v in votes[i].items() if lab != c)]
            if hits:
                new = (c, pool[c][:EXAMPLES], pool[c][hits[0]])
    decisions = {a["decision"] for _, _, a in picked}
    if new is None or not abstain or decisions != {"classifier", "fallback"} or len(picked) < 8:
        raise AssertionError(f"the fixture found {len(picked)} clear answers ({decisions}), {len(abstain)} "
                             f"abstentions and new label {new and new[0]}; thresholds {thr.round(3)}: "
                             "adjust the mosaics")
    out = root / "predictor"
    predictor.save(out)
    return MLModel(out, predictor.thresholds, predictor.reference.class_prior, picked[:24], abstain,
                   new[0], new[1], new[2])


@dataclass
class Served(ServedApp):
    root: Path
    tracking_uri: str
    capture: Path


@pytest.fixture(scope="module")
def served(ray_serve, ml_model, serving_model, tmp_path_factory):
    """The multi-label model registered @champion in an MLflow store, the single-label one from its
    folder; one app serving the two (colocated backbones, ONNX Runtime) with capture on."""
    import httpx
    from ray import serve

    from deploy.app import build_app

    root = tmp_path_factory.mktemp("ml-state")
    capture = tmp_path_factory.mktemp("ml-capture")
    tracking_uri, _, _ = register_in_tmp_store(root, "ml-serve", ml_model.dir, ML)
    single = shutil.copytree(serving_model.predictor_dir, root / SL)  # served from its folder, named SL
    app = build_app([f"{ML}@champion", str(single)], tracking_uri=tracking_uri, state_root=str(root),
                    engine="onnx", poll_interval_s=0, admin_token=TOKEN, decode_threads=2, max_batch_size=8,
                    batch_wait_timeout_s=0.005, ingress_options={"ray_actor_options": {"num_cpus": 0.1}},
                    colocate_backbone=True, capture=str(capture))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    with httpx.Client(timeout=120.0) as client:
        s = Served(f"http://127.0.0.1:{port}", client, root, tracking_uri, capture)
        assert s.get("/readyz").json()["status"] == "ready"
        yield s
    serve.delete(APP)
    serve.shutdown()


def _files(paths):
    return [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def _names(labels):
    return [d["label"] for d in labels]


# ---------------------------------------------------------------------------- predict
def test_label_lists_match_the_predictor_and_the_pyfunc_model(served, ml_model):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    paths = [p for p, _, _ in ml_model.clear]
    r = served.post(f"/v1/models/{ML}/predict", files=_files(paths))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "multilabel" and body["model"] == f"{ML}@1"
    preds = body["predictions"]
    for (path, truth, want), got in zip(ml_model.clear, preds):
        assert got["filename"] == path.name
        assert (got["decision"], _names(got["labels"])) == (want["decision"], _names(want["labels"])), path.name
        assert [d["score"] for d in got["labels"]] == pytest.approx([d["score"] for d in want["labels"]], abs=0.02)
        assert got["label"] == want["label"] and got["label"] == "|".join(sorted(_names(got["labels"])))
        assert all(d["score"] >= ml_model.thresholds[d["label"]] for d in got["labels"]
                   if got["decision"] == "classifier")
    # the k-NN fallback voting the support index's label sets answers through the endpoint too
    assert {p["decision"] for p in preds} == {"classifier", "fallback"}
    # real features: most answers name a label the mosaic shows
    shown = [bool(set(_names(p["labels"])) & set(truth)) for (_, truth, _), p in zip(ml_model.clear, preds)
             if p["decision"] == "classifier"]
    assert sum(shown) >= 0.75 * len(shown), shown

    # the registered version, through MLflow's pyfunc flavour: the same label lists
    uri = MlflowClient(tracking_uri=served.tracking_uri).get_model_version_download_uri(ML, "1")
    model = mlflow.pyfunc.load_model(uri)
    rows = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    for (_, row), got in zip(rows.iterrows(), preds):
        assert row["decision"] == got["decision"]
        assert sorted(row["labels"]) == sorted(_names(got["labels"]))


def test_abstain_is_an_empty_list_and_single_label_answers_keep_their_fields(served, ml_model, serving_model):
    r = served.post(f"/v1/models/{ML}/predict", files=_files(ml_model.abstain[:ABSTAIN_SENT]))
    assert r.status_code == 200, r.text
    for p in r.json()["predictions"]:
        assert (p["decision"], p["labels"], p["label"]) == ("abstain", [], None)
        assert len(p["top_k"]) == 3 and all(t["label"] in CLASSES for t in p["top_k"])
        assert p["score"] == p["top_k"][0]["score"]  # the head's best score, below its threshold

    # the single-label model on the same endpoint: its fields as before, plus `labels`
    sure, unsure = serving_model.classifier[0], serving_model.abstain[0]
    r = served.post(f"/v1/models/{SL}/predict", files=[("file", (p.path.name, p.data, "image/jpeg"))
                                                        for p in (sure, unsure)])
    assert r.status_code == 200, r.text
    assert r.json()["task"] == "multiclass"
    a, b = r.json()["predictions"]
    assert (a["decision"], a["label"]) == ("classifier", sure.label)
    assert a["labels"] == [{"label": a["label"], "score": a["score"]}]
    assert b["decision"] == "abstain" and b["label"] is not None and b["labels"] == []


def test_model_info_shows_the_task_and_per_label_thresholds(served, ml_model, serving_model):
    info = served.get(f"/v1/models/{ML}").json()
    assert info["task"] == "multilabel" and info["classes"] == list(CLASSES)
    assert info["threshold"] is None and info["head"] == "OneVsRestProbe"
    assert info["thresholds"] == pytest.approx(ml_model.thresholds)
    assert info["knn_threshold"] == KNN_THRESHOLD and info["knn_k"] == KNN_K
    single = served.get(f"/v1/models/{SL}").json()
    assert single["task"] == "multiclass" and single["thresholds"] is None
    assert single["threshold"] == pytest.approx(serving_model.threshold)
    listed = {m["name"]: m for m in served.get("/v1/models").json()["models"]}
    assert (listed[ML]["task"], listed[SL]["task"]) == ("multilabel", "multiclass")
    # per-label support counts: the label-set keys of the support index split into their labels
    classes = {c["name"]: c for c in served.get(f"/v1/models/{ML}/classes").json()["classes"]}
    assert set(classes) == set(CLASSES) and all(c["in_head"] and c["support_examples"] > 20
                                                for c in classes.values())


# ---------------------------------------------------------------------------- admin
def test_a_label_added_through_the_admin_route_is_answered_by_the_fallback(served, ml_model):
    new, query = ml_model.new_label, ml_model.new_query
    (before,) = served.post(f"/v1/models/{ML}/predict", files=_files([query])).json()["predictions"]
    assert before["decision"] in ("fallback", "abstain") and new not in _names(before["labels"])

    r = served.post(f"/v1/models/{ML}/classes/{new}/examples", files=_files(ml_model.examples),
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    assert r.json()["needs_retraining"] is True and len(r.json()["added"]) == EXAMPLES

    (after,) = served.post(f"/v1/models/{ML}/predict", files=_files([query])).json()["predictions"]
    assert after["decision"] == "fallback" and after["labels"][0]["label"] == new, after
    assert after["labels"][0]["score"] >= KNN_THRESHOLD and after["label"] == "|".join(sorted(_names(after["labels"])))
    classes = {c["name"]: c for c in served.get(f"/v1/models/{ML}/classes").json()["classes"]}
    assert classes[new] == {"name": new, "in_head": False, "support_examples": EXAMPLES,
                            "added_examples": EXAMPLES, "needs_retraining": True}
    # the single-label model beside it is untouched
    assert new not in {c["name"] for c in served.get(f"/v1/models/{SL}/classes").json()["classes"]}


# ---------------------------------------------------------------------------- monitoring
def test_monitoring_counts_each_label_and_capture_keeps_working(served, ml_model):
    from pipeline.monitoring import label_prior

    body = served.get(f"/v1/models/{ML}/monitor").json()
    (model,) = [m for m in body["models"].values() if m["serving"]]
    win = model["windows"][-1]  # the last-N-images window: every request of this module
    sent = len(ml_model.clear) + len(ml_model.abstain[:ABSTAIN_SENT]) + 2  # + the new label's query twice
    assert win["images"] == sent and sum(win["decisions"].values()) == sent
    assert win["predicted"] and not any("|" in lab for lab in win["predicted"])
    assert set(win["predicted"]) <= set(CLASSES) | {ml_model.new_label}
    assert win["prior"] == pytest.approx(label_prior(ml_model.reference_prior))
    assert set(win["prior"]) == set(CLASSES) and sum(win["prior"].values()) > 1.2  # ~2 labels a mosaic
    assert 0.0 <= win["prior_distance"] <= 1.0
    metrics = served.get("/metrics").text
    predicted = [line for line in metrics.splitlines() if line.startswith("tlpipe_monitor_predicted_share{")]
    assert predicted and not any("|" in line for line in predicted)

    # the fallback/abstain images were captured, per model, with their (multi-label) answers
    uncertain = sent - sum(a["decision"] == "classifier" for _, _, a in ml_model.clear)
    deadline = time.time() + 30
    while time.time() < deadline:  # the capture writer is asynchronous
        cap = served.get(f"/v1/models/{ML}/monitor").json()["capture"]
        if cap["written"] >= uncertain:
            break
        time.sleep(0.2)
    assert cap["written"] == uncertain, cap
    records = [json.loads(p.read_text()) for p in (served.capture / ML).glob("*.json")]
    assert len(records) == uncertain and {r["model"] for r in records} == {f"{ML}@1"}
    assert {r["decision"] for r in records} <= {"fallback", "abstain"}
    assert any(r["decision"] == "abstain" and r["label"] is None for r in records)


# ---------------------------------------------------------------------------- CLI
def test_tlpipe_predict_prints_label_lists(ml_model):
    from typer.testing import CliRunner

    from cli.app import app as cli

    picked = ml_model.clear[:4] + [(ml_model.abstain[0], (), {"decision": "abstain", "labels": []})]
    paths = [str(p) for p, _, _ in picked]
    r = CliRunner().invoke(cli, ["predict", "--model", str(ml_model.dir), "--json", *paths])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["image"] for row in rows] == paths
    for row, (_, _, want) in zip(rows, picked):
        assert row["decision"] == want["decision"] and sorted(_names(row["labels"])) == sorted(_names(want["labels"]))
    assert rows[-1]["labels"] == [] and rows[-1]["label"] is None
    r = CliRunner().invoke(cli, ["predict", "--model", str(ml_model.dir), paths[0], paths[-1]])
    assert r.exit_code == 0 and "labels" in r.stdout and "abstain" in r.stdout, r.output


def test_windows_count_each_label_of_a_multilabel_answer():
    from pipeline.drift import prior_distance
    from pipeline.monitoring import DecisionWindows, label_prior

    class Ref:  # what DecisionWindows reads of a DriftReference when no residuals are given
        class_prior = {"cat|dog": 0.5, "cat": 0.25, "bird": 0.25}

        def judge(self, scores):
            return {"available": True, "scores": len(scores)}

    w = DecisionWindows(reference=Ref(), multilabel=True)
    w.add(["classifier", "fallback", "abstain", "classifier"], [0.9, 0.4, 0.2, 0.8],
          [("cat", "dog"), ("dog",), (), ("bird", "cat")], now=10.0)
    s = w.summary(60.0, now=20.0)
    assert s["predicted"] == pytest.approx({"bird": 0.25, "cat": 0.5, "dog": 0.5})  # share of images
    assert s["prior"] == label_prior(Ref.class_prior) == {"bird": 0.25, "cat": 0.75, "dog": 0.5}
    mix = {"bird": 0.25 / 1.5, "cat": 0.75 / 1.5, "dog": 0.5 / 1.5}
    assert s["prior_distance"] == pytest.approx(prior_distance({"bird": 1, "cat": 2, "dog": 2}, mix))
