import json

import pytest

from pipeline.select import (Candidate, NoEligibleCandidateError, Selection, pareto_front,
                             promotion_decision, select_winner)


def cand(name, metric, lo, hi, lat, params, family="f", lat32=None):
    return Candidate(name=name, backbone=f"{family}/{name}", head="logreg", family=family,
                     metric=metric, ci_low=lo, ci_high=hi, latency_ms_b1=lat,
                     latency_ms_b32=lat32, params_m=params)


def test_ci_overlap_tie_goes_to_cheaper():
    big = cand("big", 0.92, 0.90, 0.94, lat=40.0, params=300.0)
    small = cand("small", 0.91, 0.89, 0.93, lat=4.0, params=5.0)   # overlaps big's CI
    far = cand("far", 0.80, 0.78, 0.82, lat=1.0, params=1.0)       # cheapest but clearly worse
    sel = select_winner([big, small, far])
    assert sel.winner.name == "small"
    assert [c.name for c in sel.ranked] == ["big", "small", "far"]
    assert [c.name for c in sel.tied] == ["small", "big"]
    assert sel.excluded == []
    assert "small" in sel.why and "big" in sel.why and "tied" in sel.why


def test_non_overlap_goes_to_best():
    big = cand("big", 0.95, 0.94, 0.96, lat=40.0, params=300.0)
    small = cand("small", 0.91, 0.89, 0.93, lat=4.0, params=5.0)
    sel = select_winner([small, big])
    assert sel.winner.name == "big"
    assert [c.name for c in sel.tied] == ["big"]
    assert "best metric" in sel.why


def test_tie_breaks_latency_then_params_then_metric():
    a = cand("a", 0.90, 0.85, 0.95, lat=5.0, params=50.0)
    b = cand("b", 0.89, 0.84, 0.94, lat=5.0, params=10.0)   # same latency, fewer params
    c = cand("c", 0.91, 0.86, 0.96, lat=5.0, params=10.0)   # same cost as b, better metric
    assert select_winner([a, b]).winner.name == "b"
    assert select_winner([a, b, c]).winner.name == "c"
    # Without CIs candidates are points: no overlap unless equal metric.
    p = cand("p", 0.90, None, None, lat=50.0, params=1.0)
    q = cand("q", 0.89, None, None, lat=1.0, params=1.0)
    assert select_winner([p, q]).winner.name == "p"


def test_constraints_exclude_with_reasons():
    big = cand("big", 0.95, 0.94, 0.96, lat=12.3, params=300.0)
    huge = cand("huge", 0.96, 0.95, 0.97, lat=8.0, params=900.0)
    untimed = cand("untimed", 0.97, 0.96, 0.98, lat=None, params=5.0)
    ok = cand("ok", 0.90, 0.89, 0.91, lat=3.0, params=5.0)
    sel = select_winner([big, huge, untimed, ok], max_latency_ms=10, max_params_m=500)
    assert sel.winner.name == "ok"
    reasons = {e.candidate.name: e.reason for e in sel.excluded}
    assert reasons["big"] == "latency 12.3 ms > budget 10 ms"
    assert reasons["huge"] == "params 900 M > budget 500 M"
    assert "not measured" in reasons["untimed"]
    assert "3 of 4 candidates excluded" in sel.why


def test_latency_key_b32():
    a = cand("a", 0.95, 0.94, 0.96, lat=20.0, params=10.0, lat32=2.0)
    b = cand("b", 0.80, 0.79, 0.81, lat=1.0, params=10.0, lat32=1.0)
    assert select_winner([a, b], max_latency_ms=5).winner.name == "b"
    assert select_winner([a, b], max_latency_ms=5, latency_key="latency_ms_b32").winner.name == "a"
    with pytest.raises(ValueError, match="latency_key"):
        select_winner([a, b], latency_key="latency_ms_b64")


