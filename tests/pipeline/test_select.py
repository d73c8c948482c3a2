import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from pipeline.paired import PairedDifference, metric_from_labels, paired_bootstrap
from pipeline.select import (Candidate, NoEligibleCandidateError, PromotionDecision, Selection,
                             pareto_front, promotion_decision, select_winner)

N_CLASSES = 10


def cand(name, metric, lat=None, params=None, *, noise=None, lat32=None, family="f", std=None):
    return Candidate(name=name, backbone=f"{family}/{name}", head="logreg", family=family,
                     metric=metric, metric_std=std, latency_ms_b1=lat, latency_ms_b32=lat32,
                     latency_noise_ms_b1=noise, params_m=params)


def labels(n, seed=0, k=N_CLASSES):
    return np.random.default_rng(seed).integers(0, k, n)


def predict(y, acc, seed, k=N_CLASSES):
    """Predictions correct with probability `acc`, errors independent of any other model's."""
    rng = np.random.default_rng(seed)
    wrong = (y + rng.integers(1, k, len(y))) % k
    return np.where(rng.random(len(y)) < acc, y, wrong)


def degrade(y, pred, n_flips, seed, k=N_CLASSES):
    """A copy of `pred` with `n_flips` of its correct predictions made wrong (correlated)."""
    rng = np.random.default_rng(seed)
    out = pred.copy()
    idx = rng.choice(np.flatnonzero(pred == y), n_flips, replace=False)
    out[idx] = (y[idx] + 1) % k
    return out


def as_map(arr, ids=None):
    ids = range(len(arr)) if ids is None else ids
    return {f"img{i}": f"c{v}" for i, v in zip(ids, arr)}


def score(y, pred, metric="balanced_accuracy"):
    return metric_from_labels(metric, y, pred)


def comparison(sel, name):
    return next(c for c in sel.comparisons if c["name"] == name)


# ----------------------------------------------------------------------------- paired statistics

