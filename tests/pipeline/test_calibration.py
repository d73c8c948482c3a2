"""The fallback's vote and when its threshold may be calibrated (synthetic, known answers)."""

import numpy as np
import pytest

from pipeline.calibration import (DEFAULT_KNN_THRESHOLD, MIN_VOTE_NEIGHBOURS, knn_vote,
                                  min_calibration_rows)


def test_min_calibration_rows_is_what_all_correct_rows_can_show():
    assert min_calibration_rows(0.9) == 29 and min_calibration_rows(0.95) == 59
    for p in (0.8, 0.9, 0.95):
        n = min_calibration_rows(p)
        assert p ** n <= 0.05 < p ** (n - 1)  # one row fewer could not rule out precision p


def test_vote_without_sizes_is_the_weighted_majority():
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.9, 0.1, 0.1, 0.1]])
    labels = np.array([["a", "b", "a", "b"], ["b", "a", "a", ""]])
    vote, agreement = knn_vote(scores, labels)
    assert list(vote) == ["a", "b"]
    assert agreement[0] == pytest.approx(1.6 / 3.0) and agreement[1] == pytest.approx(0.9 / 1.1)


def test_a_small_added_class_can_win_among_its_own_nearest():
    # 10 neighbours: the 3 nearest are the 3 examples of a class added at serving time
    scores = np.array([[0.95, 0.94, 0.93, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]])
    labels = np.array([["new"] * 3 + ["a"] * 4 + ["b"] * 3])
    vote, agreement = knn_vote(scores, labels)
    assert agreement[0] < DEFAULT_KNN_THRESHOLD  # with k = 10 it never reaches a majority
    vote, agreement = knn_vote(scores, labels, {"new": 3, "a": 500, "b": 500})
    assert vote[0] == "new" and agreement[0] == pytest.approx(1.0)
    # but only where its examples really are the nearest: behind two others it loses
    shifted = np.array([["a", "b", "new", "new", "new", "a", "a", "b", "b", "a"]])
    vote, agreement = knn_vote(scores, shifted, {"new": 3, "a": 500, "b": 500})
    assert vote[0] != "new" or agreement[0] < DEFAULT_KNN_THRESHOLD


def test_one_example_cannot_decide_alone():
    scores = np.array([[0.99, 0.5, 0.5, 0.5, 0.5]])
    labels = np.array([["solo", "a", "b", "a", "b"]])
    vote, agreement = knn_vote(scores, labels, {"solo": 1, "a": 100, "b": 100})
    assert MIN_VOTE_NEIGHBOURS == 3
    assert not (vote[0] == "solo" and agreement[0] >= DEFAULT_KNN_THRESHOLD)


def test_predictor_keeps_the_default_vote_threshold_on_too_few_uncertain_rows():
    from feature_store.index import SupportIndex
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3

    def sample(n):
        y = np.repeat(np.arange(3), n)
        return (centres[y] + rng.normal(size=(len(y), 16))).astype(np.float32), [f"c{v}" for v in y]

    X, y = sample(40)
    head = LinearProbe(weight_decays=[0.1], max_iter=200, n_threads=1).fit(X, y)
    support = SupportIndex(16)
    support.add(X, y)
    few = Predictor(None, head, support=support, knn_k=5, knn_threshold=DEFAULT_KNN_THRESHOLD)
    Xv, yv = sample(5)  # 15 validation rows: fewer uncertain ones than 90 % precision needs
    few.calibrate(Xv, yv, target_precision=0.9)
    assert few.knn_threshold == DEFAULT_KNN_THRESHOLD
    assert few.info["calibration"]["knn_threshold_calibrated"] is False
    # plenty of uncertain rows: the threshold is calibrated (noisier data, a stricter target)
    many = Predictor(None, head, support=support, knn_k=5)
    Xv, yv = sample(400)
    Xv = Xv + rng.normal(size=Xv.shape).astype(np.float32) * 3
    many.calibrate(Xv, yv, target_precision=0.99, knn_target_precision=0.9)
    assert many.info["calibration"]["knn_threshold_calibrated"] is True