def test_no_eligible_error_names_budgets_and_cheapest():
    a = cand("fastest", 0.80, 0.79, 0.81, lat=15.0, params=200.0)
    b = cand("smallest", 0.85, 0.84, 0.86, lat=30.0, params=20.0)
    with pytest.raises(NoEligibleCandidateError) as e:
        select_winner([a, b], max_latency_ms=10, max_params_m=10)
    msg = str(e.value)
    assert "latency_ms_b1 <= 10 ms" in msg and "params <= 10 M" in msg
    assert "Fastest candidate: fastest at 15 ms/img" in msg
    assert "Smallest candidate: smallest with 20 M params" in msg
    with pytest.raises(NoEligibleCandidateError, match="no candidates"):
        select_winner([])
    with pytest.raises(NoEligibleCandidateError, match="selection metric"):
        select_winner([cand("x", None, None, None, 1.0, 1.0)])
    with pytest.raises(ValueError, match="unique"):
        select_winner([a, a])


def test_selection_and_candidate_plain_data():
    c = Candidate("run1", "efficientnet/tf_efficientnet_lite0.in1k", "logreg", "efficientnet",
                  0.9, 0.88, 0.92, 3.0, 0.5, 4.7, extra={"run_id": "abc", "C": 1.0})
    assert Candidate.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    sel = select_winner([c, cand("other", 0.7, 0.6, 0.8, 2.0, 1.0)], max_latency_ms=2.5)
    assert isinstance(sel, Selection)
    d = json.loads(json.dumps(sel.to_dict()))
    assert d["winner"]["name"] == "other"
    assert d["excluded"][0]["reason"] == "latency 3 ms > budget 2.5 ms"
    with pytest.raises(ValueError, match="missing key"):
        Candidate.from_dict({"name": "x"})


def test_pareto_front():
    cs = [cand("a", 0.70, None, None, 1.0, 1.0),
          cand("b", 0.80, None, None, 2.0, 1.0),
          cand("c", 0.75, None, None, 3.0, 1.0),   # dominated by b
          cand("d", 0.90, None, None, 10.0, 1.0),
          cand("e", 0.90, None, None, 12.0, 1.0),  # dominated by d (equal metric, slower)
          cand("f", 0.60, None, None, 1.0, 1.0),   # dominated by a (same latency)
          cand("g", 0.99, None, None, None, 1.0)]  # no latency: ignored
    assert [c.name for c in pareto_front(cs)] == ["a", "b", "d"]
    assert pareto_front([]) == []


def test_promotion_decision():
    ok, why = promotion_decision(0.9, None)
    assert ok and "no current champion" in why
    ok, why = promotion_decision(0.91, 0.90, metric_name="balanced_accuracy")
    assert ok and "0.9100 > champion 0.9000" in why and "balanced_accuracy" in why
    ok, why = promotion_decision(0.90, 0.90)
    assert not ok and "not strictly better" in why and "--force" in why
    ok, why = promotion_decision(0.80, 0.90, force=True)
    assert ok and "forced" in why
    ok, why = promotion_decision(0.95, 0.90, challenger_split="h1", champion_split="h2")
    assert not ok and "different test split" in why
    ok, why = promotion_decision(0.95, 0.90, challenger_split="h1", champion_split="h1")
    assert ok
    ok, why = promotion_decision(None, 0.9)
    assert not ok and "no metric" in why
    ok, why = promotion_decision(float("nan"), 0.9)
    assert not ok


def test_negligible_cost_difference_does_not_beat_a_better_metric():
    # Same backbone, two heads: 0.01 M fewer parameters is not "cheaper" than a better head.
    linear = Candidate("b+linear", "b", "linear", "cnn", 0.63, 0.54, 0.72, latency_ms_b1=38.1,
                       params_m=3.40)
    centroid = Candidate("b+centroid", "b", "centroid", "cnn", 0.60, 0.51, 0.69,
                         latency_ms_b1=38.1, params_m=3.39)
    assert select_winner([centroid, linear]).winner.name == "b+linear"
    # A backbone twice as fast inside the tie still wins over the best metric.
    fast = Candidate("f+linear", "f", "linear", "cnn", 0.58, 0.49, 0.67, latency_ms_b1=19.0,
                     params_m=3.40)
    assert select_winner([centroid, linear, fast]).winner.name == "f+linear"