def test_metrics_match_sklearn_on_random_labels():
    rng = np.random.default_rng(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # sklearn warns when predictions hold unseen classes
        for _ in range(30):
            n, k = int(rng.integers(1, 200)), int(rng.integers(1, 8))
            y = rng.integers(0, k, n).astype(str)
            p = rng.integers(0, k + 2, n).astype(str)
            assert metric_from_labels("balanced_accuracy", y, p) == \
                pytest.approx(balanced_accuracy_score(y, p), abs=1e-12)
            assert metric_from_labels("macro_f1", y, p) == \
                pytest.approx(f1_score(y, p, average="macro", zero_division=0), abs=1e-12)
            assert metric_from_labels("accuracy", y, p) == pytest.approx(accuracy_score(y, p))
            assert metric_from_labels("top5", y, p) == pytest.approx(accuracy_score(y, p))
    with pytest.raises(ValueError, match="unknown metric"):
        metric_from_labels("auc", ["a"], ["a"])
    with pytest.raises(ValueError, match="entries"):
        metric_from_labels("accuracy", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="0 images"):
        metric_from_labels("accuracy", [], [])


def test_paired_bootstrap_is_seeded_and_consistent():
    y = labels(800)
    a, b = predict(y, 0.85, 1), predict(y, 0.80, 2)
    r = paired_bootstrap("balanced_accuracy", y, a, b, n_bootstrap=500, seed=7)
    assert isinstance(r, PairedDifference) and r.n == 800
    assert r.diff == pytest.approx(score(y, a) - score(y, b))
    assert r.low <= r.lower_one_sided <= r.upper_one_sided <= r.high
    assert r.lower_one_sided < r.diff < r.upper_one_sided
    assert paired_bootstrap("balanced_accuracy", y, a, b, n_bootstrap=500, seed=7) == r
    assert paired_bootstrap("balanced_accuracy", y, a, b, n_bootstrap=500, seed=8) != r
    # Swapping the models mirrors the distribution.
    s = paired_bootstrap("balanced_accuracy", y, b, a, n_bootstrap=500, seed=7)
    assert s.diff == pytest.approx(-r.diff)
    assert s.upper_one_sided == pytest.approx(-r.lower_one_sided)
    assert json.loads(json.dumps(r.to_dict()))["n"] == 800
    # Identical models: a zero difference, and bounds no tighter than agreeing on all 800 images
    # allows (every resample would say exactly zero; the exact binomial bound does not).
    z = paired_bootstrap("macro_f1", y, a, a, n_bootstrap=50)
    assert z.diff == 0.0 and z.upper_one_sided == pytest.approx(1 - 0.05 ** (1 / 800))
    assert z.lower_one_sided == pytest.approx(-z.upper_one_sided) and z.high == pytest.approx(1 - 0.025 ** (1 / 800))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap("accuracy", y, a, b, confidence=1.0)
    with pytest.raises(ValueError, match="n_bootstrap"):
        paired_bootstrap("accuracy", y, a, b, n_bootstrap=0)


def test_paired_interval_is_tighter_than_independent_intervals():
    # Highly correlated models: pairing cancels the shared errors.
    y = labels(2000)
    a = predict(y, 0.85, 1)
    b = degrade(y, a, 20, seed=2)
    r = paired_bootstrap("accuracy", y, a, b, n_bootstrap=500)
    assert r.diff == pytest.approx(0.01)
    assert r.high - r.low < 0.015   # an unpaired 95 % interval of one model alone is ~0.03 wide


def test_paired_bootstrap_interval_covers_the_true_difference():
    # Population: per-image correctness of a (p=0.85) and b (p=0.80), correlated through a
    # shared difficulty; the true accuracy difference is 0.05.
    n, reps, covered, upper_ok = 400, 120, 0, 0
    for rep in range(reps):
        rng = np.random.default_rng(1000 + rep)
        u = rng.random(n)
        ok_a = u < 0.85
        ok_b = np.where(rng.random(n) < 0.7, u < 0.80, rng.random(n) < 0.80)
        y = np.zeros(n, dtype=int)
        r = paired_bootstrap("accuracy", y, np.where(ok_a, 0, 1), np.where(ok_b, 0, 1),
                             n_bootstrap=400, seed=rep)
        covered += r.low <= 0.05 <= r.high
        upper_ok += 0.05 <= r.upper_one_sided
    assert 0.88 <= covered / reps <= 0.995
    assert 0.88 <= upper_ok / reps


def test_paired_bootstrap_balanced_accuracy_handles_missing_classes():
    # A resample can drop a rare class; recall is averaged over the classes it contains.
    y = np.array([0] * 50 + [1] * 50 + [2])
    a = y.copy()
    b = np.where(y == 2, 0, y)
    r = paired_bootstrap("balanced_accuracy", y, a, b, n_bootstrap=300)
    assert r.diff == pytest.approx(1 / 3)
    # one image decides it: the interval reaches below zero (no image has b alone right, but 101
    # images cannot rule out b alone being right on a few per cent of images)
    assert r.low == pytest.approx(1 / 101 - (1 - 0.025 ** (1 / 101))) and r.high == pytest.approx(1 / 3)


def test_agreeing_on_a_few_images_is_no_proof_of_equivalence():
    """A cheaper fine-tune scored on the validation split, right on exactly the validation images
    the cross-validated probe also gets right: on 30 such images the bootstrap alone gives a
    zero-width interval and would call it equivalent within any tolerance, but 30 agreements only
    bound the gap by about 10 points (the rule of three), so it does not win. On 3 000 agreeing
    images the bound is 0.1 point, and it does."""
    for n_val, cheaper_wins in ((30, False), (3000, True)):
        n = 10 * n_val
        y = labels(n)
        probe = predict(y, 0.8, 1)
        val = np.arange(n - n_val, n)
        probe[val] = y[val]
        preds = {"probe": as_map(probe), "ft": as_map(y[val], val)}
        cs = [cand("probe", score(y, probe), lat=40.0, params=300.0, noise=0.5),
              cand("ft", 1.0, lat=4.0, params=5.0, noise=0.2)]
        sel = select_winner(cs, y_true=as_map(y), predictions=preds)
        assert sel.ranked[0].name == "probe"  # 1.000 on its own images vs 1.000 on them: no rank
        c = comparison(sel, "ft")
        assert c["n_images"] == n_val and c["diff"] == 0.0
        assert c["upper"] == pytest.approx(1 - 0.05 ** (1 / n_val)) and c["equivalent"] == cheaper_wins
        assert sel.winner.name == ("ft" if cheaper_wins else "probe"), sel.why


# ----------------------------------------------------------------------------- selection

def test_better_model_kept_over_much_cheaper_one():
    y = labels(5000)
    big, small = predict(y, 0.90, 1), predict(y, 0.88, 2)
    cs = [cand("big", score(y, big), lat=40.0, params=300.0, noise=0.5),
          cand("small", score(y, small), lat=4.0, params=5.0, noise=0.2)]
    sel = select_winner(cs, y_true=as_map(y), predictions={"big": as_map(big),
                                                           "small": as_map(small)})
    assert sel.winner.name == "big"
    c = comparison(sel, "small")
    assert c["cheaper_beyond_noise"] and not c["equivalent"] and c["dominated_by"] is None
    assert c["n_images"] == 5000 and 0.01 < c["diff"] < 0.03 and c["upper"] > 0.005
    assert "Nearest cheaper alternative: small" in sel.why and "not equivalent" in sel.why
    assert "> 0.50" in sel.why


def test_cheaper_model_within_tolerance_wins():
    y = labels(5000)
    big = predict(y, 0.90, 1)
    small = degrade(y, big, 10, seed=3)   # 0.2 point worse, on otherwise the same images
    cs = [cand("big", score(y, big), lat=21.4, params=300.0, noise=0.2),
          cand("small", score(y, small), lat=13.2, params=5.0, noise=0.2)]
    sel = select_winner(cs, y_true=as_map(y), tolerance=0.005, metric_name="accuracy",
                        predictions={"big": as_map(big), "small": as_map(small)})
    assert sel.winner.name == "small"
    c = comparison(sel, "small")
    assert c["diff"] == pytest.approx(0.002) and c["upper"] <= 0.005 and c["equivalent"]
    assert "small is within the tolerance of big: paired difference d = 0.20 point" in sel.why
    assert "≤ 0.50) on 5000 images" in sel.why
    assert "38 % faster (13.2 vs 21.4 ms/img, noise 0.4 ms)" in sel.why
    # A tighter tolerance refuses the same trade.
    sel = select_winner(cs, y_true=as_map(y), tolerance=0.001, metric_name="accuracy",
                        predictions={"big": as_map(big), "small": as_map(small)})
    assert sel.winner.name == "big"


def test_tiny_selection_set_does_not_tie_everything():
    y = labels(60)
    big = np.where(np.arange(60) < 54, y, (y + 1) % N_CLASSES)   # 90 %
    small = degrade(y, big, 3, seed=1)                             # 85 %, same images otherwise
    cs = [cand("big", score(y, big, "accuracy"), lat=40.0, params=300.0),
          cand("small", score(y, small, "accuracy"), lat=4.0, params=5.0)]
    sel = select_winner(cs, y_true=as_map(y), metric_name="accuracy",
                        predictions={"big": as_map(big), "small": as_map(small)})
    assert sel.winner.name == "big"
    c = comparison(sel, "small")
    assert c["n_images"] == 60 and c["diff"] == pytest.approx(0.05) and c["upper"] > 0.005
    assert not c["equivalent"]


def test_dominated_candidate_never_wins():
    y = labels(3000)
    best = predict(y, 0.90, 1)
    mid, cheap = degrade(y, best, 2, seed=2), degrade(y, best, 4, seed=3)
    preds = {"best": as_map(best), "mid": as_map(mid), "cheap": as_map(cheap)}
    # cheap is the fastest, but only by less than the noise, and mid has the better metric.
    cs = [cand("best", 0.900, lat=40.0, params=300.0, noise=0.5),
          cand("mid", 0.899, lat=10.3, params=5.0, noise=0.5),
          cand("cheap", 0.898, lat=10.0, params=5.0, noise=0.5)]
    sel = select_winner(cs, y_true=as_map(y), predictions=preds)
    assert comparison(sel, "cheap")["dominated_by"] == "mid"
    assert comparison(sel, "cheap")["equivalent"] and comparison(sel, "mid")["equivalent"]
    assert sel.winner.name == "mid"
    # Even when the dominating candidate cannot be shown equivalent, cheap does not win.
    sel = select_winner(cs, y_true=as_map(y), predictions={k: preds[k] for k in ("best", "cheap")})
    assert sel.winner.name == "best" and comparison(sel, "cheap")["dominated_by"] == "mid"
    assert "Nearest cheaper alternative: mid" in sel.why and "cannot be shown" in sel.why
    # The text names the domination when the nearest cheaper alternative is the dominated one.
    sel = select_winner(cs[::2], y_true=as_map(y), predictions=preds)
    assert sel.winner.name == "cheap"
    dominated = [cs[0], cand("cheap", 0.898, lat=10.0, params=6.0, noise=0.5),
                 cand("mid", 0.899, lat=10.3, params=5.0, noise=0.5, std=0.01)]
    sel = select_winner(dominated, y_true=as_map(y), predictions={"best": preds["best"],
                                                                  "cheap": preds["cheap"]})
    assert sel.winner.name == "best"


@pytest.mark.parametrize("seed", range(12))
def test_winner_is_never_dominated_and_always_justified(seed):
    rng = np.random.default_rng(seed)
    y = labels(300, seed)
    base = predict(y, 0.9, seed)
    cs, preds = [], {}
    for i in range(8):
        flips = int(rng.integers(0, 6))
        p = degrade(y, base, flips, seed=seed * 100 + i)
        preds[f"m{i}"] = as_map(p)
        cs.append(cand(f"m{i}", round(0.9 - flips / 300 + rng.normal(0, 0.002), 4),
                       lat=float(rng.choice([5.0, 5.2, 8.0, 20.0])),
                       params=float(rng.choice([3.0, 3.1, 10.0])),
                       noise=float(rng.choice([0.0, 0.3]))))
    sel = select_winner(cs, y_true=as_map(y), predictions=preds, tolerance=0.02,
                        n_bootstrap=200)
    w = sel.winner
    for c in sel.ranked:
        if c is w:
            continue
        worse_or_equal_cost = (
            (c.latency_ms_b1 - w.latency_ms_b1) <= (c.latency_noise_ms_b1 + w.latency_noise_ms_b1)
            and c.params_m <= w.params_m)
        assert not (c.metric > w.metric and worse_or_equal_cost), (c, w)
    entry = comparison(sel, w.name)
    assert w is sel.ranked[0] or (entry["equivalent"] and entry["cheaper_beyond_noise"]
                                  and entry["dominated_by"] is None)


def test_latency_gap_inside_noise_is_no_gap():
    y = labels(1000)
    a = predict(y, 0.9, 1)
    preds = {"a": as_map(a), "b": as_map(a)}   # identical predictions: surely equivalent
    a_c = cand("a", 0.901, lat=10.0, params=10.0, noise=0.5)
    b_c = cand("b", 0.900, lat=9.4, params=10.0, noise=0.5)   # 0.6 ms faster, noise 1.0 ms
    sel = select_winner([a_c, b_c], y_true=as_map(y), predictions=preds)
    assert sel.winner.name == "a"
    assert not comparison(sel, "b")["cheaper_beyond_noise"]
    assert comparison(sel, "b")["equivalent"]
    assert "within noise" in sel.why
    # Without noise, 6 % faster is a real gap; 3 % is below min_cost_gap.
    quiet = [cand("a", 0.901, lat=10.0, params=10.0), cand("b", 0.900, lat=9.4, params=10.0)]
    assert select_winner(quiet, y_true=as_map(y), predictions=preds).winner.name == "b"
    quiet[1] = cand("b", 0.900, lat=9.7, params=10.0)
    sel = select_winner(quiet, y_true=as_map(y), predictions=preds)
    assert sel.winner.name == "a" and "minimum cost gap" in sel.why


def test_equal_latency_falls_back_to_parameters():
    y = labels(1000)
    p = as_map(predict(y, 0.9, 1))
    preds = {"linear": p, "centroid": p, "tiny": p}
    # Same backbone, two heads: 0.01 M fewer parameters is not "cheaper" than a better head.
    linear = Candidate("linear", "b", "linear", "cnn", 0.63, latency_ms_b1=38.1, params_m=3.40)
    centroid = Candidate("centroid", "b", "centroid", "cnn", 0.62, latency_ms_b1=38.1,
                         params_m=3.39)
    assert select_winner([centroid, linear], y_true=as_map(y),
                         predictions=preds).winner.name == "linear"
    tiny = Candidate("tiny", "b", "knn", "cnn", 0.62, latency_ms_b1=38.1, params_m=1.0)
    sel = select_winner([centroid, linear, tiny], y_true=as_map(y), predictions=preds)
    assert sel.winner.name == "tiny" and "71 % smaller" in sel.why


def test_without_predictions_best_wins():
    cs = [cand("big", 0.92, lat=40.0, params=300.0), cand("small", 0.919, lat=4.0, params=5.0)]
    sel = select_winner(cs)
    assert sel.winner.name == "big"
    c = comparison(sel, "small")
    assert c["diff"] is None and c["upper"] is None and c["n_images"] == 0
    assert c["cheaper_beyond_noise"] and not c["equivalent"]
    assert "equivalence cannot be shown" in sel.why
    y = labels(100)
    sel = select_winner(cs, y_true=as_map(y), predictions={"small": as_map(y)})
    assert sel.winner.name == "big"


def test_different_id_sets_are_compared_on_the_intersection():
    y = labels(3000)
    ft = predict(y, 0.9, 1)
    probe = degrade(y, ft, 5, seed=2)
    y_map = as_map(y)
    val_ids, oof_ids = range(0, 1000), range(500, 3000)   # fine-tune: validation only
    preds = {"ft": as_map(ft[:1000], val_ids), "probe": as_map(probe[500:], oof_ids)}
    cs = [cand("ft", 0.90, lat=30.0, params=90.0), cand("probe", 0.899, lat=5.0, params=5.0)]
    sel = select_winner(cs, y_true=y_map, predictions=preds, metric_name="macro_f1")
    c = comparison(sel, "probe")
    assert c["n_images"] == 500
    assert comparison(sel, "ft")["n_images"] == 1000
    direct = paired_bootstrap("macro_f1", [f"c{v}" for v in y[500:1000]],
                              [f"c{v}" for v in ft[500:1000]],
                              [f"c{v}" for v in probe[500:1000]])
    assert c["diff"] == pytest.approx(direct.diff)
    assert c["upper"] == pytest.approx(direct.upper_one_sided)
    assert "on 500 images" in sel.why


def test_a_lucky_score_on_few_images_does_not_outrank_cross_validated_ones():
    """A fine-tune scored on a 30-image validation split (a perfect 1.000) against probes
    cross-validated on all 600 train+val images: the scores do not compare. The probe stays best
    unless the fine-tune beats it on the 30 images both were scored on."""
    y = labels(600, k=3)
    probe = predict(y, 0.80, 1, k=3)
    weaker = degrade(y, probe, 30, seed=2, k=3)
    val = np.arange(570, 600)
    y_map = {f"img{i}": f"c{v}" for i, v in enumerate(y)}
    ft_lucky = y.copy()                       # right on all 30 validation images ...
    probe_val = probe.copy()
    probe_val[val] = y[val]                   # ... and so is the probe there: a tie
    preds = {"probe": as_map(probe_val), "weaker": as_map(weaker), "ft": as_map(ft_lucky[val], val)}
    cs = [cand("ft", 1.0, lat=10.0, params=3.4), cand("probe", score(y, probe_val), lat=10.0, params=3.4),
          cand("weaker", score(y, weaker), lat=10.0, params=3.4)]
    sel = select_winner(cs, y_true=y_map, predictions=preds)
    assert sel.winner.name == "probe" and sel.ranked[0].name == "probe"
    assert "Scores on different images: ft (1.0000 on its 30 images) does not rank above probe: " \
           "1.0000 vs 1.0000 on the 30 images both were scored on" in sel.why
    # a cross-validated candidate is not "dominated" by the fine-tune's score on other images
    assert comparison(sel, "probe")["dominated_by"] is None

    # the fine-tune that does beat the probe on the shared images is best
    probe_val[val[:6]] = (y[val[:6]] + 1) % 3
    preds["probe"] = as_map(probe_val)
    cs[1] = cand("probe", score(y, probe_val), lat=10.0, params=3.4)
    sel = select_winner(cs, y_true=y_map, predictions=preds)
    assert sel.ranked[0].name == "ft" and "ft (1.0000 on its 30 images) ranks above probe" in sel.why
    # scored on the same images throughout, nothing changes and nothing is said
    same = select_winner(cs[1:], y_true=y_map, predictions=preds)
    assert same.ranked[0].name == "probe" and "different images" not in same.why


def test_group_scoring_equals_pairwise():
    y = labels(700)
    ps = {f"m{i}": predict(y, 0.8 - 0.01 * i, i) for i in range(4)}
    cs = [cand(n, score(y, p), lat=10.0 - i, params=5.0) for i, (n, p) in enumerate(ps.items())]
    sel = select_winner(cs, y_true=as_map(y), predictions={n: as_map(p) for n, p in ps.items()},
                        n_bootstrap=300, seed=4)
    best = sel.ranked[0].name
    order = sorted(range(700), key=lambda i: f"img{i}")   # the selector orders ids as strings
    for c in sel.ranked[1:]:
        r = paired_bootstrap("balanced_accuracy", y[order], ps[best][order], ps[c.name][order],
                             n_bootstrap=300, seed=4)
        assert comparison(sel, c.name)["upper"] == pytest.approx(r.upper_one_sided, abs=1e-12)


def test_constraints_exclude_with_reasons():
    big = cand("big", 0.95, lat=12.3, params=300.0)
    huge = cand("huge", 0.96, lat=8.0, params=900.0)
    untimed = cand("untimed", 0.97, lat=None, params=5.0)
    ok = cand("ok", 0.90, lat=3.0, params=5.0)
    sel = select_winner([big, huge, untimed, ok], max_latency_ms=10, max_params_m=500)
    assert sel.winner.name == "ok"
    reasons = {e.candidate.name: e.reason for e in sel.excluded}
    assert reasons["big"] == "latency 12.3 ms > budget 10 ms"
    assert reasons["huge"] == "params 900 M > budget 500 M"
    assert "not measured" in reasons["untimed"]
    assert "3 of 4 candidates excluded" in sel.why
    assert [c["name"] for c in sel.comparisons] == ["ok"]


def test_ranking_and_ties():
    a = cand("a", 0.90, lat=5.0, params=50.0)
    b = cand("b", 0.90, lat=5.0, params=10.0)   # same metric, cheaper: best on the tie
    c = cand("c", 0.80, lat=1.0, params=1.0)
    sel = select_winner([a, c, b])
    assert [x.name for x in sel.ranked] == ["b", "a", "c"]
    assert sel.winner.name == "b"
    assert comparison(sel, "a")["dominated_by"] is None   # equal metric: not dominated


def test_latency_key_b32():
    a = cand("a", 0.95, lat=20.0, params=10.0, lat32=2.0)
    b = cand("b", 0.80, lat=1.0, params=10.0, lat32=1.0)
    assert select_winner([a, b], max_latency_ms=5).winner.name == "b"
    assert select_winner([a, b], max_latency_ms=5, latency_key="latency_ms_b32").winner.name == "a"
    with pytest.raises(ValueError, match="latency_key"):
        select_winner([a, b], latency_key="latency_ms_b64")
    with pytest.raises(ValueError, match="unknown metric"):
        select_winner([a, b], metric_name="auc")


def test_no_eligible_error_names_budgets_and_cheapest():
    a = cand("fastest", 0.80, lat=15.0, params=200.0)
    b = cand("smallest", 0.85, lat=30.0, params=20.0)
    with pytest.raises(NoEligibleCandidateError) as e:
        select_winner([a, b], max_latency_ms=10, max_params_m=10)
    msg = str(e.value)
    assert "latency_ms_b1 <= 10 ms" in msg and "params <= 10 M" in msg
    assert "Fastest candidate: fastest at 15 ms/img" in msg
    assert "Smallest candidate: smallest with 20 M params" in msg
    with pytest.raises(NoEligibleCandidateError, match="no candidates"):
        select_winner([])
    with pytest.raises(NoEligibleCandidateError, match="selection metric"):
        select_winner([cand("x", None, 1.0, 1.0)])
    with pytest.raises(ValueError, match="unique"):
        select_winner([a, a])


def test_selection_and_candidate_plain_data():
    c = Candidate("run1", "efficientnet/tf_efficientnet_lite0.in1k", "logreg", "efficientnet",
                  0.9, 0.01, 3.0, 0.5, 0.1, 0.02, 4.7, extra={"run_id": "abc", "C": 1.0})
    assert Candidate.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    # Older rows carry test-split intervals; the selector ignores them.
    old = dict(c.to_dict(), ci_low=0.88, ci_high=0.92, unknown="x")
    assert Candidate.from_dict(old) == c
    y = labels(50)
    sel = select_winner([c, cand("other", 0.7, 2.0, 1.0)], max_latency_ms=2.5,
                        y_true=as_map(y), predictions={"other": as_map(y)})
    assert isinstance(sel, Selection)
    d = json.loads(json.dumps(sel.to_dict()))
    assert d["winner"]["name"] == "other" and d["best"] == "other"
    assert d["excluded"][0]["reason"] == "latency 3 ms > budget 2.5 ms"
    assert d["metric_name"] == "balanced_accuracy" and d["tolerance"] == 0.005
    assert d["comparisons"] == [{"name": "other", "diff": 0.0, "upper": 0.0, "n_images": 50,
                                 "cheaper_beyond_noise": False, "equivalent": True,
                                 "dominated_by": None}]
    assert "tied" not in d
    with pytest.raises(ValueError, match="missing key"):
        Candidate.from_dict({"name": "x"})


def test_pareto_front():
    cs = [cand("a", 0.70, 1.0, 1.0),
          cand("b", 0.80, 2.0, 1.0),
          cand("c", 0.75, 3.0, 1.0),    # dominated by b
          cand("d", 0.90, 10.0, 1.0),
          cand("e", 0.90, 12.0, 1.0),   # dominated by d (equal metric, slower)
          cand("f", 0.60, 1.0, 1.0),    # dominated by a (same latency)
          cand("g", 0.99, None, 1.0)]   # no latency: ignored
    assert [c.name for c in pareto_front(cs)] == ["a", "b", "d"]
    assert pareto_front([]) == []


# ----------------------------------------------------------------------------- promotion

def _promo_data(n=2000, challenger_acc=0.90, champion_acc=0.88, seed=0):
    y = labels(n, seed)
    return (as_map(predict(y, challenger_acc, seed + 1)),
            as_map(predict(y, champion_acc, seed + 2)), as_map(y))


def test_promotion_promotes_a_better_challenger():
    ch, cp, y = _promo_data()
    d = promotion_decision(ch, cp, y)
    assert isinstance(d, PromotionDecision) and d.promote
    assert d.n == 2000 and d.diff > 0 and d.low < d.diff < d.high
    assert d.reason.startswith("challenger − champion = +")
    assert "point [" in d.reason and "on 2000 test images, margin 0.5" in d.reason
    tags = d.to_tags()
    assert tags["promotion_n_images"] == "2000" and tags["promotion_margin"] == "0.005"
    assert float(tags["promotion_diff"]) == pytest.approx(d.diff)
    assert {"promotion_diff_low", "promotion_diff_high"} <= tags.keys()
    assert all(isinstance(v, str) for v in tags.values())


def test_promotion_refuses_worse_or_unproven_challengers():
    ch, cp, y = _promo_data(challenger_acc=0.88, champion_acc=0.90)
    d = promotion_decision(ch, cp, y)
    assert not d.promote and "worse on the point estimate" in d.reason and d.diff < 0
    # Slightly better on the point estimate, but 40 images cannot rule out a larger loss.
    y_small = labels(40)
    champ = np.where(np.arange(40) < 30, y_small, (y_small + 1) % N_CLASSES)
    chall = champ.copy()
    chall[30] = y_small[30]          # one more right,
    chall[0] = (y_small[0] + 1) % N_CLASSES
    chall[31] = y_small[31]          # one more wrong, one more right: +1 image net
    d = promotion_decision(as_map(chall), as_map(champ), as_map(y_small), metric_name="accuracy")
    assert d.diff == pytest.approx(0.025) and not d.promote
    assert "margin" in d.reason and "lower bound" in d.reason
    # Identical predictions: not worse, and the bound is exactly 0.
    d = promotion_decision(cp, cp, y)
    assert d.promote and d.diff == 0.0


def test_promotion_gate_branches():
    ch, cp, y = _promo_data()
    d = promotion_decision(ch, None, y)
    assert d.promote and "no current champion" in d.reason and d.diff is None
    assert "promotion_diff" not in d.to_tags()
    d = promotion_decision(None, None, None)
    assert d.promote
    for missing in (None, {}):
        d = promotion_decision(missing, cp, y)
        assert not d.promote and "evaluate it on the test split" in d.reason
    d = promotion_decision(ch, {}, y)
    assert not d.promote and "--force" in d.reason and "no recorded test predictions" in d.reason
    # A champion known only by its tags (an older version, no predictions) is not "no champion".
    for tags in ({"champion_metric_name": "balanced_accuracy"}, {"champion_split": "h1"}):
        d = promotion_decision(ch, None, y, **tags)
        assert not d.promote and "no recorded test predictions" in d.reason
    d = promotion_decision(ch, cp, y, champion_metric_name="accuracy")
    assert not d.promote
    assert "metrics differ: balanced_accuracy vs accuracy; promote with --force" in d.reason
    assert promotion_decision(ch, cp, y, champion_metric_name="balanced_accuracy").promote
    d = promotion_decision(ch, cp, y, challenger_split="h1", champion_split="h2")
    assert not d.promote and "different test split" in d.reason
    assert promotion_decision(ch, cp, y, challenger_split="h1", champion_split="h1").promote
    other_ids = {f"x{k}": v for k, v in cp.items()}
    d = promotion_decision(ch, other_ids, y)
    assert not d.promote and "share no labelled test image" in d.reason
    d = promotion_decision(ch, cp, None)
    assert not d.promote and "no test labels" in d.reason


def test_forced_promotion_records_the_difference():
    ch, cp, y = _promo_data(challenger_acc=0.85, champion_acc=0.90)
    d = promotion_decision(ch, cp, y, force=True)
    assert d.promote and d.reason.startswith("forced promotion: challenger − champion = −")
    assert d.diff < 0 and d.n == 2000
    d = promotion_decision(ch, {}, y, force=True)
    assert d.promote and d.diff is None and d.reason == "forced promotion"
    d = promotion_decision(None, None, None, force=True)
    assert d.promote and "no current champion" in d.reason
    d = promotion_decision(ch, cp, y, force=True, champion_metric_name="accuracy")
    assert d.promote and d.diff is None


def test_equal_scores_are_not_decided_by_a_timing_jitter():
    """Two candidates with the same selection score whose latencies differ by less than the
    minimum cost gap (a re-measurement could reverse them): the same winner either way."""
    from pipeline.select import Candidate, select_winner

    def pair(lat_linear, lat_centroid):
        return [Candidate(name="b+linear", backbone="b", head="linear", family="f", metric=0.86,
                          latency_ms_b1=lat_linear, params_m=5.0),
                Candidate(name="b+centroid", backbone="b", head="centroid", family="f", metric=0.86,
                          latency_ms_b1=lat_centroid, params_m=5.0)]

    a = select_winner(pair(1.044, 1.058)).winner.name
    b = select_winner(pair(1.058, 1.044)).winner.name
    assert a == b == "b+centroid"  # equal cost within 5 %: fewer parameters, then the name
    # a real cost gap still decides
    assert select_winner(pair(1.0, 2.0)).winner.name == "b+linear"


def test_scores_equal_but_for_summation_order_are_equal():
    """A balanced accuracy is a mean of per-class recalls; the same recalls in another order sum
    to a float a few ulps away. Such scores tie (the tie rule decides), whichever is larger."""
    from pipeline.select import Candidate, select_winner

    recalls = [0.95, 0.65, 0.975]
    s1 = (recalls[0] + recalls[1] + recalls[2]) / 3
    s2 = (recalls[2] + recalls[0] + recalls[1]) / 3
    assert s1 != s2  # the float issue itself

    def pair(m_linear, m_centroid):
        return [Candidate(name="b+linear", backbone="b", head="linear", family="f",
                          metric=m_linear, latency_ms_b1=1.0, params_m=5.000083),
                Candidate(name="b+centroid", backbone="b", head="centroid", family="f",
                          metric=m_centroid, latency_ms_b1=1.0, params_m=5.000064)]

    assert select_winner(pair(s1, s2)).winner.name == select_winner(pair(s2, s1)).winner.name \
        == "b+centroid"
    # a real difference in score still wins
    assert select_winner(pair(0.86, 0.855)).winner.name == "b+linear"
