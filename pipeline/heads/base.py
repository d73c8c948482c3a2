"""Shared base for classification heads over cached (N, D) float32 features.

Every head follows the scikit-learn estimator contract:

* ``__init__`` stores its keyword arguments verbatim (no validation, no derived state);
  ``get_params()`` / ``set_params()`` read and write them.
* ``fit(X, y) -> self`` sets ``classes_`` (sorted unique labels, strings or ints) and
  ``n_features_in_``.
* ``predict_proba(X)`` has one column per entry of ``classes_`` in that order;
  ``predict(X)`` returns labels from ``classes_``; ``decision_function(X)`` (where the head
  has natural logits) returns (N, C) scores, always 2-D, even for two classes.

Persistence never uses pickle: ``save(dir)`` writes ``config.json`` (head class, params,
classes, format version, small fitted scalars) and ``arrays.safetensors`` (fitted arrays);
``Head.load(dir)`` / ``<HeadClass>.load(dir)`` mirror it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.heads.errors import HeadInputError, NotFittedError
from pipeline.heads.extmath import Standardizer, softmax  # Standardizer re-exported: pipeline/finetune/model.py uses it
from pipeline.heads.registry import ARRAYS_FILE, CONFIG_FILE, FORMAT, FORMAT_VERSION, HEADS, read_config

__all__ = [
    "ARRAYS_FILE", "CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "Head", "HeadInputError", "NotFittedError",
    "Standardizer", "check_features", "check_labels", "codes_for", "encode_labels", "read_config", "torch_threads",
]


# --------------------------------------------------------------------------- validation


def check_features(X: Any, *, n_features: int | None = None, name: str = "X") -> np.ndarray:
    """Return X as a C-contiguous float32 (N, D) array or raise HeadInputError saying why."""
    if X is None:
        raise HeadInputError(f"{name} is None; pass a 2-D (n_samples, n_features) float array")
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and the like
        raise HeadInputError(f"{name} could not be converted to an array: {exc}") from exc
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == np.bool_
    ):
        raise HeadInputError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 2:
        hint = " (use X.reshape(1, -1) for a single sample)" if arr.ndim == 1 else ""
        raise HeadInputError(
            f"{name} must be 2-D (n_samples, n_features), got shape {arr.shape}{hint}"
        )
    if arr.shape[0] == 0:
        raise HeadInputError(f"{name} has 0 samples; at least one is required")
    if arr.shape[1] == 0:
        raise HeadInputError(f"{name} has 0 features")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise HeadInputError(
            f"{name} contains NaN or inf in {bad} row(s); drop or repair those embeddings first"
        )
    if n_features is not None and arr.shape[1] != n_features:
        raise HeadInputError(
            f"{name} has {arr.shape[1]} features but this head was fitted on {n_features}; "
            "use features from the same backbone the head was trained on"
        )
    return arr


def check_labels(y: Any, n_samples: int, *, name: str = "y") -> np.ndarray:
    """Return y as a 1-D int64 or str array of length n_samples, or raise HeadInputError."""
    if y is None:
        raise HeadInputError(f"{name} is None; pass one label per row of X")
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise HeadInputError(f"{name} must be 1-D (n_samples,), got shape {arr.shape}")
    if len(arr) != n_samples:
        raise HeadInputError(
            f"X and {name} have different lengths: {n_samples} rows vs {len(arr)} labels"
        )
    if arr.dtype == object:
        kinds = {type(v) for v in arr.tolist()}
        if all(issubclass(k, str) for k in kinds):
            arr = arr.astype(str)
        elif all(issubclass(k, (int, np.integer)) and not issubclass(k, bool) for k in kinds):
            arr = arr.astype(np.int64)
        else:
            names = sorted(k.__name__ for k in kinds)
            raise HeadInputError(
                f"{name} must hold only strings or only integers, got a mix of {names}"
            )
    if np.issubdtype(arr.dtype, np.str_):
        return arr
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        return arr.astype(np.int64)
    raise HeadInputError(
        f"{name} labels must be strings or integers, got dtype {arr.dtype}"
        + (" (cast integer-valued floats with y.astype(int))" if arr.dtype.kind == "f" else "")
    )


def encode_labels(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes_, codes): sorted unique labels and each sample's index into them."""
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise HeadInputError(
            f"need at least 2 classes to fit a classifier, got {len(classes)} "
            f"({classes.tolist()!r})"
        )
    return classes, codes.astype(np.int64)


