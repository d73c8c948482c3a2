"""Candidates that combine backbones.

(a) Concatenation: one feature matrix made of several backbones' embeddings side by side, on the
    images every one of them embedded (`concat_data`); any head is then trained on it as usual.
(b) Ensemble selection (Caruana et al. 2004, as AutoGluon does): a greedy, with-replacement
    weighted average of candidates' out-of-fold probabilities (`ensemble_selection`). The weights
    are chosen on out-of-fold predictions, so scoring the ensemble on those same predictions would
    flatter it; `cross_validated_ensemble` chooses the weights without each fold and predicts that
    fold with them — the ensemble's out-of-fold score is as honest as its members'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from pipeline.sweep.cv import joined_preparation, label_codes, metric_from_codes, metric_from_proba

if TYPE_CHECKING:
    from pipeline.sweep.outcome import Outcome
    from pipeline.sweep.plan import FeatureSetRef

#: greedy rounds of ensemble selection (with replacement: weights are counts / rounds)
ROUNDS = 25
#: how many of the best candidates enter ensemble selection
POOL_SIZE = 6


#: weight decays tried on a concatenation: this many values, spanning this many decades either side
#: of what cross-validation chose for the single backbones (half-decade steps, GridSearchCV's usual
#: spacing); each value costs a share of every fold's solve on a vector several backbones wide
CONCAT_GRID_SIZE = 3
CONCAT_GRID_DECADES = 0.5


def concat_head_config(hc: Any, done: Sequence["Outcome"]) -> Any:
    """The linear probe's config for the concatenation. Unless the user fixed its weight decays,
    they are searched around the values cross-validation chose for each backbone alone (in the
    same C units): a wider feature vector moves the optimum little, and the full default grid on
    a vector several backbones wide costs several times a single probe's search."""
    from dataclasses import replace as dc_replace

    if hc.params.get("weight_decays") is not None:
        return hc
    chosen = [d.result["selection"]["chosen"].get("weight_decay_cv") for d in done
              if d.ok and d.kind == "probe" and d.head == "LinearProbe"]
    chosen = [float(c) for c in chosen if c]
    if not chosen:
        return hc
    centre = float(np.median(np.log10(chosen)))
    grid = np.logspace(centre - CONCAT_GRID_DECADES, centre + CONCAT_GRID_DECADES, CONCAT_GRID_SIZE)
    return dc_replace(hc, params={**dict(hc.params), "weight_decays": [float(v) for v in grid]})


def concat_data(parts: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """Feature sets (see `pipeline.sweep.candidate`) of one or more backbones → one whose X holds
    their embeddings side by side on the images all of them have; plus each part's column slice.
    When every part carries its linear probe's ``preparation`` and all have the same train+val
    rows in the same order, the result carries their `joined_preparation`."""
    if not parts:
        raise ValueError("a concatenation needs at least one feature set")
    out: dict[str, Any] = {}
    for split, (xk, yk, ik) in {"trval": ("X", "y", "ids"),
                                "test": ("X_test", "y_test", "ids_test")}.items():
        common = set(map(str, parts[0][ik]))
        for p in parts[1:]:
            common &= set(map(str, p[ik]))
        order = [str(i) for i in parts[0][ik] if str(i) in common]
        blocks = []
        for p in parts:
            pos = {str(i): j for j, i in enumerate(p[ik])}
            blocks.append(np.asarray(p[xk])[[pos[i] for i in order]])
        first = {str(i): j for j, i in enumerate(parts[0][ik])}
        rows = [first[i] for i in order]
        out[xk] = np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32)
        out[yk] = np.asarray(parts[0][yk])[rows]
        out[ik] = order
        if split == "trval":
            out["folds"] = np.asarray(parts[0]["folds"])[:, rows]
    same_rows = all([str(i) for i in p["ids"]] == out["ids"] for p in parts)
    if same_rows and all(p.get("preparation") is not None for p in parts):
        out["preparation"] = joined_preparation([p["preparation"] for p in parts])
    slices, start = [], 0
    for p in parts:
        d = int(np.asarray(p["X"]).shape[1])
        slices.append((start, start + d))
        start += d
    return out, slices


@dataclass(frozen=True)
class EnsembleResult:
    names: list[str]          # members with a non-zero weight
    weights: list[float]      # summing to 1, same order
    proba: np.ndarray         # (N, C) cross-validated out-of-fold probabilities
    score: float              # selection metric of `proba`
    fold_scores: list[float]

    @property
    def std(self) -> float | None:
        return float(np.std(self.fold_scores, ddof=1)) if len(self.fold_scores) > 1 else None


def ensemble_selection(probas: Mapping[str, np.ndarray], y: np.ndarray, classes: Sequence[str], *,
                       metric: str, rounds: int = ROUNDS) -> dict[str, float]:
    """Greedy forward selection with replacement; ties go to the earlier name in `probas`
    (callers pass the best candidate first). Returns {name: weight}, weights summing to 1."""
    names = list(probas)
    if not names:
        raise ValueError("ensemble selection needs at least one candidate")
    counts = dict.fromkeys(names, 0)
    total = np.zeros_like(np.asarray(probas[names[0]], dtype=np.float64))
    yi = label_codes(y, classes)
    for _ in range(rounds):
        best, best_score = None, -np.inf
        for n in names:  # the metrics read ranks only: the sum ranks as the mean does
            s = metric_from_codes(metric, yi, total + probas[n])
            if s > best_score + 1e-12:
                best, best_score = n, s
        counts[best] += 1
        total += probas[best]
    return {n: c / rounds for n, c in counts.items() if c}


