"""Ensemble: a weighted average of member heads' probabilities, each member on a feature slice.

    proba(X) = sum_i w_i * member_i.predict_proba(X[:, start_i:stop_i]) / sum_i w_i

with each member's columns placed at its classes' positions in ``classes_`` (the sorted union of
the members' classes; a member contributes 0 to the classes it never saw). This covers both
ensembles across backbones: X is the concatenation of several backbones' embeddings, and

* a head trained on the whole concatenation is one member with slice ``(0, D_total)``;
* a Caruana-style selection of per-backbone candidates is several members, each on its
  backbone's slice, with the selection counts as weights.

``fit(X, y)`` fits a clone of every member (``type(h)(**h.get_params(deep=False))``; members that
are already fitted are refitted too) on its slice. ``Ensemble.from_fitted(heads, slices, weights)``
wraps members fitted elsewhere without refitting them (scoring out-of-fold predictions first, then
refitting the chosen ensemble once with ``fit``).

``decision_function`` returns the log of the averaged probabilities (softmax of it gives
``predict_proba`` back), so an Ensemble can serve wherever logits are expected.

Saved as config.json (slices, weights) + ``member_<i>/`` (each member's own save); members may
be any head type except Ensemble itself (flatten nested ensembles into one list).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.heads.base import Head
from pipeline.heads.errors import HeadInputError, NotFittedError
from pipeline.heads.registry import load_head, register

MEMBER_DIR = "member_{}"
# log(p) floor for classes with zero probability: finite, and far below any real log-probability
_LOG_FLOOR = float(np.log(np.finfo(np.float32).tiny))


def _clone(head: Head) -> Head:
    return type(head)(**head.get_params(deep=False))


def _as_slice(value: Any, i: int) -> tuple[int, int]:
    try:
        start, stop = value
    except (TypeError, ValueError):
        raise HeadInputError(
            f"feature_slices[{i}] = {value!r} is not a (start, stop) pair; give one pair of "
            "column indices per member, e.g. [(0, 1280), (1280, 2560)]"
        ) from None
    ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, stop))
    if not ok or not 0 <= int(start) < int(stop):
        raise HeadInputError(
            f"feature_slices[{i}] = {value!r} is not a valid column range; use integers with "
            "0 <= start < stop (stop exclusive, like X[:, start:stop])"
        )
    return int(start), int(stop)


@register
class Ensemble(Head):
    """Weighted probability average of heads, each over its own columns of X.

    Parameters
    ----------
    heads: member heads (any head type but Ensemble), fitted or not; ``fit`` refits clones.
    feature_slices: one ``(start, stop)`` column range of X per member (stop exclusive).
    weights: one non-negative weight per member (None = equal weights); normalised by their sum.
    """

    _unsaved_params = ("heads",)

    def __init__(self, heads, feature_slices, weights=None):
        self.heads = heads
        self.feature_slices = feature_slices
        self.weights = weights

    # ------------------------------------------------------------------ validation
    def _members(self) -> list[Head]:
        heads = self.heads
        if isinstance(heads, Head) or not isinstance(heads, Sequence) or not len(heads):
            raise ValueError(
                f"heads must be a non-empty list of tlpipe heads, got {type(heads).__name__}"
            )
        for i, h in enumerate(heads):
            if isinstance(h, Ensemble):
                raise ValueError(
                    f"heads[{i}] is an Ensemble; ensembles do not nest: flatten it into this "
                    "ensemble's heads, feature_slices and weights"
                )
            if not isinstance(h, Head):
                raise ValueError(f"heads[{i}] must be a tlpipe Head, got {type(h).__name__}")
        return list(heads)

    def _slices(self, n_members: int) -> list[tuple[int, int]]:
        slices = self.feature_slices
        if slices is None or isinstance(slices, (str, bytes)) or not isinstance(slices, Sequence):
            raise HeadInputError(
                f"feature_slices must be a list of (start, stop) pairs, one per member, "
                f"got {slices!r}"
            )
        if len(slices) != n_members:
            raise HeadInputError(
                f"got {len(slices)} feature_slices for {n_members} heads; give one "
                "(start, stop) column range per member"
            )
        return [_as_slice(s, i) for i, s in enumerate(slices)]

    def _weights(self, n_members: int) -> np.ndarray:
        if self.weights is None:
            return np.ones(n_members, dtype=np.float64)
        try:
            w = np.asarray(self.weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"weights must be numbers, got {self.weights!r}") from None
        if w.shape != (n_members,):
            raise ValueError(
                f"got {w.size} weights for {n_members} heads; give one weight per member or None"
            )
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"weights must be finite, >= 0 and not all 0, got {w.tolist()}"
            )
        return w

    @staticmethod
    def _check_width(slices: list[tuple[int, int]], n_features: int) -> None:
        for i, (start, stop) in enumerate(slices):
            if stop > n_features:
                raise HeadInputError(
                    f"feature_slices[{i}] = ({start}, {stop}) reaches past the {n_features} "
                    "features of X; slices must lie within the concatenated embedding "
                    "(check the backbone order and embed dims)"
                )

    def _set_members(self, members: list[Head], slices: list[tuple[int, int]]) -> None:
        kinds = {"str" if m.classes_.dtype.kind == "U" else "int" for m in members}
        if len(kinds) > 1:
            raise HeadInputError(
                "members mix string and integer class labels; fit every member on the same labels"
            )
        self.heads_ = members
        self.classes_ = np.unique(np.concatenate([np.asarray(m.classes_) for m in members]))
        self.slices_ = slices
        self.weights_ = self._weights(len(members))

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y) -> "Ensemble":
        heads = self._members()
        X, codes = self._validate_fit(X, y)
        slices = self._slices(len(heads))
        self._check_width(slices, X.shape[1])
        self._weights(len(heads))  # bad weights fail before any member is fitted
        labels = self.classes_[codes]
        members = [_clone(h).fit(X[:, a:b], labels) for h, (a, b) in zip(heads, slices)]
        self._set_members(members, slices)
        return self

    @classmethod
    def from_fitted(cls, heads, feature_slices, weights=None) -> "Ensemble":
        """A fitted ensemble of already fitted members, used as they are (no refitting).

        ``n_features_in_`` is the largest slice stop; each member must have been fitted on
        exactly its slice's width.
        """
        ens = cls(heads, feature_slices, weights)
        members = ens._members()
        slices = ens._slices(len(members))
        for i, (m, (a, b)) in enumerate(zip(members, slices)):
            if getattr(m, "classes_", None) is None:
                raise NotFittedError(
                    f"heads[{i}] ({type(m).__name__}) is not fitted; fit it first, or build the "
                    "ensemble unfitted and call fit(X, y)"
                )
            width = getattr(m, "n_features_in_", None)
            if width is not None and int(width) != b - a:
                raise HeadInputError(
                    f"heads[{i}] ({type(m).__name__}) was fitted on {width} features but "
                    f"feature_slices[{i}] = ({a}, {b}) selects {b - a}; give each member the "
                    "slice of the embedding it was trained on"
                )
        ens._set_members(members, slices)
        ens.n_features_in_ = max(b for _, b in slices)
        return ens

    # ------------------------------------------------------------------ prediction
    def _average(self, X: np.ndarray) -> np.ndarray:
        out = np.zeros((X.shape[0], len(self.classes_)), dtype=np.float64)
        for m, (a, b), w in zip(self.heads_, self.slices_, self.weights_):
            if w == 0:
                continue
            cols = np.searchsorted(self.classes_, m.classes_)
            out[:, cols] += w * np.asarray(m.predict_proba(X[:, a:b]), dtype=np.float64)
        out /= self.weights_.sum()
        return out

    def predict_proba(self, X) -> np.ndarray:
        return self._average(self._validate_predict(X))

    def _logits(self, X: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.maximum(np.log(self._average(X)), _LOG_FLOOR)

    # ------------------------------------------------------------------ persistence
    def _state(self):
        return {}, {"n_members": len(self.heads_)}

    def _save_extra(self, path: Path) -> None:
        for i, m in enumerate(self.heads_):
            m.save(Path(path) / MEMBER_DIR.format(i))

    @classmethod
    def _params_from_saved(cls, params, path):
        params = dict(params)
        slices = [tuple(int(v) for v in s) for s in params.pop("feature_slices")]
        weights = params.pop("weights", None)
        out = super()._params_from_saved(params, path)
        # the members are saved fitted; as params they are the templates fit() would clone
        out["heads"] = [load_head(Path(path) / MEMBER_DIR.format(i)) for i in range(len(slices))]
        out["feature_slices"] = slices
        out["weights"] = None if weights is None else [float(w) for w in weights]
        return out

    def _set_state(self, arrays, state, path):
        n = int(state.get("n_members", -1))
        if n != len(self.heads):
            raise ValueError(
                f"{path}: config lists {n} members but {len(self.heads)} feature slices; "
                "the save is inconsistent, save the ensemble again"
            )
        classes = self.classes_
        self._set_members(list(self.heads), self._slices(n))
        if not np.array_equal(self.classes_, classes):
            raise ValueError(
                f"{path}: the members' classes {self.classes_.tolist()} differ from the saved "
                f"{classes.tolist()}; the save is inconsistent, save the ensemble again"
            )
        self.classes_ = classes