def codes_for(classes: np.ndarray, y: np.ndarray, *, name: str = "y") -> np.ndarray:
    """Index of each label of y in classes (labels unseen at fit time are an error)."""
    if classes.dtype.kind != y.dtype.kind and not (
        classes.dtype.kind in "iu" and y.dtype.kind in "iu"
    ):
        raise HeadInputError(
            f"{name} labels are {y.dtype} but the head's classes_ are {classes.dtype}"
        )
    idx = np.searchsorted(classes, y)
    idx = np.clip(idx, 0, len(classes) - 1)
    unknown = classes[idx] != y
    if unknown.any():
        extra = sorted(set(np.asarray(y)[unknown].tolist()))[:10]
        raise HeadInputError(f"{name} has labels not seen in training: {extra!r}")
    return idx.astype(np.int64)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily set torch's intra-op thread count (None leaves it alone)."""
    if n is None:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- base class


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _untuple(value: Any) -> Any:
    """JSON lists back to tuples so loaded params match tuple defaults."""
    if isinstance(value, list):
        return tuple(_untuple(v) for v in value)
    if isinstance(value, dict):
        return {k: _untuple(v) for k, v in value.items()}
    return value


class Head:
    """Base class: params plumbing, input checks, save/load. Subclasses implement
    ``fit``, ``_logits`` or ``predict_proba``, ``_state()`` / ``_set_state()``."""

    #: params that are not JSON (callables, nested heads); subclasses handle them on save/load
    _unsaved_params: ClassVar[tuple[str, ...]] = ()
    #: whether decision_function exists for this head
    _has_decision_function: ClassVar[bool] = True

    # ---- sklearn params -------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        out = {}
        for name in self._param_names():
            value = getattr(self, name)
            out[name] = value
            if deep and isinstance(value, Head):
                for k, v in value.get_params(deep=True).items():
                    out[f"{name}__{k}"] = v
        return out

    def set_params(self, **params: Any) -> "Head":
        valid = set(self._param_names())
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            name, sep, sub = key.partition("__")
            if name not in valid:
                raise ValueError(
                    f"invalid parameter {name!r} for {type(self).__name__}; "
                    f"valid: {sorted(valid)}"
                )
            if sep:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
        for name, sub_params in nested.items():
            getattr(self, name).set_params(**sub_params)
        return self

    def __repr__(self) -> str:
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()
        }
        shown = []
        for k, v in self.get_params(deep=False).items():
            d = defaults.get(k, inspect.Parameter.empty)
            try:
                same = d is not inspect.Parameter.empty and bool(d == v)
            except Exception:
                same = False
            if not same:
                shown.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    # ---- fitted-state helpers -------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(X, y) "
                f"(or {type(self).__name__}.load(dir)) before using it"
            )

    def _validate_fit(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Validate training data, set classes_ / n_features_in_, return (X32, codes)."""
        X = check_features(X)
        y = check_labels(y, X.shape[0])
        classes, codes = encode_labels(y)
        self.classes_ = classes
        self.n_features_in_ = int(X.shape[1])
        return X, codes

    def _validate_predict(self, X: Any) -> np.ndarray:
        self._check_fitted()
        return check_features(X, n_features=self.n_features_in_)

    def _validate_val(
        self, X_val: Any, y_val: Any
    ) -> tuple[np.ndarray, np.ndarray] | None:
        if X_val is None and y_val is None:
            return None
        if X_val is None or y_val is None:
            raise HeadInputError("pass both X_val and y_val, or neither")
        Xv = check_features(X_val, n_features=self.n_features_in_, name="X_val")
        yv = check_labels(y_val, Xv.shape[0], name="y_val")
        return Xv, codes_for(self.classes_, yv, name="y_val")

    # ---- prediction API -------------------------------------------------------------
    def _logits(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def decision_function(self):
        """(N, C) float32 logits, columns following classes_ (absent on heads without logits,
        so ``hasattr(head, "decision_function")`` tells)."""
        if not self._has_decision_function:
            raise AttributeError(f"{type(self).__name__} has no decision_function")
        return self._decision_function

    def _decision_function(self, X: Any) -> np.ndarray:
        X = self._validate_predict(X)
        return np.asarray(self._logits(X), dtype=np.float32)

    def predict_proba(self, X: Any) -> np.ndarray:
        X = self._validate_predict(X)
        return softmax(self._logits(X))

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def score(self, X: Any, y: Any) -> float:
        """Mean accuracy on (X, y)."""
        X = check_features(X)
        y = check_labels(y, X.shape[0])
        return float(np.mean(self.predict(X) == y))

    # ---- persistence ----------------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, json_state) describing the fitted head beyond classes_/n_features_in_."""
        return {}, {}

    def _set_state(self, arrays: dict[str, np.ndarray], state: dict[str, Any], path: Path) -> None:
        """Inverse of _state (path = the save dir, for heads with extra files)."""

    def _save_extra(self, path: Path) -> None:
        """Write extra files (FAISS index, nested head) into the save dir."""

    def _params_for_save(self) -> dict[str, Any]:
        params = self.get_params(deep=False)
        for name in self._unsaved_params:
            params.pop(name, None)
        return _jsonable(params)

    @classmethod
    def _params_from_saved(cls, params: dict[str, Any], path: Path) -> dict[str, Any]:
        return {k: _untuple(v) for k, v in params.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write config.json + arrays.safetensors (+ head-specific files) into ``path``."""
        from safetensors.numpy import save_file

        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays, state = self._state()
        classes = self.classes_
        config = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "class": type(self).__name__,
            "params": self._params_for_save(),
            "classes": classes.tolist(),
            "classes_kind": "str" if classes.dtype.kind == "U" else "int",
            "n_features_in": int(self.n_features_in_),
            "state": _jsonable(state),
        }
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        save_file(arrays, str(path / ARRAYS_FILE), metadata={"format": FORMAT})
        self._save_extra(path)
        try:
            text = json.dumps(config, indent=2, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"cannot save {type(self).__name__}: a param or fitted value is not plain JSON "
                f"({exc}); use numbers, strings, lists and dicts for params"
            ) from exc
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path / CONFIG_FILE)  # config last: its presence marks a complete save
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Head":
        """Load a head saved with ``save``; ``Head.load`` dispatches on the saved class."""
        from safetensors.numpy import load_file

        path = Path(path)
        config = read_config(path)
        name = config["class"]
        if cls is Head:
            if name not in HEADS:
                raise ValueError(f"{path}: unknown head class {name!r}; known: {sorted(HEADS)}")
            return HEADS[name].load(path)
        if name != cls.__name__:
            raise ValueError(
                f"{path} holds a {name}, not a {cls.__name__}; use {name}.load or load_head"
            )
        params = cls._params_from_saved(config["params"], path)
        head = cls(**params)
        arrays_path = path / ARRAYS_FILE
        arrays = load_file(str(arrays_path)) if arrays_path.exists() else {}
        if config["classes_kind"] == "str":
            head.classes_ = np.asarray(config["classes"], dtype=str)
        else:
            head.classes_ = np.asarray(config["classes"], dtype=np.int64)
        head.n_features_in_ = int(config["n_features_in"])
        head._set_state(arrays, config.get("state", {}), path)
        return head
