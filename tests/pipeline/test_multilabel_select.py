"""`pipeline.select.select_winner` on multi-label candidates (issue 16): the single-label rule —
best held-out metric; a cheaper candidate only when a paired bootstrap on the same images shows
it within the tolerance and it is faster beyond noise — with mAP and the multi-label bootstrap,
and the multi-label selection plan (`pipeline.sweep.multilabel`)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.multilabel.metrics import mean_average_precision, paired_map_bootstrap
from pipeline.select import Candidate, LabelScores, select_winner
from pipeline.sweep.multilabel import (multilabel_fold_lookup, multilabel_metric,
                                       plan_multilabel_selection)


def truth(n=600, L=5, seed=0):
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, L)) < 0.3).astype(np.uint8)
    Y[Y.sum(1) == 0, 0] = 1
    return Y


def scores(Y, noise, seed):
    rng = np.random.default_rng(seed)
    return np.clip(Y * 0.6 + 0.2 + rng.normal(0, noise, Y.shape), 0, 1)


def cand(name, metric, lat):
    return Candidate(name=name, backbone="b", head=name, family="f", metric=metric,
                     latency_ms_b1=lat, latency_noise_ms_b1=0.1, params_m=5.0)


def setup(noise_small):
    Y = truth()
    ids = [f"i{k}" for k in range(len(Y))]
    big = scores(Y, 0.25, 1)
    small = np.clip(big + np.random.default_rng(2).normal(0, noise_small, big.shape), 0, 1)
    ev = {"big": LabelScores(ids, big), "small": LabelScores(ids, small)}
    cs = [cand("big", mean_average_precision(Y, big), 20.0),
          cand("small", mean_average_precision(Y, small), 5.0)]
    return Y, ids, ev, cs


def test_cheaper_equivalent_candidate_wins_on_the_paired_map_bootstrap():
    Y, ids, ev, cs = setup(0.005)
    sel = select_winner(cs, y_true=dict(zip(ids, Y)), label_scores=ev, metric_name="map",
                        tolerance=0.01, n_bootstrap=500)
    assert sel.winner.name == "small" and sel.metric_name == "map"
    c = next(c for c in sel.comparisons if c["name"] == "small")
    order = np.argsort(ids)  # the selector pairs the shared images in sorted id order
    direct = paired_map_bootstrap(Y[order], ev["big"].proba[order], ev["small"].proba[order],
                                  n_bootstrap=500)
    assert c["diff"] == pytest.approx(direct.diff) and c["upper"] == pytest.approx(direct.upper_one_sided)
    assert c["n_images"] == len(ids) and c["equivalent"] and c["cheaper_beyond_noise"]


def test_a_worse_cheaper_candidate_does_not_win_and_without_scores_best_wins():
    Y, ids, ev, cs = setup(0.3)
    sel = select_winner(cs, y_true=dict(zip(ids, Y)), label_scores=ev, metric_name="map",
                        tolerance=0.005, n_bootstrap=500)
    assert sel.winner.name == "big" and "not equivalent" in sel.why
    sel = select_winner(cs, y_true=dict(zip(ids, Y)), label_scores={}, metric_name="map")
    assert sel.winner.name == "big" and "equivalence cannot be shown" in sel.why


def test_threshold_metrics_use_each_candidates_thresholds():
    Y, ids, ev, cs = setup(0.005)
    th = np.full(Y.shape[1], 0.5)
    ev = {k: LabelScores(v.ids, v.proba, th) for k, v in ev.items()}
    sel = select_winner(cs, y_true=dict(zip(ids, Y)), label_scores=ev, metric_name="micro_f1",
                        tolerance=0.02, n_bootstrap=300)
    assert sel.metric_name == "micro_f1" and sel.winner.name == "small"


def test_plan_and_folds_mirror_the_single_label_plan():
    Y = truth(200)
    splits = ["val" if k % 5 == 0 else "train" for k in range(200)]
    plan = plan_multilabel_selection(Y, splits)
    assert (plan.mode, plan.k, plan.repeats) == ("cv", 5, 3)  # tiny: repeated CV
    folds = multilabel_fold_lookup([f"i{k}" for k in range(200)], Y, splits, plan, seed=0)
    F = np.stack(list(folds.values()), axis=1)
    assert F.shape == (3, 200) and set(np.unique(F)) == set(range(5))
    for f in range(5):  # every fold holds out every label
        assert (Y[F[0] == f].sum(0) > 0).all()
    val = plan_multilabel_selection(Y, splits, cv_max_rows=100)
    assert (val.mode, val.n_selection) == ("val", 40)
    vf = multilabel_fold_lookup([f"i{k}" for k in range(200)], Y, splits, val)
    assert sum(v[0] == 0 for v in vf.values()) == 40 and sum(v[0] == -1 for v in vf.values()) == 160
    assert multilabel_metric("balanced_accuracy") == "map" and multilabel_metric("micro_f1") == "micro_f1"
    with pytest.raises(ValueError, match="single-label"):
        multilabel_metric("top5")