def cross_validated_ensemble(probas: Mapping[str, np.ndarray], y: np.ndarray, folds: np.ndarray,
                             classes: Sequence[str], *, metric: str, rounds: int = ROUNDS
                             ) -> EnsembleResult:
    """Weights for deployment from all out-of-fold rows; the ensemble's own out-of-fold
    probabilities from weights chosen without each fold. `folds` (N,): each row's held-out fold."""
    y = np.asarray(y, dtype=str)
    folds = np.asarray(folds)
    C = len(classes)
    oof = np.zeros((len(y), C), dtype=np.float64)
    fold_scores = []
    for f in sorted(np.unique(folds)):
        inner, outer = folds != f, folds == f
        if inner.sum() == 0:  # one fold only (validation split): nothing to hold out from
            inner = outer
        w = ensemble_selection({n: p[inner] for n, p in probas.items()}, y[inner], classes,
                               metric=metric, rounds=rounds)
        oof[outer] = sum(wt * probas[n][outer] for n, wt in w.items())
        fold_scores.append(metric_from_proba(metric, y[outer], oof[outer], classes))
    weights = ensemble_selection(probas, y, classes, metric=metric, rounds=rounds)
    names = list(weights)
    return EnsembleResult(names=names, weights=[weights[n] for n in names],
                          proba=oof.astype(np.float32),
                          score=metric_from_proba(metric, y, oof, classes), fold_scores=fold_scores)


def common_rows(selections: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Ids that every candidate's selection result covers, in the first candidate's order."""
    names = list(selections)
    common = set(selections[names[0]]["ids"])
    for n in names[1:]:
        common &= set(selections[n]["ids"])
    return [i for i in selections[names[0]]["ids"] if i in common]


def restrict(selection: Mapping[str, Any], ids: Sequence[str]) -> np.ndarray:
    """A candidate's out-of-fold probabilities on `ids`, in that order."""
    pos = {i: j for j, i in enumerate(selection["ids"])}
    return np.asarray(selection["proba"])[[pos[i] for i in ids]]


def ensemble_candidate(done: Sequence[Outcome], order: Sequence[FeatureSetRef], head_dirs, read,
                        lat_by_backbone, classes, folds, *, metric, n_bootstrap, seed, hardest_k,
                        latency_repeats) -> Outcome | str:
    """Caruana ensemble selection over the best frozen-backbone candidates, as one candidate
    (or the reason there is none)."""
    from pipeline.heads import Ensemble, load_head
    from pipeline.sweep.candidate import evaluate_head
    from pipeline.sweep.outcome import Outcome, combined_latency, subset_info
    from pipeline.sweep.plan import short_backbones

    pool = sorted((d for d in done if d.ok and d.kind == "probe" and d.name in head_dirs),
                  key=lambda d: -d.result["selection"]["score"])[:POOL_SIZE]
    if len(pool) < 2:
        return "fewer than two finished candidates to ensemble"
    sels = {d.name: d.result["selection"] for d in pool}
    ids = common_rows(sels)
    ys = dict(zip(sels[pool[0].name]["ids"], sels[pool[0].name]["y"]))
    y = np.asarray([ys[i] for i in ids], dtype=str)
    fold = np.asarray([int(folds[i][0]) if folds is not None else 0 for i in ids])
    er = cross_validated_ensemble({n: restrict(s, ids) for n, s in sels.items()}, y, fold,
                                      classes, metric=metric)
    if len(er.names) < 2:
        return f"ensemble selection kept a single member ({er.names[0]})"
    members = [next(d for d in pool if d.name == n) for n in er.names]
    refs = [r for r in order if any(m.refs[0].backbone == r.backbone for m in members)]
    data, slices = concat_data([read(r) for r in refs])
    by_backbone = {r.backbone: sl for r, sl in zip(refs, slices)}
    head = Ensemble.from_fitted([load_head(head_dirs[m.name]) for m in members],
                                [by_backbone[m.refs[0].backbone] for m in members], er.weights)
    result = evaluate_head(head, data, classes,
                           fit_seconds=sum(m.result["fit_seconds"] for m in members),
                           selection_metric=metric, n_bootstrap=n_bootstrap, seed=seed,
                           hardest_k=hardest_k, latency_repeats=latency_repeats)
    result["selection"] = {"ids": ids, "y": y.tolist(), "proba": er.proba, "score": er.score,
                           "std": er.std, "fold_scores": er.fold_scores,
                           "chosen": {"members": er.names, "weights": er.weights}}
    result["fitted"] = {**result["fitted"], "members": ", ".join(
        f"{n} x{w:.2f}" for n, w in zip(er.names, er.weights))}
    name = "ensemble(" + ", ".join(short_backbones(er.names)) + ")"
    info = subset_info(members[0].info, data["ids_test"], len(data["ids"]))
    return Outcome(name, refs, "Ensemble", "ensemble", {"members": er.names, "weights": er.weights},
                "ensemble", info, combined_latency([lat_by_backbone[r.backbone] for r in refs]),
                result)
