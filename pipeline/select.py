"""Winner selection across (backbone, head) candidates, Pareto front and the promotion gate.

Rule (`select_winner`):
1. Drop candidates that break a budget (latency, parameter count) or lack a selection metric,
   each with a reason.
2. `best` is the eligible candidate with the highest selection metric (cross-validation mean or
   validation score; never the test split). Ties: cheaper beyond noise and `min_cost_gap`,
   else fewer parameters, then name (repeated timings cannot flip the choice).
   Scores measured on different images do not compare (probes cross-validated on train+val, a
   fine-tune scored on the validation split alone): `best` is then the top of the candidates
   scored on the widest image set, and one scored on other images takes its place only by a
   higher metric on the images both were scored on (single-label, with predictions).
3. A candidate is dominated when another eligible candidate scored on the same images has a
   strictly higher metric at no higher cost (latency within noise or lower, parameters not
   higher). Dominated candidates never win.
4. A non-dominated candidate may replace `best` only when it is
   (a) cheaper beyond noise: its latency is lower by more than both candidates' measurement
       noise together and by at least `min_cost_gap` of best's latency — or, with latency equal
       within noise, it has at least `min_cost_gap` fewer parameters (relative); and
   (b) equivalent: a one-sided paired bootstrap on the images both were scored on bounds
       metric(best) - metric(c) by at most `tolerance` at `confidence`. Overlapping intervals
       are not evidence of equivalence; a paired bound is. Without predictions it cannot be shown.
5. Among the candidates that qualify, the fastest wins; those within latency noise of it are
   narrowed to the fewest parameters (within `min_cost_gap`), then the higher metric, fewer
   parameters and name decide.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pipeline.multilabel.metrics import (MULTILABEL_METRICS, bootstrap_multilabel_scores,
                                         check_multilabel_metric)
from pipeline.paired import (METRICS, PairedDifference, check_bootstrap, check_metric,
                             bootstrap_scores, discordant_counts, encode, metric_from_labels,
                             paired_bootstrap, summarise)

__all__ = ["Candidate", "Exclusion", "Selection", "NoEligibleCandidateError", "PairedDifference",
           "LabelScores", "MULTILABEL_METRICS",
           "PromotionDecision", "metric_from_labels", "paired_bootstrap", "pareto_front",
           "promotion_decision", "select_winner", "LATENCY_KEYS", "METRICS"]

LATENCY_KEYS = ("latency_ms_b1", "latency_ms_b32")
_NOISE_KEYS = {"latency_ms_b1": "latency_noise_ms_b1", "latency_ms_b32": "latency_noise_ms_b32"}


def _num(x: Any) -> float | None:
    """float, or None for missing / NaN values."""
    if x is None:
        return None
    v = float(x)
    return None if math.isnan(v) else v


@dataclass(frozen=True)
class Candidate:
    """One trained (backbone, head) pair as the selector sees it. Plain data."""

    name: str                       # unique name or run id
    backbone: str
    head: str
    family: str
    metric: float | None            # selection score (CV mean or validation); never the test split
    metric_std: float | None = None           # spread of the score across folds
    latency_ms_b1: float | None = None        # median ms per image at batch size 1
    latency_ms_b32: float | None = None       # median ms per image at batch size 32
    latency_noise_ms_b1: float | None = None  # measurement noise of latency_ms_b1 (None: unknown)
    latency_noise_ms_b32: float | None = None
    params_m: float | None = None             # millions of parameters (backbone + head)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Candidate":
        known = {f.name for f in fields(cls)}
        for key in ("name", "backbone", "head", "family", "metric"):
            if key not in d:
                raise ValueError(f"Candidate.from_dict: missing key {key!r} in {sorted(d)}")
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class LabelScores:
    """One multi-label candidate's held-out (out-of-fold or validation) scores, the paired
    evidence of a multi-label selection: ``proba`` (n, L) for image ``ids``, columns in the same
    label order for every candidate; ``thresholds`` (L,) for the threshold metrics (F1, subset
    accuracy; mAP needs none)."""

    ids: Sequence[str]
    proba: Any
    thresholds: Any = None


@dataclass(frozen=True)
class Exclusion:
    candidate: Candidate
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate.to_dict(), "reason": self.reason}


@dataclass(frozen=True)
class Selection:
    winner: Candidate
    ranked: list[Candidate]          # eligible, best selection metric first (cheaper on ties)
    excluded: list[Exclusion]
    why: str
    latency_key: str = "latency_ms_b1"
    max_latency_ms: float | None = None
    max_params_m: float | None = None
    tolerance: float = 0.005
    metric_name: str = "balanced_accuracy"
    # One per eligible candidate, in `ranked` order, each against ranked[0] (the best):
    # name, diff (best - c on shared images), upper (one-sided bound), n_images,
    # cheaper_beyond_noise, equivalent, dominated_by.
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    confidence: float = 0.95
    min_cost_gap: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner.to_dict(),
                "best": self.ranked[0].name if self.ranked else None,
                "ranked": [c.to_dict() for c in self.ranked],
                "excluded": [e.to_dict() for e in self.excluded],
                "why": self.why, "latency_key": self.latency_key,
                "max_latency_ms": self.max_latency_ms, "max_params_m": self.max_params_m,
                "tolerance": self.tolerance, "metric_name": self.metric_name,
                "confidence": self.confidence, "min_cost_gap": self.min_cost_gap,
                "comparisons": [dict(c) for c in self.comparisons]}


class NoEligibleCandidateError(ValueError):
    """No candidate meets the budgets (or none has a metric)."""


def _inf(x: float | None) -> float:
    return math.inf if x is None else x


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def _pts(x: float) -> str:
    """Metric units as points (0.0123 -> '1.23')."""
    return f"{100 * x:.2f}"


def _lat(c: Candidate, key: str) -> float | None:
    return _num(getattr(c, key))


def _noise(c: Candidate, key: str) -> float:
    v = _num(getattr(c, _NOISE_KEYS[key]))
    return 0.0 if v is None else abs(v)


def _cost_key(c: Candidate, latency_key: str) -> tuple:
    return (_inf(_lat(c, latency_key)), _inf(_num(c.params_m)), -_num(c.metric), c.name)


def _describe(c: Candidate, latency_key: str) -> str:
    std = _num(c.metric_std)
    spread = "" if std is None else f" ± {std:.4f}"
    noise = _num(getattr(c, _NOISE_KEYS[latency_key]))
    lat_noise = "" if noise is None else f" ± {noise:.2g}"
    return (f"{c.name} (metric {_num(c.metric):.4f}{spread}, "
            f"{_fmt(_lat(c, latency_key))}{lat_noise} ms/img, {_fmt(_num(c.params_m))} M params)")


def _check_latency_key(latency_key: str) -> None:
    if latency_key not in LATENCY_KEYS:
        raise ValueError(f"latency_key must be one of {LATENCY_KEYS}, got {latency_key!r}")


# ----------------------------------------------------------------------------- costs

def _latency_relation(c: Candidate, ref: Candidate, key: str) -> str | None:
    """'lower' / 'equal' / 'higher' latency of c vs ref beyond both noises; None if unknown.

    Two unknown latencies count as equal (nothing distinguishes them); one unknown is not
    comparable.
    """
    lc, lr = _lat(c, key), _lat(ref, key)
    if lc is None and lr is None:
        return "equal"
    if lc is None or lr is None:
        return None
    gap = lr - lc
    noise = _noise(c, key) + _noise(ref, key)
    if abs(gap) <= noise:
        return "equal"
    return "lower" if gap > 0 else "higher"


#: scores closer than this are the same score: a mean of per-class rates summed in another order
#: differs in its last bits, and such a difference must not rank two candidates
SCORE_EPS = 1e-9


def _same_score(a: Any, b: Any) -> bool:
    x, y = _num(a), _num(b)
    return x is not None and y is not None and abs(x - y) <= SCORE_EPS * max(1.0, abs(x), abs(y))


def _dominates(d: Candidate, c: Candidate, key: str) -> bool:
    """d has a strictly higher metric at no higher cost than c."""
    if not _num(d.metric) > _num(c.metric) or _same_score(d.metric, c.metric):
        return False
    if _latency_relation(d, c, key) not in ("lower", "equal"):
        return False
    pd, pc = _num(d.params_m), _num(c.params_m)
    if pd is None or pc is None:
        return pd is None and pc is None
    return pd <= pc


@dataclass(frozen=True)
class _CostGap:
    cheaper: bool
    text: str        # "38 % faster (13.2 vs 21.4 ms/img, noise 0.4 ms)" or why it is not cheaper


def _cost_gap(c: Candidate, best: Candidate, key: str, min_cost_gap: float) -> _CostGap:
    rel = _latency_relation(c, best, key)
    lc, lb = _lat(c, key), _lat(best, key)
    noise = _noise(c, key) + _noise(best, key)
    if rel is None:
        return _CostGap(False, f"latency not measured for both ({_fmt(lc)} vs {_fmt(lb)} ms/img)")
    if rel == "higher":
        return _CostGap(False, f"not faster ({lc:.3g} vs {lb:.3g} ms/img)")
    if rel == "lower":
        frac = (lb - lc) / lb if lb > 0 else 0.0
        detail = f"{lc:.3g} vs {lb:.3g} ms/img, noise {noise:.2g} ms"
        if frac >= min_cost_gap:
            return _CostGap(True, f"{100 * frac:.0f} % faster ({detail})")
        return _CostGap(False, f"only {100 * frac:.1f} % faster ({detail}), below the "
                               f"{100 * min_cost_gap:.0f} % minimum cost gap")
    pc, pb = _num(c.params_m), _num(best.params_m)
    same = ("latency equal within noise" if lc is not None
            else "latency not measured")
    if lc is not None:
        same += f" ({lc:.3g} vs {lb:.3g} ms/img, noise {noise:.2g} ms)"
    if pc is None or pb is None:
        return _CostGap(False, f"{same} and parameter count unknown")
    frac = (pb - pc) / pb if pb > 0 else 0.0
    if frac >= min_cost_gap and pc < pb:
        return _CostGap(True, f"{100 * frac:.0f} % smaller ({pc:.3g} vs {pb:.3g} M params, "
                              f"{same})")
    return _CostGap(False, f"cost gap within noise: {same} and {pc:.3g} vs {pb:.3g} M params "
                           f"(under the {100 * min_cost_gap:.0f} % minimum gap)")


def _pick_cheapest(pool: list[Candidate], key: str, min_cost_gap: float) -> Candidate:
    """Fastest; those within latency noise of it narrow to the fewest parameters (within
    `min_cost_gap`), then higher metric, fewer parameters, name."""
    fastest = min(pool, key=lambda c: _cost_key(c, key))
    near = [c for c in pool if _latency_relation(c, fastest, key) == "equal"]
    known = [_num(c.params_m) for c in near if _num(c.params_m) is not None]
    if known:
        limit = min(known) * (1 + min_cost_gap)
        near = [c for c in near if _num(c.params_m) is not None and _num(c.params_m) <= limit]
    return min(near, key=lambda c: (-_num(c.metric), _inf(_num(c.params_m)), c.name))


def _break_tie(tied: list[Candidate], key: str, min_cost_gap: float) -> Candidate:
    """Among candidates with the same selection score: the fastest, unless others are within its
    latency noise or `min_cost_gap` of it — then the fewest parameters, then the name (a choice
    that repeated timings cannot flip)."""
    fastest = min(tied, key=lambda c: _cost_key(c, key))
    lf = _lat(fastest, key)

    def close(c: Candidate) -> bool:
        lc = _lat(c, key)
        return (_latency_relation(c, fastest, key) == "equal"
                or (lc is not None and lf is not None and lc - lf <= min_cost_gap * lf))

    return min([c for c in tied if close(c)], key=lambda c: (_inf(_num(c.params_m)), c.name))


def _selection_sets(ranked: Sequence[Candidate], y_true: Mapping[str, str] | None,
                    predictions: Mapping[str, Mapping[str, str]] | None) -> dict[str, frozenset]:
    """Candidate -> the labelled images it was scored on, for those with predictions."""
    if not y_true or not predictions:
        return {}
    out = {}
    for c in ranked:
        ids = frozenset(predictions.get(c.name) or ()).intersection(y_true)
        if ids:
            out[c.name] = ids
    return out


def _comparable_best_first(ranked: list[Candidate], scored_on: Mapping[str, frozenset],
                           y_true: Mapping[str, str], predictions: Mapping[str, Mapping[str, str]],
                           metric_name: str) -> tuple[list[Candidate], list[str]]:
    """`ranked` with the best by comparable scores first, and what each cross-set comparison
    found. The top of the widest image set (a cross-validation over train+val) starts as best; a
    candidate scored on other images (a fine-tune on the validation split) replaces it only with
    a higher metric on the images both were scored on."""
    widest = max(scored_on.values(), key=len)
    best = next(c for c in ranked if scored_on.get(c.name, widest) == widest)
    notes = []
    for c in ranked:
        if scored_on.get(c.name, widest) == widest:
            continue
        shared = sorted(scored_on[c.name] & scored_on.get(best.name, frozenset()))
        if not shared:
            notes.append(f"{c.name} shares no selection image with {best.name}, so it cannot be ranked "
                         "above it")
            continue
        y = [y_true[i] for i in shared]
        mc = metric_from_labels(metric_name, y, [predictions[c.name][i] for i in shared])
        mb = metric_from_labels(metric_name, y, [predictions[best.name][i] for i in shared])
        verdict = "ranks above" if mc > mb and not _same_score(mc, mb) else "does not rank above"
        notes.append(f"{c.name} ({_fmt(_num(c.metric), '.4f')} on its {len(scored_on[c.name])} images) {verdict} "
                     f"{best.name}: {mc:.4f} vs {mb:.4f} on the {len(shared)} images both were scored on")
        if verdict == "ranks above":
            best = c
    return [best] + [c for c in ranked if c is not best], notes


# ----------------------------------------------------------------------------- paired tests

def _paired_vs_best(best: Candidate, others: Sequence[Candidate],
                    y_true: Mapping[str, str] | None,
                    predictions: Mapping[str, Mapping[str, str]] | None, metric_name: str,
                    n_bootstrap: int, confidence: float,
                    seed: int) -> dict[str, PairedDifference | None]:
    """best - c for every c with predictions on images shared with best (None otherwise).

    Candidates sharing the same image set are scored on one set of resamples; the resamples
    depend only on (seed, images), so this equals calling paired_bootstrap pair by pair.
    """
    out: dict[str, PairedDifference | None] = {c.name: None for c in others}
    if not y_true or not predictions or not predictions.get(best.name):
        return out
    pb = predictions[best.name]
    base = set(pb).intersection(y_true)
    groups: dict[tuple[str, ...], list[Candidate]] = {}
    for c in others:
        pc = predictions.get(c.name)
        if not pc:
            continue
        ids = tuple(sorted(base.intersection(pc)))
        if ids:
            groups.setdefault(ids, []).append(c)
    for ids, group in groups.items():
        y, preds, k = encode([y_true[i] for i in ids],
                             [[pb[i] for i in ids]] + [[predictions[c.name][i] for i in ids]
                                                       for c in group])
        point, boot = bootstrap_scores(metric_name, y, preds, k, n_bootstrap=n_bootstrap,
                                       seed=seed)
        for j, c in enumerate(group, start=1):
            out[c.name] = summarise(metric_name, point[0] - point[j], boot[:, 0] - boot[:, j],
                                    len(ids), confidence, discordant=discordant_counts(y, preds[0], preds[j]))
    return out


def _paired_multilabel_vs_best(best: Candidate, others: Sequence[Candidate],
                               y_true: Mapping[str, Any] | None,
                               scores: Mapping[str, LabelScores] | None, metric_name: str,
                               n_bootstrap: int, confidence: float,
                               seed: int) -> dict[str, PairedDifference | None]:
    """`_paired_vs_best` for multi-label candidates: best - c on the images both were scored on,
    each image's label-indicator row from ``y_true``, the same resamples for every c of a group."""
    out: dict[str, PairedDifference | None] = {c.name: None for c in others}
    if not y_true or not scores or best.name not in scores:
        return out

    def rows(name: str) -> dict[str, int]:
        return {str(i): j for j, i in enumerate(scores[name].ids)}

    rb = rows(best.name)
    base = set(rb).intersection(y_true)
    groups: dict[tuple[str, ...], list[tuple[Candidate, dict[str, int]]]] = {}
    for c in others:
        if c.name not in scores:
            continue
        rc = rows(c.name)
        ids = tuple(sorted(base.intersection(rc)))
        if ids:
            groups.setdefault(ids, []).append((c, rc))
    for ids, group in groups.items():
        Y = np.stack([np.asarray(y_true[i]) for i in ids])
        mats = [np.asarray(scores[best.name].proba)[[rb[i] for i in ids]]]
        mats += [np.asarray(scores[c.name].proba)[[rc[i] for i in ids]] for c, rc in group]
        th = None
        if metric_name != "map":
            th = [scores[best.name].thresholds] + [scores[c.name].thresholds for c, _ in group]
        point, boot = bootstrap_multilabel_scores(metric_name, Y, mats, thresholds=th,
                                                  n_bootstrap=n_bootstrap, seed=seed)
        for j, (c, _) in enumerate(group, start=1):
            diff = boot[:, 0] - boot[:, j]
            out[c.name] = summarise(metric_name, float(point[0] - point[j]),
                                    diff[np.isfinite(diff)], len(ids), confidence)
    return out


