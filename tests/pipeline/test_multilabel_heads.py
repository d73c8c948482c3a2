"""Multi-label heads and predictor on real EfficientNet-Lite0 features of real photo mosaics
(CIFAR-10 tiles; labels = the classes shown), loaded through the real intake and split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.multilabel.heads import (MultiLabelKNN, MultiLabelMLP, OneVsRestProbe, load_multilabel_head)
from pipeline.multilabel.metrics import evaluate_multilabel, paired_map_bootstrap, tune_thresholds
from tests.multilabel_mosaics import build_mosaics


@pytest.fixture(scope="module")
def feats(cifar10_dir, tmp_path_factory):
    from pipeline.backbones import get_spec, load_backbone
    from pipeline.data import load_dataset
    from pipeline.extraction import ChunkEmbedder

    root = tmp_path_factory.mktemp("ml_mosaics")
    ds = load_dataset(build_mosaics(cifar10_dir, root, 300, seed=0), seed=0, val_fraction=0.15,
                      test_fraction=0.2)
    spec = get_spec("efficientnet/tf_efficientnet_lite0.in1k").replace(input_size=128, crop_pct=1.0)
    res = ChunkEmbedder(load_backbone(spec, engine="onnx"))([r.path for r in ds.records])
    assert res.ok.all()
    split = np.array([r.split for r in ds.records])
    M = ds.label_matrix()
    out = {"ds": ds, "spec": spec, "X": res.embeddings, "M": M, "paths": [r.path for r in ds.records]}
    for s in ("train", "val", "test"):
        out[s] = split == s
    return out


def _fit(head, f):
    tr, va = f["train"], f["val"]
    return head.fit(f["X"][tr], f["M"][tr], f["X"][va], f["M"][va], classes=f["ds"].classes)


@pytest.fixture(scope="module")
def fitted(feats):
    return {"linear": _fit(OneVsRestProbe(), feats), "knn": _fit(MultiLabelKNN(), feats),
            "mlp": _fit(MultiLabelMLP(), feats)}


def test_heads_beat_chance_with_thresholds_from_validation_only(feats, fitted):
    X, M, te, va = feats["X"], feats["M"], feats["test"], feats["val"]
    prevalence = float(M[te].mean(0).mean())  # the mAP of scores that know nothing (~0.28)
    reports = {}
    for name, head in fitted.items():
        P = head.predict_proba(X[te])
        assert P.shape == (te.sum(), 10) and ((P >= 0) & (P <= 1)).all()
        rep = evaluate_multilabel(M[te], P, head.thresholds_, feats["ds"].classes)
        reports[name] = rep
        assert rep.map > prevalence + 0.15, (name, rep.map, prevalence)
        assert rep.micro_f1 > 0.4, (name, rep.micro_f1)
        # the thresholds are exactly the F1-optimal cuts of the validation scores: tuned on
        # X_val / Y_val, never on the training rows or the test split
        assert head.threshold_info_ == {"source": "X_val", "rows": int(va.sum()), "tuned_labels": 10}
        np.testing.assert_allclose(head.thresholds_, tune_thresholds(M[va], head.predict_proba(X[va])),
                                   rtol=1e-5)
        assert (head.predict(X[te]) == (P >= head.thresholds_)).all()
    assert reports["linear"].map > 0.5
    d = paired_map_bootstrap(M[te], fitted["linear"].predict_proba(X[te]), fitted["knn"].predict_proba(X[te]),
                             n_bootstrap=300)
    assert d.diff == pytest.approx(reports["linear"].map - reports["knn"].map)
    assert d.low <= d.diff <= d.high and d.n == int(te.sum())


def test_internal_holdout_and_out_of_fold_thresholds_stay_inside_the_given_rows(feats):
    from pipeline.multilabel.crossval import fit_with_oof_thresholds
    from pipeline.multilabel.metrics import mean_average_precision

    X, M = feats["X"], feats["M"]
    trval = feats["train"] | feats["val"]
    probe = OneVsRestProbe(weight_decays=[1e-3, 1e-2, 1e-1]).fit(X[trval], M[trval])
    info = probe.threshold_info_
    assert info["source"] == "holdout" and 0 < info["rows"] < trval.sum()
    assert probe.best_params_["refitted"] is True

    head, oof = fit_with_oof_thresholds(MultiLabelKNN, X[trval], M[trval], n_folds=4, seed=0)
    np.testing.assert_allclose(head.thresholds_, tune_thresholds(M[trval], oof))
    # out-of-fold scores are honest: far below the in-sample scores of the final k-NN, whose
    # every training row finds itself
    assert mean_average_precision(M[trval], head.predict_proba(X[trval])) > 0.99
    assert mean_average_precision(M[trval], oof) < 0.8

    # the sweep-shaped entry point: (R, N) folds, -1 = always trained (the "val" selection mode)
    from pipeline.multilabel.crossval import cross_validate_multilabel, fold_matrix

    classes = feats["ds"].classes
    cv = cross_validate_multilabel(MultiLabelKNN, X[trval], M[trval], fold_matrix(M[trval], 4, 2), classes)
    assert len(cv.rows) == trval.sum() and len(cv.fold_scores) == 4
    np.testing.assert_allclose(cv.thresholds, tune_thresholds(M[trval][cv.rows], cv.proba))
    assert cv.score == pytest.approx(mean_average_precision(M[trval][cv.rows], cv.proba), rel=1e-6)
    val_only = np.where(feats["val"][trval], 0, -1)
    cv_val = cross_validate_multilabel(MultiLabelKNN, X[trval], M[trval], val_only, classes)
    assert cv_val.rows.tolist() == np.flatnonzero(feats["val"][trval]).tolist()


def test_save_load_round_trip_without_pickle(feats, fitted, tmp_path):
    X = feats["X"][feats["test"]]
    for name, head in fitted.items():
        d = head.save(tmp_path / name)
        files = sorted(p.name for p in d.iterdir())
        assert files == sorted(["config.json", "arrays.safetensors"] + (["index.faiss"] if name == "knn" else []))
        back = load_multilabel_head(d)
        assert type(back) is type(head) and back.classes_.tolist() == feats["ds"].classes
        np.testing.assert_allclose(back.predict_proba(X), head.predict_proba(X), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(back.thresholds_, head.thresholds_)
        assert back.predict_labels(X[:5]) == head.predict_labels(X[:5])


def test_predictor_lists_labels_falls_back_and_abstains(feats, fitted, tmp_path):
    from feature_store.index import SupportIndex
    from pipeline.multilabel.predictor import MultiLabelPredictor, load_any_predictor
    from pipeline.predictor import Predictor

    ds, X, te = feats["ds"], feats["X"], feats["test"]
    trval = ~te
    keys = [r.label for r, keep in zip(ds.records, trval) if keep]  # "cat|dog" keys
    support = SupportIndex(X.shape[1])
    support.add(X[trval], keys)
    probe = fitted["linear"]
    pred = MultiLabelPredictor(feats["spec"], probe, support=support, info={"model": "mosaics"})
    pred.engine = "onnx"
    Xte = X[te]
    out = pred.predict_embeddings(Xte)
    want = probe.predict_labels(Xte)
    for p, labs in zip(out, want):
        if labs:
            assert p.decision == "classifier"
            assert sorted(d["label"] for d in p.labels) == sorted(labs)
            assert [d["score"] for d in p.labels] == sorted((d["score"] for d in p.labels), reverse=True)
        else:
            assert p.decision in ("fallback", "abstain")

    # real image bytes through the predictor's own backbone
    paths = [p for p, keep in zip(feats["paths"], te) if keep][:6]
    by_image = pred.predict_images(paths)
    same = sum(a.labels and [d["label"] for d in a.labels] == [d["label"] for d in b.labels]
               for a, b in zip(by_image, out[:6]))
    assert same >= 5, [p.to_dict() for p in by_image]

    # no label passes its threshold: the support set's neighbours vote label sets...
    high = MultiLabelKNN().fit(X[trval], feats["M"][trval], classes=ds.classes).set_thresholds(np.full(10, 1.01))
    fb = MultiLabelPredictor(feats["spec"], high, support=support, knn_threshold=0.5).predict_embeddings(Xte)
    assert all(p.decision in ("fallback", "abstain") for p in fb)
    voted = [p for p in fb if p.decision == "fallback"]
    assert len(voted) > len(fb) // 2
    truth = [set(r.labels) for r, keep in zip(ds.records, te) if keep]
    hits = [len({d["label"] for d in p.labels} & t) / len(p.labels) for p, t in zip(fb, truth) if p.labels]
    assert np.mean(hits) > 0.5  # fallback labels are mostly right (prevalence ~0.28)
    # ...and without a support set the predictor abstains: no labels, the head's scores kept
    none = MultiLabelPredictor(feats["spec"], high).predict_embeddings(Xte[:4])
    assert all(p.decision == "abstain" and p.labels == [] and p.label is None and len(p.top_k) == 5
               for p in none)
    assert json.loads(json.dumps(none[0].to_dict()))["decision"] == "abstain"

    d = pred.save(tmp_path / "pred")
    assert json.loads((d / "predictor.json").read_text())["format"] == "tlpipe.multilabel_predictor"
    back = load_any_predictor(d, engine="onnx")
    assert isinstance(back, MultiLabelPredictor) and back.thresholds == pred.thresholds
    assert back.support_only_classes == []
    assert [p.to_dict() for p in back.predict_embeddings(Xte)] == [p.to_dict() for p in out]
    with pytest.raises(ValueError, match="tlpipe.multilabel_predictor"):
        Predictor.load(d)
