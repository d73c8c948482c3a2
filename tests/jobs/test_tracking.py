"""MLflow helpers against a real sqlite store under tmp_path."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tracking-root")


@pytest.fixture(scope="module")
def exp_id(root):
    from jobs.tracking import setup_mlflow

    return setup_mlflow(root, "unit")


def _client():
    from jobs.tracking import client

    return client()


def _files(run_id, path=None):
    out = set()
    for f in _client().list_artifacts(run_id, path):
        out |= _files(run_id, f.path) if f.is_dir else {f.path}
    return out


def test_tracking_uri_defaults_to_sqlite_under_root_and_env_wins(tmp_path, monkeypatch):
    from jobs.tracking import artifact_location_for, tracking_uri_for

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri_for(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifact_location_for(tmp_path, "my exp") == \
        (tmp_path.resolve() / "mlartifacts" / "my_exp").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri_for(tmp_path) == "http://mlflow.internal:5000"
    assert artifact_location_for(tmp_path, "x") is None  # the server decides


def test_setup_mlflow_is_idempotent_and_keeps_artifacts_under_root(root, exp_id, monkeypatch):
    import mlflow

    from jobs.tracking import setup_mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert setup_mlflow(root, "unit") == exp_id
    # MLflow exports the URI it is given; that must not pin every later root to this one
    assert "MLFLOW_TRACKING_URI" not in os.environ
    exp = _client().get_experiment(exp_id)
    assert exp.artifact_location == (root.resolve() / "mlartifacts" / "unit").as_uri()
    assert mlflow.get_tracking_uri() == f"sqlite:///{root.resolve()}/mlflow.db"
    assert (root / "mlflow.db").is_file()
    _client().delete_experiment(exp_id)
    assert setup_mlflow(root, "unit") == exp_id  # restored, not recreated
    assert _client().get_experiment(exp_id).lifecycle_stage == "active"


def test_tracked_run_finishes(exp_id):
    import mlflow

    from jobs.tracking import tracked_run

    with tracked_run(exp_id, run_name="ok", tags={"k": "v"}) as run:
        mlflow.log_metric("m", 1.0)
    got = _client().get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["m"] == 1.0
    assert got.data.tags["k"] == "v"
    assert mlflow.active_run() is None


def test_tracked_run_ends_failed_on_exception(exp_id):
    import mlflow

    from jobs.tracking import tracked_run

    with pytest.raises(RuntimeError, match="boom"):
        with tracked_run(exp_id, run_name="fails") as run:
            raise RuntimeError("boom")
    got = _client().get_run(run.info.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["tlpipe.error"] == "RuntimeError: boom"
    assert "error.txt" in _files(run.info.run_id)
    assert mlflow.active_run() is None


def test_tracked_run_killed_on_keyboard_interrupt_and_sigterm(exp_id):
    import mlflow

    from jobs.tracking import RunTerminated, tracked_run

    with pytest.raises(KeyboardInterrupt):
        with tracked_run(exp_id, run_name="ctrl-c") as run:
            raise KeyboardInterrupt
    assert _client().get_run(run.info.run_id).info.status == "KILLED"

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunTerminated):
        with tracked_run(exp_id, run_name="sigterm") as run:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes, right away
                pass
            pytest.fail("SIGTERM did not interrupt the block")
    assert _client().get_run(run.info.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored
    assert mlflow.active_run() is None


def test_failed_child_does_not_fail_the_parent(exp_id):
    from jobs.tracking import tracked_run

    with tracked_run(exp_id, run_name="parent") as parent:
        with pytest.raises(ValueError):
            with tracked_run(exp_id, run_name="child") as child:
                raise ValueError("bad head")
        # an inner run left open is ended with its parent
        import mlflow

        leaked = mlflow.start_run(nested=True, run_name="leaked", experiment_id=exp_id)
    c = _client()
    assert c.get_run(child.info.run_id).info.status == "FAILED"
    assert c.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert c.get_run(parent.info.run_id).info.status == "FINISHED"
    assert c.get_run(leaked.info.run_id).info.status == "FINISHED"


def test_log_helpers_metrics_params_card_and_eval_report(exp_id, tmp_path):
    from jobs.tracking import (log_dataset_card, log_eval_report, log_metrics, log_params,
                               read_text_artifact, tracked_run)
    from pipeline.evaluate import evaluate, hardest_examples

    rng = np.random.default_rng(0)
    classes = ["a b", "c/d", "e"]
    y = np.array([classes[i % 3] for i in range(60)])
    proba = rng.dirichlet(np.ones(3), size=60)
    report = evaluate(y, proba, classes, n_bootstrap=50)
    paths = []
    for i in range(60):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 4, 0, 0)).save(p)
        paths.append(str(p))
    hardest = hardest_examples(y, proba, classes, ids=list(range(60)), k=4)
    card = {"name": "toy", "source": "/data/toy", "classes": classes, "dataset_hash": "abc123",
            "counts": {"train": {"a b": 3, "c/d": 2, "e": 1}, "test": {"a b": 1}}}
    with tracked_run(exp_id, run_name="logs") as run:
        logged = log_metrics({"ok": 1, "none": None, "nan": float("nan"), "weird key!": 2.0})
        log_params({"list": [1, 2], "long": "x" * 7000, "skip": None})
        log_dataset_card(card)
        log_eval_report(report, hardest=hardest, hardest_images=[paths[h["id"]] for h in hardest])
    got = _client().get_run(run.info.run_id)
    assert logged == {"ok": 1.0, "weird key_": 2.0}
    m, p, t = got.data.metrics, got.data.params, got.data.tags
    assert "none" not in m and "nan" not in m
    assert p["list"] == "[1, 2]" and len(p["long"]) == 6000 and "skip" not in p
    assert p["dataset_hash"] == "abc123" and p["n_classes"] == "3" and p["n_train"] == "6"
    assert t["dataset.classes"] == "a b, c/d, e"
    assert m["accuracy"] == pytest.approx(report.accuracy)
    assert m["ci_low"] == pytest.approx(report.ci_low)
    assert m["class/c/d/f1"] == pytest.approx(report.per_class[1]["f1"])
    assert p["selection_metric"] == "balanced_accuracy"
    assert {"eval/report.json", "eval/per_class.csv", "eval/confusion_matrix.png",
            "eval/reliability.png", "eval/hardest_examples.png", "eval/hardest_examples.json",
            "dataset/dataset_card.json"} <= _files(run.info.run_id)
    back = json.loads(read_text_artifact(run.info.run_id, "eval/report.json"))
    assert back == report.to_dict()
    assert json.loads(read_text_artifact(run.info.run_id, "dataset/dataset_card.json")) == card
    csv = read_text_artifact(run.info.run_id, "eval/per_class.csv")
    assert csv.splitlines()[0] == "class,precision,recall,f1,support"


def test_helpers_need_a_run(exp_id):
    from jobs.tracking import log_metrics

    with pytest.raises(RuntimeError, match="no active MLflow run"):
        log_metrics({"a": 1})