def _equivalence_text(c: Candidate, best: Candidate, pd: PairedDifference | None,
                      tolerance: float, confidence: float) -> str:
    if pd is None:
        return (f"no paired predictions of {c.name} and {best.name} on shared images, so "
                "equivalence cannot be shown")
    d = pd.diff
    return (f"paired difference d = {_pts(d)} point ({100 * confidence:g} % upper bound"
            f" {_pts(pd.upper_one_sided)} {'≤' if pd.upper_one_sided <= tolerance else '>'} "
            f"{_pts(tolerance)}) on {pd.n} images")


# ----------------------------------------------------------------------------- selection

def select_winner(candidates: Iterable[Candidate], *,
                  y_true: Mapping[str, str] | None = None,
                  predictions: Mapping[str, Mapping[str, str]] | None = None,
                  metric_name: str = "balanced_accuracy", tolerance: float = 0.005,
                  max_latency_ms: float | None = None, max_params_m: float | None = None,
                  latency_key: str = "latency_ms_b1", n_bootstrap: int = 2000,
                  confidence: float = 0.95, seed: int = 0,
                  min_cost_gap: float = 0.05,
                  label_scores: Mapping[str, LabelScores] | None = None) -> Selection:
    """The best candidate within the budgets, or a cheaper one proven equivalent to it.

    ``y_true``: image id -> true label of every selection image; ``predictions[name]``: image
    id -> that candidate's predicted label. Each comparison uses the images shared by the two
    candidates (and labelled in ``y_true``). See the module docstring for the rule.

    Multi-label candidates: ``metric_name`` one of ``MULTILABEL_METRICS`` (mAP, micro/macro F1,
    subset accuracy), ``y_true`` image id -> that image's (L,) 0/1 label row, and
    ``label_scores[name]`` the candidate's held-out scores (``LabelScores``) instead of
    ``predictions``; the paired test is the multi-label bootstrap on the shared images.
    """
    _check_latency_key(latency_key)
    # "macro_f1" names a metric of both kinds: label_scores (or a multi-label-only name) decides
    multilabel = label_scores is not None or (metric_name in MULTILABEL_METRICS
                                              and metric_name not in METRICS)
    check_multilabel_metric(metric_name) if multilabel else check_metric(metric_name)
    check_bootstrap(n_bootstrap, confidence)
    if tolerance < 0 or min_cost_gap < 0:
        raise ValueError("tolerance and min_cost_gap must be >= 0")
    cands = list(candidates)
    if not cands:
        raise NoEligibleCandidateError("no candidates to select from: train at least one head "
                                       "(`tlpipe run`) before selecting")
    names = [c.name for c in cands]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"candidate names must be unique; duplicated: {dup}")

    eligible: list[Candidate] = []
    excluded: list[Exclusion] = []
    for c in cands:
        reasons = []
        if _num(c.metric) is None:
            reasons.append("no selection metric (evaluation missing or failed)")
        lat = _lat(c, latency_key)
        if max_latency_ms is not None:
            if lat is None:
                reasons.append(f"latency not measured ({latency_key}) but a latency budget of "
                               f"{max_latency_ms:g} ms is set")
            elif lat > max_latency_ms:
                reasons.append(f"latency {lat:.3g} ms > budget {max_latency_ms:g} ms")
        params = _num(c.params_m)
        if max_params_m is not None:
            if params is None:
                reasons.append(f"parameter count unknown but a budget of {max_params_m:g} M "
                               "params is set")
            elif params > max_params_m:
                reasons.append(f"params {params:.3g} M > budget {max_params_m:g} M")
        if reasons:
            excluded.append(Exclusion(c, "; ".join(reasons)))
        else:
            eligible.append(c)

    if not eligible:
        raise NoEligibleCandidateError(_no_eligible_message(cands, max_latency_ms, max_params_m,
                                                            latency_key))

    ranked = sorted(eligible, key=lambda c: (-_num(c.metric),) + _cost_key(c, latency_key))
    tied = [c for c in ranked if _same_score(c.metric, ranked[0].metric)]
    if len(tied) > 1:  # equal scores: a latency gap inside noise or the minimum gap decides nothing
        first = _break_tie(tied, latency_key, min_cost_gap)
        ranked = [first] + [c for c in ranked if c is not first]
    scored_on = {} if multilabel else _selection_sets(ranked, y_true, predictions)
    across: list[str] = []
    if len(set(scored_on.values())) > 1:
        ranked, across = _comparable_best_first(ranked, scored_on, y_true, predictions, metric_name)
    best = ranked[0]
    others = ranked[1:]

    def same_images(a: Candidate, b: Candidate) -> bool:  # unknown image sets: no evidence either way
        sa, sb = scored_on.get(a.name), scored_on.get(b.name)
        return sa is None or sb is None or sa == sb

    # `ranked` is best metric first, so this names the strongest dominating candidate; scores on
    # different images do not dominate each other
    dominated_by = {c.name: next((d.name for d in ranked if d is not c and same_images(d, c)
                                  and _dominates(d, c, latency_key)), None)
                    for c in ranked}
    gaps = {c.name: _cost_gap(c, best, latency_key, min_cost_gap) for c in others}
    if multilabel:
        paired = _paired_multilabel_vs_best(best, others, y_true, label_scores, metric_name,
                                            n_bootstrap, confidence, seed)
    else:
        paired = _paired_vs_best(best, others, y_true, predictions, metric_name, n_bootstrap,
                                 confidence, seed)

    comparisons: list[dict[str, Any]] = []
    qualified: list[Candidate] = []
    for c in ranked:
        if c is best:
            if multilabel:
                shown = label_scores.get(best.name) if label_scores else None
                n_best = len({str(i) for i in shown.ids}.intersection(y_true or {})) if shown else 0
            else:
                n_best = len(set(predictions.get(best.name) or {}).intersection(y_true or {})) \
                    if predictions else 0
            comparisons.append({"name": c.name, "diff": 0.0, "upper": 0.0, "n_images": n_best,
                                "cheaper_beyond_noise": False, "equivalent": True,
                                "dominated_by": None})
            continue
        pd = paired[c.name]
        equivalent = pd is not None and pd.upper_one_sided <= tolerance
        cheaper = gaps[c.name].cheaper
        comparisons.append({"name": c.name, "diff": None if pd is None else pd.diff,
                            "upper": None if pd is None else pd.upper_one_sided,
                            "n_images": 0 if pd is None else pd.n,
                            "cheaper_beyond_noise": cheaper, "equivalent": equivalent,
                            "dominated_by": dominated_by[c.name]})
        if cheaper and equivalent and dominated_by[c.name] is None:
            qualified.append(c)

    winner = _pick_cheapest(qualified, latency_key, min_cost_gap) if qualified else best
    why = [f"Winner: {_describe(winner, latency_key)}."]
    if across:
        why.append("Scores on different images: " + "; ".join(across) + ".")
    if winner is best:
        why.append(f"It has the best selection {metric_name}.")
        why.append(_why_not_cheaper(best, others, gaps, paired, dominated_by, latency_key,
                                    tolerance, confidence))
    else:
        why.append(f"Best selection {metric_name}: {_describe(best, latency_key)}.")
        why.append(f"{winner.name} is within the tolerance of {best.name}: "
                   f"{_equivalence_text(winner, best, paired[winner.name], tolerance, confidence)}"
                   f", and {gaps[winner.name].text}.")
        if len(qualified) > 1:
            why.append(f"{len(qualified)} cheaper candidates qualified; the cheapest wins "
                       "(ties within latency noise: fewer parameters, then higher metric).")
    budgets = _budget_text(max_latency_ms, max_params_m, latency_key)
    if excluded:
        why.append(f"{len(excluded)} of {len(cands)} candidates excluded ({budgets}).")
    else:
        why.append(f"All {len(cands)} candidates eligible ({budgets}).")
    return Selection(winner=winner, ranked=ranked, excluded=excluded, why=" ".join(why),
                     latency_key=latency_key, max_latency_ms=max_latency_ms,
                     max_params_m=max_params_m, tolerance=tolerance, metric_name=metric_name,
                     comparisons=comparisons, confidence=confidence, min_cost_gap=min_cost_gap)


