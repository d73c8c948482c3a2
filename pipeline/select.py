"""Winner selection across (backbone, head) candidates, Pareto front and the promotion gate.

Rule (`select_winner`):
1. Drop candidates that break a budget (latency, parameter count) or lack a metric, each with a
   reason.
2. The best eligible candidate has the highest selection metric.
3. Every eligible candidate whose confidence interval overlaps the best one's is statistically
   tied with it; among the tied, the cheapest wins: lowest latency, then fewest parameters, then
   the best metric (then name, for determinism). Costs within `cost_tolerance` (10 %) of the
   cheapest count as equal — a head 0.01 M parameters smaller is not "cheaper" than a better one
   on the same backbone. A candidate without a CI is treated as the point interval
   [metric, metric].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Sequence

LATENCY_KEYS = ("latency_ms_b1", "latency_ms_b32")


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
    metric: float | None            # selection metric on the test split
    ci_low: float | None = None
    ci_high: float | None = None
    latency_ms_b1: float | None = None    # median ms per image at batch size 1
    latency_ms_b32: float | None = None   # median ms per image at batch size 32
    params_m: float | None = None         # millions of parameters (backbone + head)
    extra: dict[str, Any] = field(default_factory=dict)

    def interval(self) -> tuple[float, float]:
        m = _num(self.metric)
        lo, hi = _num(self.ci_low), _num(self.ci_high)
        return (m if lo is None else lo, m if hi is None else hi)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        known = {f.name for f in fields(cls)}
        for key in ("name", "backbone", "head", "family", "metric"):
            if key not in d:
                raise ValueError(f"Candidate.from_dict: missing key {key!r} in {sorted(d)}")
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Exclusion:
    candidate: Candidate
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate.to_dict(), "reason": self.reason}


@dataclass(frozen=True)
class Selection:
    winner: Candidate
    ranked: list[Candidate]          # eligible, best metric first (cheaper first on equal metric)
    tied: list[Candidate]            # eligible whose CI overlaps the best one's, cheapest first
    excluded: list[Exclusion]
    why: str
    latency_key: str = "latency_ms_b1"
    max_latency_ms: float | None = None
    max_params_m: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner.to_dict(),
                "ranked": [c.to_dict() for c in self.ranked],
                "tied": [c.to_dict() for c in self.tied],
                "excluded": [e.to_dict() for e in self.excluded],
                "why": self.why, "latency_key": self.latency_key,
                "max_latency_ms": self.max_latency_ms, "max_params_m": self.max_params_m}


class NoEligibleCandidateError(ValueError):
    """No candidate meets the budgets (or none has a metric)."""


def _inf(x: float | None) -> float:
    return math.inf if x is None else x


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def _cost_key(c: Candidate, latency_key: str) -> tuple:
    return (_inf(_num(getattr(c, latency_key))), _inf(_num(c.params_m)),
            -_num(c.metric), c.name)


def _cheapest(tied: list[Candidate], latency_key: str, tol: float) -> Candidate:
    """Lowest latency, then fewest params — each up to a relative tolerance — then best metric."""
    pool = tied
    for cost in (lambda c: _num(getattr(c, latency_key)), lambda c: _num(c.params_m)):
        known = [cost(c) for c in pool if cost(c) is not None]
        if known:
            limit = min(known) * (1 + tol)
            pool = [c for c in pool if cost(c) is not None and cost(c) <= limit]
    return min(pool, key=lambda c: (-_num(c.metric),) + _cost_key(c, latency_key))


def _describe(c: Candidate, latency_key: str) -> str:
    lo, hi = c.interval()
    ci = "" if _num(c.ci_low) is None or _num(c.ci_high) is None else f" [{lo:.4f}, {hi:.4f}]"
    return (f"{c.name} (metric {_num(c.metric):.4f}{ci}, "
            f"{_fmt(_num(getattr(c, latency_key)))} ms/img, {_fmt(_num(c.params_m))} M params)")


def _check_latency_key(latency_key: str) -> None:
    if latency_key not in LATENCY_KEYS:
        raise ValueError(f"latency_key must be one of {LATENCY_KEYS}, got {latency_key!r}")


def select_winner(candidates: Iterable[Candidate], *, max_latency_ms: float | None = None,
                  max_params_m: float | None = None,
                  latency_key: str = "latency_ms_b1", cost_tolerance: float = 0.1) -> Selection:
    """Pick the cheapest candidate statistically tied with the best one within the budgets."""
    _check_latency_key(latency_key)
    cands = list(candidates)
    if not cands:
        raise NoEligibleCandidateError("no candidates to select from: train at least one head "
                                       "(tlpipe train) before selecting")
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
        lat = _num(getattr(c, latency_key))
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
    best = ranked[0]
    b_lo, b_hi = best.interval()
    tied = [c for c in ranked if c.interval()[1] >= b_lo and c.interval()[0] <= b_hi]
    tied.sort(key=lambda c: _cost_key(c, latency_key))
    winner = _cheapest(tied, latency_key, cost_tolerance)

    why = [f"Winner: {_describe(winner, latency_key)}."]
    if winner is best:
        if len(tied) > 1:
            why.append(f"It has the best metric and is also the cheapest of the {len(tied)} "
                       "candidates whose confidence intervals overlap.")
        else:
            why.append("It has the best metric and no other candidate's confidence interval "
                       "overlaps its own.")
    else:
        why.append(f"Best metric: {_describe(best, latency_key)}; {len(tied)} candidates have "
                   "confidence intervals overlapping the best one's (statistically tied), and the "
                   "winner is the cheapest of them (lowest latency, then fewest parameters).")
    budgets = _budget_text(max_latency_ms, max_params_m, latency_key)
    if excluded:
        why.append(f"{len(excluded)} of {len(cands)} candidates excluded ({budgets}).")
    else:
        why.append(f"All {len(cands)} candidates eligible ({budgets}).")
    return Selection(winner=winner, ranked=ranked, tied=tied, excluded=excluded,
                     why=" ".join(why), latency_key=latency_key,
                     max_latency_ms=max_latency_ms, max_params_m=max_params_m)


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
    timed = [c for c in with_metric if _num(getattr(c, latency_key)) is not None]
    sized = [c for c in with_metric if _num(c.params_m) is not None]
    if timed:
        f = min(timed, key=lambda c: _cost_key(c, latency_key))
        msg.append(f"Fastest candidate: {f.name} at {_num(getattr(f, latency_key)):.3g} ms/img "
                   f"({_fmt(_num(f.params_m))} M params).")
    elif max_latency_ms is not None:
        msg.append("No candidate has a measured latency: run latency measurement first.")
    if sized:
        s = min(sized, key=lambda c: (_num(c.params_m), _inf(_num(getattr(c, latency_key)))))
        msg.append(f"Smallest candidate: {s.name} with {_num(s.params_m):.3g} M params "
                   f"({_fmt(_num(getattr(s, latency_key)))} ms/img).")
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


def promotion_decision(challenger_metric: float | None, champion_metric: float | None,
                       force: bool = False, *, metric_name: str = "metric",
                       challenger_split: str | None = None,
                       champion_split: str | None = None) -> tuple[bool, str]:
    """Gate for `tlpipe promote`: (promote?, reason to record in tags).

    Promote when there is no champion, when the challenger is strictly better on the same test
    split, or when forced. ``challenger_split`` / ``champion_split`` are optional identifiers of
    the test split (e.g. dataset hash); when both are given and differ the metrics are not
    comparable and promotion needs ``force``.
    """
    ch = _num(challenger_metric)
    cp = _num(champion_metric)
    if force:
        base = f"forced promotion (challenger {metric_name}={_fmt(ch, '.4f')}"
        return True, base + (f", champion {_fmt(cp, '.4f')})" if champion_metric is not None
                             else ", no champion)")
    if ch is None:
        return False, (f"challenger has no {metric_name}: evaluate it on the test split before "
                       "promoting (or use --force)")
    if champion_metric is None:
        return True, f"no current champion; promoting challenger ({metric_name}={ch:.4f})"
    if cp is None:
        return True, (f"current champion has no recorded {metric_name}; promoting challenger "
                      f"({metric_name}={ch:.4f})")
    if challenger_split is not None and champion_split is not None \
            and challenger_split != champion_split:
        return False, (f"champion was evaluated on a different test split ({champion_split}) than "
                       f"the challenger ({challenger_split}); the {metric_name} values are not "
                       "comparable: re-evaluate on the same split or use --force")
    if ch > cp:
        return True, (f"challenger {metric_name} {ch:.4f} > champion {cp:.4f} on the same test "
                      "split")
    return False, (f"challenger {metric_name} {ch:.4f} is not strictly better than champion "
                   f"{cp:.4f}; keeping the champion (use --force to override)")
