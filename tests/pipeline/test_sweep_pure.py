"""The pure sweep pieces on synthetic data where the truth is known: folds, out-of-fold scores,
the refit, ensemble selection and calibration from out-of-fold predictions."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline.sweep.calibrate import calibrate_from_oof, cross_fitted_knn
from pipeline.sweep.candidate import fit_evaluate
from pipeline.sweep.cv import (cross_validate, joined_preparation, metric_from_proba, predicted_labels,
                              shared_preparation)
from pipeline.sweep.ensemble import concat_data, cross_validated_ensemble, ensemble_selection
from pipeline.sweep.folds import CV_MAX_ROWS, assign_folds, plan_selection


def _ids(n, salt="x"):
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def _blobs(n_per_class, classes, dim=8, sep=3.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(classes), dim)) * sep
    y = np.repeat(classes, n_per_class)
    X = np.stack([centres[classes.index(c)] for c in y]) + rng.normal(size=(len(y), dim))
    return X.astype(np.float32), y


def test_plan_cv_below_the_limit_and_val_above():
    labels = np.repeat(["a", "b"], 600)
    splits = np.where(np.arange(1200) % 10 == 0, "val", "train")
    p = plan_selection(labels, splits)
    assert (p.mode, p.k, p.repeats, p.n_selection) == ("cv", 5, 1, 1200)
    assert "5-fold CV" in p.describe()
    big = plan_selection(np.repeat(["a", "b"], CV_MAX_ROWS), np.where(
        np.arange(2 * CV_MAX_ROWS) % 10 == 0, "val", "train"))
    assert big.mode == "val" and big.n_selection == 2 * CV_MAX_ROWS // 10
    tiny = plan_selection(np.array(["a"] * 3 + ["b"] * 40), np.array(["train"] * 43))
    assert tiny.k == 3 and tiny.repeats == 3  # k shrinks to the rarest class; tiny sets repeat
    with pytest.raises(ValueError, match="validation split"):
        plan_selection(labels, np.array(["train"] * 1200), mode="val")


def test_folds_are_stratified_deterministic_and_id_based():
    labels = np.repeat(["a", "b", "c"], [250, 150, 50])
    ids = _ids(len(labels))
    p = plan_selection(labels, ["train"] * len(labels))
    f = assign_folds(ids, labels, ["train"] * len(labels), p, seed=0)
    assert f.shape == (1, 450)
    for c, n in (("a", 250), ("b", 150), ("c", 50)):
        counts = np.bincount(f[0][labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
    again = assign_folds(ids, labels, ["train"] * len(labels), p, seed=0)
    assert (f == again).all()
    # the same ids in another order get the same folds
    order = np.random.default_rng(1).permutation(len(ids))
    shuffled = assign_folds([ids[i] for i in order], labels[order], ["train"] * 450, p, seed=0)
    assert (shuffled[0] == f[0][order]).all()
    other = assign_folds(ids, labels, ["train"] * len(labels), p, seed=1)
    assert (other != f).any()


def test_out_of_fold_predictions_never_come_from_a_model_that_saw_the_row():
    """Random labels: a 1-NN fitted on a row predicts that row perfectly; out of fold it is chance."""
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    X = rng.normal(size=(400, 16)).astype(np.float32)
    y = np.asarray(rng.choice(classes, 400))
    p = plan_selection(y, ["train"] * 400)
    folds = assign_folds(_ids(400), y, ["train"] * 400, p)
    res = cross_validate("KNN", {"k": 1}, X, y, folds, classes, metric="accuracy")
    assert len(res.rows) == 400 and res.proba.shape == (400, 4)
    assert res.score < 0.4  # chance is 0.25; in-sample it would be 1.0
    assert len(res.fold_scores) == 5 and res.std is not None


def test_linear_probe_weight_decay_chosen_in_the_folds_and_rescaled_for_the_refit():
    X, y = _blobs(60, ["a", "b", "c"], sep=1.0, seed=3)
    p = plan_selection(y, ["train"] * len(y))
    folds = assign_folds(_ids(len(y)), y, ["train"] * len(y), p)
    lams = [1e-4, 1e-2, 1.0, 100.0]
    res = cross_validate("LinearProbe", {"weight_decays": lams}, X, y, folds, ["a", "b", "c"],
                         metric="balanced_accuracy")
    chosen = res.chosen["weight_decay_cv"]
    # the chosen value is the best of the grid out of fold (each value cross-validated alone)
    alone = {lam: cross_validate("LinearProbe", {"weight_decays": [lam]}, X, y, folds,
                                 ["a", "b", "c"], metric="balanced_accuracy").score for lam in lams}
    assert res.score == pytest.approx(max(alone.values()), abs=0.02)
    assert alone[chosen] == pytest.approx(max(alone.values()), abs=0.02)
    # the same C on all rows: lambda * n constant (each fold trains on 4/5 of the rows)
    assert res.refit_params["weight_decays"] == [pytest.approx(chosen * 0.8)]
    assert res.score > 0.8
    # the CV score is the metric of the out-of-fold probabilities
    assert res.score == pytest.approx(metric_from_proba("balanced_accuracy", y[res.rows],
                                                        res.proba, ["a", "b", "c"]))


def test_validation_mode_scores_only_the_validation_rows():
    X, y = _blobs(50, ["a", "b"], seed=4)
    splits = np.where(np.arange(len(y)) % 5 == 0, "val", "train")
    p = plan_selection(y, splits, mode="val")
    folds = assign_folds(_ids(len(y)), y, splits, p)
    res = cross_validate("NearestCentroid", {}, X, y, folds, ["a", "b"], metric="accuracy")
    assert list(res.rows) == list(np.flatnonzero(splits == "val"))


def test_top5_labels_encode_hits():
    proba = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    y = np.array(["b", "a"])
    got = predicted_labels("top5", y, proba, ["a", "b", "c"])
    assert list(got) == ["b", "a"]  # 3 classes: the true class is always in the top 5
    assert list(predicted_labels("accuracy", y, proba, ["a", "b", "c"])) == ["a", "c"]


def test_ensemble_selection_combines_complementary_models_and_cv_score_is_honest():
    rng = np.random.default_rng(0)
    classes = ["a", "b"]
    n = 600
    y = np.asarray(rng.choice(classes, n))
    truth = (y == "b").astype(float)
    # two independent noisy views of the truth: averaging them is better than either
    pa = np.clip(truth + rng.normal(0, 0.6, n), 0, 1)
    pb = np.clip(truth + rng.normal(0, 0.6, n), 0, 1)
    probas = {"a": np.stack([1 - pa, pa], 1), "b": np.stack([1 - pb, pb], 1)}
    w = ensemble_selection(probas, y, classes, metric="accuracy")
    assert set(w) == {"a", "b"} and sum(w.values()) == pytest.approx(1.0)
    folds = np.arange(n) % 5
    res = cross_validated_ensemble(probas, y, folds, classes, metric="accuracy")
    single = max(metric_from_proba("accuracy", y, p, classes) for p in probas.values())
    assert res.score > single
    assert len(res.fold_scores) == 5 and res.proba.shape == (n, 2)


def test_concat_data_keeps_the_rows_every_backbone_has():
    base = {"y": np.array(["a", "b", "a"]), "folds": np.array([[0, 1, 2]]),
            "y_test": np.array(["a"]), "ids_test": ["t1"]}
    p1 = {**base, "X": np.ones((3, 2)), "ids": ["i1", "i2", "i3"], "X_test": np.ones((1, 2))}
    p2 = {**base, "X": np.full((2, 3), 2.0), "ids": ["i3", "i1"], "y": np.array(["a", "a"]),
          "folds": np.array([[2, 0]]), "X_test": np.full((1, 3), 2.0)}
    out, slices = concat_data([p1, p2])
    assert out["ids"] == ["i1", "i3"] and out["X"].shape == (2, 5)
    assert (out["X"][:, 2:] == 2.0).all() and list(out["folds"][0]) == [0, 2]
    assert slices == [(0, 2), (2, 5)]


def test_a_concatenation_starts_from_its_parts_preparations_and_reaches_the_same_fit():
    """The concatenation's linear probe reuses each backbone's label-free preparation (the
    standardisation, basis and rotated rows its own probe made): the standardisation is exactly
    the concatenation's, the basis is block-diagonal by part (parts of unequal widths too), and
    the cross-validation chooses the same weight decay with the same out-of-fold predictions."""
    from pipeline.heads.batched_lbfgs import MAX_BLOCK, diagonal_blocks

    classes = ["a", "b", "c"]
    X, y = _blobs(60, classes, dim=30, sep=0.8, seed=3)
    widths = [12, 18]
    parts = [X[:, :12] * 3.0 + 1.0, X[:, 12:]]
    Xc = np.concatenate(parts, axis=1)
    joined = joined_preparation([shared_preparation(P) for P in parts])
    whole = shared_preparation(Xc)
    np.testing.assert_allclose(joined["scaler"].mean, whole["scaler"].mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(joined["scaler"].std, whole["scaler"].std, rtol=1e-5)
    e, V = joined["basis"]
    assert e.shape == (30,) and not V[:12, 12:].any() and not V[12:, :12].any()
    assert diagonal_blocks(V, 12) == [(0, 12), (12, 30)] and diagonal_blocks(V, MAX_BLOCK) == [(0, 30)]
    np.testing.assert_allclose(V.T @ V, np.eye(30), atol=1e-5)
    np.testing.assert_allclose(joined["rotated"], joined["scaler"].transform(Xc) @ V, atol=1e-4)
    folds = assign_folds(_ids(len(y)), y, ["train"] * len(y), plan_selection(y, ["train"] * len(y)))
    params = {"weight_decays": [1e-3, 1e-2, 1e-1], "tol": 1e-6}
    a = cross_validate("LinearProbe", params, Xc, y, folds, classes, metric="accuracy")
    b = cross_validate("LinearProbe", params, Xc, y, folds, classes, metric="accuracy",
                       preparation=joined)
    assert a.chosen == b.chosen and a.score == b.score
    np.testing.assert_allclose(a.proba, b.proba, atol=5e-3)  # the same optimum, to solver tolerance
    with pytest.raises(ValueError, match="do not match X"):
        cross_validate("LinearProbe", params, Xc[:-1], y[:-1], folds[:, :-1], classes,
                       metric="accuracy", preparation=joined)
    with pytest.raises(ValueError, match="different row counts"):
        joined_preparation([shared_preparation(parts[0]), shared_preparation(parts[1][:-1])])
    assert sum(widths) == Xc.shape[1]


def test_a_linear_probe_shares_its_preparation_and_concat_data_joins_it_on_the_same_rows():
    classes = ["a", "b"]
    X, y = _blobs(40, classes, dim=6, seed=1)
    n = len(y)
    folds = assign_folds(_ids(n), y, ["train"] * n, plan_selection(y, ["train"] * n))
    data = {"X": X, "y": y, "ids": _ids(n), "folds": folds, "X_test": X[:10], "y_test": y[:10],
            "ids_test": _ids(10, "t")}
    kw = dict(selection_metric="accuracy", n_bootstrap=20, seed=0, hardest_k=2, latency_repeats=1)
    shared = fit_evaluate(data, "LinearProbe", {"weight_decays": [1e-2]}, classes, share_preparation=True, **kw)
    assert shared["status"] == "ok" and shared["preparation"]["rotated"].shape == X.shape
    assert "preparation" not in fit_evaluate(data, "LinearProbe", {"weight_decays": [1e-2]}, classes, **kw)
    assert "preparation" not in fit_evaluate(data, "NearestCentroid", {}, classes, share_preparation=True, **kw)
    part = {**data, "preparation": shared["preparation"]}
    out, _ = concat_data([part, {**part, "X": X[:, ::-1].copy()}])
    assert out["preparation"]["rotated"].shape == (n, 12) and out["X"].shape == (n, 12)
    # a part missing a row (or a preparation): the concatenation makes its own
    fewer = {**data, "X": X[1:], "y": y[1:], "ids": data["ids"][1:], "folds": folds[:, 1:]}
    assert "preparation" not in concat_data([part, fewer])[0]
    assert "preparation" not in concat_data([part, data])[0]


def test_calibration_from_oof_reaches_the_target_and_knn_never_finds_itself():
    X, y = _blobs(100, ["a", "b", "c"], sep=1.2, seed=5)
    p = plan_selection(y, ["train"] * len(y))
    folds = assign_folds(_ids(len(y)), y, ["train"] * len(y), p)
    res = cross_validate("LinearProbe", {"weight_decays": [1e-2]}, X, y, folds, ["a", "b", "c"],
                         metric="accuracy")
    cal = calibrate_from_oof(res.proba, y[res.rows], ["a", "b", "c"], X=X[res.rows],
                             folds=folds[0][res.rows], target_precision=0.95)
    conf = res.proba.max(1)
    kept = conf >= cal["threshold"]
    pred = np.asarray(["a", "b", "c"])[res.proba.argmax(1)]
    assert np.mean(pred[kept] == y[res.rows][kept]) >= 0.95
    assert cal["calibration_rows"] == len(y)
    # with random labels a neighbour search that could find the query itself would agree 100 %
    rng = np.random.default_rng(0)
    Xr = rng.normal(size=(200, 4)).astype(np.float32)
    yr = np.asarray(rng.choice(["a", "b"], 200))
    fr = np.arange(200) % 5
    vote, agreement = cross_fitted_knn(Xr, yr, fr, np.arange(200), k=1)
    assert np.mean(vote == yr) < 0.7


def test_report_gains_the_deployed_thresholds_section(tmp_path):
    from pipeline.sweep.report import add_section, calibration_section

    page = tmp_path / "report.html"
    page.write_text("<html><body><h1>sweep</h1></body></html>", encoding="utf-8")
    cal = {"target_precision": 0.9, "threshold": 0.42, "knn_threshold": 0.6,
           "calibrated_on": "out-of-fold predictions", "calibration_rows": 3409, "oof_coverage": 0.93,
           "test": {"n": 372, "classifier_rate": 0.95, "classifier_precision": 0.931,
                    "fallback_rate": 0.03, "fallback_precision": None, "abstain_rate": 0.02}}
    add_section(page, calibration_section(cal))
    html = page.read_text(encoding="utf-8")
    assert html.index("promise and deliver") < html.index("</body>")
    assert "93.1 %" in html and "3409 images" in html and "0.4200" in html


def test_linear_probe_cv_on_random_labels_is_at_chance():
    """Wide features that the weakly regularised members can memorise, labels with no signal:
    every out-of-fold score must stay at chance (a fold that started from another fold's
    solution, or saw its held-out rows any other way, scores far above it)."""
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    X = rng.normal(size=(400, 512)).astype(np.float32)
    y = np.asarray(rng.choice(classes, 400))
    folds = assign_folds(_ids(400), y, ["train"] * 400, plan_selection(y, ["train"] * 400))
    res = cross_validate("LinearProbe", {}, X, y, folds, classes, metric="accuracy")
    assert res.score < 0.36  # chance 0.25; 320 training rows in 512 dimensions are separable


def test_linear_probe_cv_window_keeps_the_full_grids_choice(monkeypatch):
    """The folds after the first fit only the weight decays near the first fold's best: the
    choice and the score equal those of every value on every fold."""
    from pipeline.sweep import cv as cv_mod

    X, y = _blobs(80, ["a", "b", "c", "d"], dim=32, sep=0.6, seed=7)
    folds = assign_folds(_ids(len(y)), y, ["train"] * len(y), plan_selection(y, ["train"] * len(y)))
    windowed = cross_validate("LinearProbe", {}, X, y, folds, ["a", "b", "c", "d"],
                              metric="balanced_accuracy")
    monkeypatch.setattr(cv_mod, "CV_WINDOW", 100)
    full = cross_validate("LinearProbe", {}, X, y, folds, ["a", "b", "c", "d"],
                          metric="balanced_accuracy")
    assert windowed.chosen["weight_decay_cv"] == full.chosen["weight_decay_cv"]
    assert windowed.score == pytest.approx(full.score)
    np.testing.assert_allclose(windowed.proba, full.proba, atol=1e-4)


def _ref(fingerprint="f" * 64, engine="openvino", text=False):
    from pipeline.sweep.plan import FeatureSetRef

    return FeatureSetRef(backbone="family/model", fingerprint=fingerprint, engine=engine, text=text)


def test_latency_cache_reuses_only_a_stable_measurement_of_the_same_thing(tmp_path, monkeypatch):
    from pipeline.sweep import latency_cache as lc
    from pipeline.sweep.features import backbone_latency

    cache = lc.LatencyCache(tmp_path)
    stable = {"latency_ms_b1": 10.0, "latency_noise_ms_b1": 0.5, "latency_ms_b32": 5.0,
              "latency_noise_ms_b32": 0.2, "params_m": 4.7}
    assert cache.get(_ref(), "cpu") is None
    assert cache.put(_ref(), "cpu", stable)
    hit = cache.get(_ref(), "cpu")
    assert hit["latency_ms_b1"] == 10.0 and hit["cached"] is True and hit["measured_at"] > 0
    # another engine, device or feature set is another measurement
    assert cache.get(_ref(engine="onnx"), "cpu") is None
    assert cache.get(_ref(), "cuda") is None
    assert cache.get(_ref(fingerprint="e" * 64), "cpu") is None
    # a noisy measurement (a busy machine) is not kept
    noisy = {**stable, "latency_noise_ms_b1": 6.0}
    assert not cache.put(_ref(fingerprint="e" * 64), "cpu", noisy)
    assert cache.get(_ref(fingerprint="e" * 64), "cpu") is None
    # another machine (or engine version) misses
    monkeypatch.setattr(lc, "machine_key", lambda: {"cpu": "another"})
    assert cache.get(_ref(), "cpu") is None
    monkeypatch.undo()
    # too old: measured again
    assert lc.LatencyCache(tmp_path, max_age_s=0.0).get(_ref(), "cpu") is None
    # a damaged file is a miss, not an error
    for p in tmp_path.glob("*.json"):
        p.write_text("{not json")
    assert cache.get(_ref(), "cpu") is None
    # through the sweep's entry point: given numbers win, the cache answers before measuring
    cache.put(_ref(), "cpu", stable)
    lat, why = backbone_latency(_ref(), None, "cpu", cache_dir=tmp_path)
    assert why is None and lat["cached"] is True and lat["latency_ms_b32"] == 5.0
    lat, why = backbone_latency(_ref(), {"family/model": {"latency_ms_b1": 1.0}}, "cpu",
                                cache_dir=tmp_path)
    assert lat == {"latency_ms_b1": 1.0}


def test_auto_device_without_a_gpu_driver_needs_no_torch():
    import subprocess
    import sys

    from pipeline.devices import cuda_possible

    code = ("import sys; from pipeline.devices import resolve_device; "
            "print(resolve_device('auto'), 'torch' in sys.modules)")
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["cpu", "False"]  # every device hidden: answered without importing torch
    if not cuda_possible():  # no NVIDIA driver here: the same without the variable
        env.pop("CUDA_VISIBLE_DEVICES")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True).stdout.split()
        assert out == ["cpu", "False"]


def test_tip_adapter_base_prompts_with_the_zero_shot_templates():
    from pipeline.sweep.plan import BASE_TEMPLATES, sweep_inputs, task_params

    templates = ["a photo of a {}.", "a drawing of a {}."]
    ref = _ref(text=True)
    heads, _, _ = sweep_inputs([ref], ["zeroshot", "tip"], {"zeroshot": {"templates": templates}},
                               selection_metric="accuracy", tolerance=0.005)
    tip = next(h for h in heads if h.head == "TipAdapter")
    params = task_params(tip, ref, {ref.backbone: lambda prompts: np.zeros((len(prompts), 4))}, 1)
    assert BASE_TEMPLATES not in params  # not a TipAdapter parameter
    assert params["base"].templates == templates
    plain, _, _ = sweep_inputs([ref], ["zeroshot", "tip"], {}, selection_metric="accuracy",
                               tolerance=0.005)
    tip = next(h for h in plain if h.head == "TipAdapter")
    assert task_params(tip, ref, {ref.backbone: lambda p: np.zeros((len(p), 4))}, 1)["base"].templates is None