def _why_not_cheaper(best: Candidate, others: Sequence[Candidate], gaps: dict[str, _CostGap],
                     paired: dict[str, PairedDifference | None],
                     dominated_by: dict[str, str | None], key: str, tolerance: float,
                     confidence: float) -> str:
    """Why the nearest cheaper alternative (highest metric among the cheaper) was not taken."""
    def cheaper_at_all(c: Candidate) -> bool:
        rel = _latency_relation(c, best, key)
        lc, lb = _lat(c, key), _lat(best, key)
        if lc is not None and lb is not None and lc < lb:
            return True
        pc, pb = _num(c.params_m), _num(best.params_m)
        return rel == "equal" and pc is not None and pb is not None and pc < pb

    alts = [c for c in others if cheaper_at_all(c)]
    if not alts:
        return "No eligible candidate is cheaper."
    alt = alts[0]   # `others` is in ranked order: the highest metric among the cheaper ones
    gap, pd = gaps[alt.name], paired[alt.name]
    head = f"Nearest cheaper alternative: {_describe(alt, key)}, not taken: "
    if dominated_by[alt.name] is not None:
        return head + (f"dominated by {dominated_by[alt.name]} (a higher metric at no higher "
                       f"cost; {gap.text}).")
    if not gap.cheaper:
        return head + f"{gap.text}."
    if pd is None:
        return head + _equivalence_text(alt, best, pd, tolerance, confidence) + "."
    return head + (f"not equivalent: {_equivalence_text(alt, best, pd, tolerance, confidence)}"
                   f", although {gap.text}.")


