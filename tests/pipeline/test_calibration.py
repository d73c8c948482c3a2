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


def test_an_added_class_needs_the_majority_not_the_calibrated_near_unanimity():
    from feature_store.index import SupportIndex
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 4
    X = np.concatenate([centres[c] + rng.normal(size=(30, 16)) for c in range(3)]).astype(np.float32)
    y = [f"c{c}" for c in range(3) for _ in range(30)]
    head = LinearProbe(weight_decays=[0.1], max_iter=200, n_threads=1).fit(X, y)
    new = (centres[3] + rng.normal(size=(12, 16))).astype(np.float32)
    support = SupportIndex(16)
    support.add(np.concatenate([X, new]), y + ["added"] * 12)
    # a calibrated near-unanimity, and a classifier threshold nothing reaches: every image votes
    pred = Predictor(None, head, support=support, knn_k=10, knn_threshold=0.95, threshold=1.01)
    assert pred.support_only_classes == ["added"]
    assert pred.vote_threshold("added") == DEFAULT_KNN_THRESHOLD and pred.vote_threshold("c0") == 0.95
    # a query amid the added examples with 3 of its 10 neighbours from c0: agreement ~0.7
    scores = np.array([[0.9] * 7 + [0.85] * 3])
    labels = np.array([["added"] * 7 + ["c0"] * 3])
    vote, agreement = knn_vote(scores, labels, pred.support_class_sizes())
    assert vote[0] == "added" and DEFAULT_KNN_THRESHOLD <= agreement[0] < 0.95
    q = (centres[3] + rng.normal(size=(5, 16)) * 0.5).astype(np.float32)
    answers = pred.predict_embeddings(q)
    assert all(a.decision == "fallback" and a.label == "added" for a in answers)
    # images of a known class whose vote is not near-unanimous still abstain
    mixed = (0.6 * centres[0] + 0.4 * centres[1] + rng.normal(size=(40, 16))).astype(np.float32)
    scores, labels, _ = support.search(mixed, 10)
    vote, agreement = knn_vote(scores, labels, pred.support_class_sizes())
    between = [i for i in range(len(mixed)) if vote[i] != "added" and 0.6 <= agreement[i] < 0.95]
    assert between  # votes a majority default would have answered
    answers = pred.predict_embeddings(mixed)
    assert all(answers[i].decision == "abstain" for i in between)
