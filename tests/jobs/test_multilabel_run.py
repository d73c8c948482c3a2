"""`tlpipe run` on a multi-label dataset (issue 16), end to end on real data.

Real CIFAR-10 mosaics (2-4 photos of different classes per image, a `path,labels` CSV manifest)
through `jobs.run.run` — real embedded Ray, real EfficientNet-Lite0 weights at 96 px, a real
sqlite MLflow store under tmp_path: the multi-label sweep (one-vs-rest probe, k-NN label voting,
sigmoid MLP) is scored by out-of-fold mAP, the winner is refit, registered with
tlpipe.task=multilabel and answers label lists through `mlflow.pyfunc.load_model`. A second run
on the same images with the test split's label sets shuffled picks the same winner: the test
split never decides.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tests.multilabel_mosaics import build_mosaics

LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"
SMALL = LITE0 + "@96"  # real Lite0 weights at 96 px (a size variant): a fast real backbone
CLASSES = ["airplane", "automobile", "bird", "cat", "ship", "truck"]
MODEL = "mosaics"
#: two well-conditioned weight decays instead of the probe's twenty: the same code path; the
#: linear probe's 16 CV fits (5 folds x 3 repeats + refit) dominate this test's time otherwise
FAST = {"linear": {"weight_decays": [0.1, 1.0]}}


@pytest.fixture(scope="module")
def ml_run(ray_local, cifar10_dir, tmp_path_factory):
    import mlflow

    from jobs.run import run
    from jobs.tracking import tracking_uri_for, use_tracking_uri
    from pipeline.data import load_dataset

    base = tmp_path_factory.mktemp("ml-run")
    manifest = build_mosaics(cifar10_dir, base / MODEL, 150, seed=3, classes=CLASSES)
    dataset = load_dataset(str(manifest), seed=0)
    root = base / "state"
    previous = mlflow.get_tracking_uri()
    first = run(str(manifest), root=root, backbones=[SMALL], head_params=FAST, model_name=MODEL,
                seed=0)
    # the same images with the test split's label sets shuffled among themselves
    rng = np.random.default_rng(0)
    test = [i for i, r in enumerate(dataset.records) if r.split == "test"]
    perm = rng.permutation(test)
    records = list(dataset.records)
    for i, j in zip(test, perm):
        records[i] = dataclasses.replace(dataset.records[i], labels=dataset.records[j].labels,
                                         label=dataset.records[j].label)
    shuffled = run(str(manifest), root=root, backbones=[SMALL], head_params=FAST, model_name=MODEL,
                   seed=0, register=False, dataset=dataclasses.replace(dataset, records=records))
    use_tracking_uri(tracking_uri_for(root))
    yield dict(first=first, shuffled=shuffled, dataset=dataset, root=root, manifest=manifest,
               test_moved=sum(dataset.records[i].labels != records[i].labels for i in test))
    use_tracking_uri(previous)


def test_multilabel_run_sweeps_every_head_and_selects_by_cv_map(ml_run):
    res = ml_run["first"]
    assert res.dataset.multi_label
    sweep = res.sweep
    finished = [r for r in sweep.rows if r["status"] == "FINISHED"]
    assert {r["head"] for r in finished} == {"linear", "knn", "mlp"}, sweep.rows
    assert sweep.selection["metric_name"] == "map"
    assert sweep.selection_plan["mode"] == "cv"
    winner = sweep.winner
    assert winner is not None and winner["selection_metric"] == "map"
    assert "CV on train+val" in winner["selection_on"]
    # the winner's selection score is its out-of-fold mAP, recomputed here from the saved scores
    from pipeline.multilabel.labelsets import binarize
    from pipeline.multilabel.metrics import mean_average_precision

    cdir = Path(sweep.head_dirs[winner["name"]]).parent
    sel = json.loads((cdir / "selection.json").read_text())
    proba = np.load(cdir / "selection_proba.npy")
    Y = binarize([k.split("|") for k in sel["y"]], res.dataset.classes)
    assert winner["selection_score"] == pytest.approx(mean_average_precision(Y, proba), abs=1e-6)
    assert winner["selection_score"] > 0.6  # real features separate CIFAR classes inside mosaics
    # selection never saw a test image; the test mAP is reported beside it
    test_ids = {r.sha256 for r in res.dataset.split("test")}
    assert test_ids and not test_ids & set(sel["ids"])
    assert winner["test_score"] is not None
    ev = res.evaluation["test"]
    assert set(ev["per_label_ap"]) == set(CLASSES)
    assert 0 <= ev["subset_accuracy"] <= 1 and 0 < ev["micro_f1"] <= 1 and ev["map"] > 0.5


def test_test_split_labels_never_change_the_winner(ml_run):
    a, b = ml_run["first"].sweep, ml_run["shuffled"].sweep
    assert ml_run["test_moved"] > 0
    assert a.winner["name"] == b.winner["name"]
    sa = {r["name"]: r["selection_score"] for r in a.rows}
    sb = {r["name"]: r["selection_score"] for r in b.rows}
    assert sa == pytest.approx(sb)  # selection scores are out of fold: identical
    ta = {r["name"]: r["test_score"] for r in a.rows}
    tb = {r["name"]: r["test_score"] for r in b.rows}
    assert ta != pytest.approx(tb)  # ... while the test scores moved with the shuffled labels


def test_registered_model_answers_label_lists_through_pyfunc(ml_run):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from tests.multilabel_mosaics import read_manifest

    res = ml_run["first"]
    assert res.version == "1" and res.model_name == MODEL
    mv = MlflowClient().get_model_version(MODEL, res.version)
    assert mv.tags["tlpipe.task"] == "multilabel" and mv.tags["selection_metric"] == "map"
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@challenger")
    truth = {str(Path(p).resolve()): labs for p, labs in read_manifest(ml_run["manifest"])}
    test = ml_run["dataset"].split("test")[:12]
    out = model.predict(pd.DataFrame({"image": [Path(r.path).read_bytes() for r in test]}))
    assert len(out) == len(test)
    hits = 0
    for r, (_, row) in zip(test, out.iterrows()):
        assert isinstance(row["labels"], list) and row["decision"] in ("classifier", "fallback", "abstain")
        assert all(lab in CLASSES for lab in row["labels"])
        scored = json.loads(row["label_scores"])
        assert [d["label"] for d in scored] == row["labels"]
        assert row["label"] == ("|".join(sorted(row["labels"])) if row["labels"] else None)
        hits += len(set(row["labels"]) & set(truth[str(Path(r.path).resolve())]))
    assert hits >= len(test)  # on average at least one true label per mosaic found
    # an unusable image is an error row with the multi-label columns empty; the others still answer
    mixed = model.predict(pd.DataFrame({"image": [b"not an image", Path(test[0].path).read_bytes()]}))
    assert list(mixed.columns) == list(out.columns) and out["error"].isna().all()
    assert mixed["decision"].tolist() == ["error", out["decision"][0]] and mixed["labels"][0] == []
    assert mixed["error"][0].startswith("row 0: ") and mixed["labels"][1] == out["labels"][0]
    # the promotion gate compares multi-label versions on their test label sets (subset accuracy)
    from jobs.registry import promote

    assert promote(MODEL).promoted  # no champion yet
    assert MlflowClient().get_model_version(MODEL, "1").tags["promotion_metric"] == "accuracy"


def test_the_run_registered_model_answers_label_lists_over_http(ml_run, ray_local):
    """The chain a user runs: `tlpipe run` registered it, `tlpipe serve` serves @challenger from
    the same store (real Ray Serve, real HTTP): each mosaic's `labels` are the pyfunc model's."""
    import socket

    import httpx
    import mlflow
    import pandas as pd
    from ray import serve

    from deploy.app import build_app
    from jobs.tracking import tracking_uri_for

    res = ml_run["first"]
    test = ml_run["dataset"].split("test")[12:18]
    expected = mlflow.pyfunc.load_model(f"models:/{MODEL}/{res.version}").predict(
        pd.DataFrame({"image": [Path(r.path).read_bytes() for r in test]}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(f"{MODEL}/{res.version}", tracking_uri=tracking_uri_for(ml_run["root"]),
                    state_root=str(ml_run["root"]), poll_interval_s=0,
                    decode_threads=1, max_batch_size=8, batch_wait_timeout_s=0.005,
                    ingress_options={"ray_actor_options": {"num_cpus": 0.1}}, colocate_backbone=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, name="ml-run-http", route_prefix="/", blocking=False)
        with httpx.Client(timeout=120.0) as client:
            r = client.post(f"http://127.0.0.1:{port}/v1/predict",
                            files=[("file", (Path(t.path).name, Path(t.path).read_bytes(), "image/jpeg"))
                                   for t in test])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "multilabel" and len(body["predictions"]) == len(test)
        same = [[d["label"] for d in pred["labels"]] == row["labels"] and pred["decision"] == row["decision"]
                for pred, (_, row) in zip(body["predictions"], expected.iterrows())]
        # one batch of six against the pyfunc's own: a score on a threshold may land either side
        assert sum(same) >= len(test) - 1, (body["predictions"], expected)
    finally:
        serve.delete("ml-run-http")
        serve.shutdown()