def _budget_text(max_latency_ms: float | None, max_params_m: float | None,
                 latency_key: str) -> str:
    parts = []
    if max_latency_ms is not None:
        parts.append(f"{latency_key} <= {max_latency_ms:g} ms")
    if max_params_m is not None:
        parts.append(f"params <= {max_params_m:g} M")
    return "budgets: " + (", ".join(parts) if parts else "none")


def _no_eligible_message(cands: Sequence[Candidate], max_latency_ms: float | None,
                         max_params_m: float | None, latency_key: str) -> str:
    msg = [f"no candidate meets the constraints ({_budget_text(max_latency_ms, max_params_m, latency_key)})."]
    with_metric = [c for c in cands if _num(c.metric) is not None]
    if not with_metric:
        msg.append(f"None of the {len(cands)} candidates has a selection metric: run evaluation "
                   "first.")
        return " ".join(msg)
    timed = [c for c in with_metric if _lat(c, latency_key) is not None]
    sized = [c for c in with_metric if _num(c.params_m) is not None]
    if timed:
        f = min(timed, key=lambda c: _cost_key(c, latency_key))
        msg.append(f"Fastest candidate: {f.name} at {_lat(f, latency_key):.3g} ms/img "
                   f"({_fmt(_num(f.params_m))} M params).")
    elif max_latency_ms is not None:
        msg.append("No candidate has a measured latency: run latency measurement first.")
    if sized:
        s = min(sized, key=lambda c: (_num(c.params_m), _inf(_lat(c, latency_key))))
        msg.append(f"Smallest candidate: {s.name} with {_num(s.params_m):.3g} M params "
                   f"({_fmt(_lat(s, latency_key))} ms/img).")
    elif max_params_m is not None:
        msg.append("No candidate has a known parameter count.")
    msg.append("Relax --max-latency-ms / --max-params-m or add cheaper backbones.")
    return " ".join(msg)


def pareto_front(candidates: Iterable[Candidate], *,
                 latency_key: str = "latency_ms_b1") -> list[Candidate]:
    """Candidates not dominated in (lower latency, higher metric), fastest first.

    A candidate is dominated when another is at least as fast and at least as good and strictly
    better in one of the two. Candidates missing metric or latency are ignored.
    """
    _check_latency_key(latency_key)
    pts = [c for c in candidates
           if _num(c.metric) is not None and _num(getattr(c, latency_key)) is not None]
    pts.sort(key=lambda c: (_num(getattr(c, latency_key)), -_num(c.metric), c.name))
    front: list[Candidate] = []
    best = -math.inf
    for c in pts:
        m = _num(c.metric)
        if m > best:
            front.append(c)
            best = m
    return front


# ----------------------------------------------------------------------------- promotion

@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of the promotion gate; diff/low/high/n are challenger - champion (metric units)
    on the shared test images, None when not computed."""

    promote: bool
    reason: str
    diff: float | None = None
    low: float | None = None             # two-sided interval at `confidence`
    high: float | None = None
    n: int | None = None
    lower_one_sided: float | None = None
    margin: float = 0.005
    metric_name: str = "balanced_accuracy"
    confidence: float = 0.95

    def to_tags(self) -> dict[str, str]:
        """MLflow model-version tags (strings). The reason is left to the caller's own tag."""
        tags = {"promotion_decision": "promote" if self.promote else "refuse",
                "promotion_metric": self.metric_name,
                "promotion_margin": f"{self.margin:.6g}",
                "promotion_confidence": f"{self.confidence:.6g}"}
        for key, value in (("promotion_diff", self.diff), ("promotion_diff_low", self.low),
                           ("promotion_diff_high", self.high),
                           ("promotion_diff_lower_bound", self.lower_one_sided)):
            if value is not None:
                tags[key] = repr(float(value))
        if self.n is not None:
            tags["promotion_n_images"] = str(self.n)
        return tags


def _signed_pts(x: float) -> str:
    s = f"{100 * x:.1f}"
    if s.lstrip("-") == "0.0":
        s = "0.0"
    return s.replace("-", "−") if s.startswith("-") else "+" + s


def promotion_decision(challenger: Mapping[str, str] | None,
                       champion: Mapping[str, str] | None,
                       y_true: Mapping[str, str] | None, *, force: bool = False,
                       metric_name: str = "balanced_accuracy",
                       champion_metric_name: str | None = None, margin: float = 0.005,
                       challenger_split: str | None = None, champion_split: str | None = None,
                       n_bootstrap: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> PromotionDecision:
    """Gate for `tlpipe promote`: move @champion only if the challenger is not worse.

    ``challenger`` / ``champion``: test image id -> predicted label of each model. ``champion``
    None means there is no champion — unless ``champion_metric_name`` or ``champion_split`` is
    given, which only a champion has; a champion without recorded predictions is ``{}`` (or None
    with one of those two set) and is never replaced without ``force``.
    ``y_true``: test image id -> true label. Promote when forced, when there is no champion, or
    when, on the shared test images, challenger - champion >= 0 (point) and its one-sided lower
    bound at ``confidence`` is above -``margin``.
    """
    check_metric(metric_name)
    check_bootstrap(n_bootstrap, confidence)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    common = dict(margin=float(margin), metric_name=metric_name, confidence=float(confidence))
    has_champion = (champion is not None or champion_metric_name is not None
                    or champion_split is not None)

    def compare() -> tuple[PairedDifference | None, str | None]:
        if not challenger or not champion or not y_true:
            return None, None
        ids = sorted(set(challenger).intersection(champion).intersection(y_true))
        if not ids:
            return None, ("the challenger's and the champion's predictions share no labelled "
                          "test image")
        # The percentile bootstrap alone, unlike selection's cost trades: a challenger that is
        # never behind on the point estimate and agrees with the champion (a re-run of the same
        # data) must stay promotable; the exact floor would refuse it on any test split under
        # ~600 images, leaving the champion that is no better.
        pd = paired_bootstrap(metric_name, [y_true[i] for i in ids],
                              [challenger[i] for i in ids], [champion[i] for i in ids],
                              n_bootstrap=n_bootstrap, confidence=confidence, seed=seed,
                              exact_floor=False)
        return pd, None

    def decision(promote: bool, reason: str, pd: PairedDifference | None = None):
        if pd is None:
            return PromotionDecision(promote, reason, **common)
        return PromotionDecision(promote, reason, diff=pd.diff, low=pd.low, high=pd.high,
                                 n=pd.n, lower_one_sided=pd.lower_one_sided, **common)

    def summary(pd: PairedDifference) -> str:
        return (f"challenger − champion = {_signed_pts(pd.diff)} point "
                f"[{_signed_pts(pd.low)}, {_signed_pts(pd.high)}] ({metric_name}, "
                f"{100 * confidence:g} % interval) on {pd.n} test images, "
                f"margin {100 * margin:.1f}")

    if force:
        pd = None
        if champion_metric_name in (None, metric_name) and (
                challenger_split is None or champion_split is None
                or challenger_split == champion_split):
            pd, _ = compare()
        if not has_champion:
            return decision(True, "forced promotion (no current champion)")
        return decision(True, "forced promotion" + (f": {summary(pd)}" if pd else ""), pd)
    if not has_champion:
        return decision(True, "no current champion; promoting the challenger")
    if not challenger:
        return decision(False, "the challenger has no recorded test predictions: evaluate it on "
                               "the test split before promoting (or use --force)")
    if not champion:
        return decision(False, "the current champion has no recorded test predictions (it was "
                               "registered by an older version), so the two cannot be compared "
                               "on the same images; promote with --force")
    if champion_metric_name is not None and champion_metric_name != metric_name:
        return decision(False, f"metrics differ: {metric_name} vs {champion_metric_name}; "
                               "promote with --force")
    if challenger_split is not None and champion_split is not None \
            and challenger_split != champion_split:
        return decision(False, f"the champion was evaluated on a different test split "
                               f"({champion_split}) than the challenger ({challenger_split}); "
                               "re-evaluate on the same split or promote with --force")
    if not y_true:
        return decision(False, "no test labels to compare the predictions with; promote with "
                               "--force")
    pd, problem = compare()
    if pd is None:
        return decision(False, f"{problem}; promote with --force")
    lower = (f"one-sided {100 * confidence:g} % lower bound "
             f"{_signed_pts(pd.lower_one_sided)}")
    if pd.diff < 0:
        return decision(False, f"{summary(pd)}: the challenger is worse on the point estimate; "
                               "keeping the champion (use --force to override)", pd)
    if pd.lower_one_sided <= -margin:
        return decision(False, f"{summary(pd)}: {lower} ≤ −{100 * margin:.1f}, so the "
                               "challenger may be worse by more than the margin; keeping the "
                               "champion (use --force to override)", pd)
    return decision(True, f"{summary(pd)}: not worse on the point estimate and {lower} > "
                          f"−{100 * margin:.1f}", pd)
