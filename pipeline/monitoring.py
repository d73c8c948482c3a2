"""Sliding-window bookkeeping of a served model's answers: decision rates, confidence histogram,
predicted-class distribution against the training prior, and the embedding-drift score.

Pure and cheap per image (one tuple appended); summaries are computed when asked for (the
monitor endpoint, a metrics scrape), over the images of the last `window_s` seconds.

A multi-label model (``multilabel=True``) records each image's answered labels (a tuple, empty
on abstain): ``predicted`` is then the share of images answered with each label (each label of
"cat|dog" counts, rows need not sum to 1), ``prior`` the share of training images carrying it
(`label_prior` of the reference's label-set-key prior), and ``prior_distance`` compares the two
as label mixes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from typing import Sequence

import numpy as np

from pipeline.drift import prior_distance
from pipeline.multilabel.labelsets import per_label
from pipeline.predictor import DECISIONS

DEFAULT_WINDOWS_S = (300.0, 3600.0)  # five minutes and an hour
DEFAULT_LAST = 500  # and the last 500 images, however long ago (quiet endpoints)
MAX_RECORDS = 50_000  # images remembered per model (~4 MB): older ones leave every window
CONFIDENCE_BINS = 10  # equal-width bins of the head's top probability over [0, 1]


class DecisionWindows:
    """The last `max_records` answers of one model, summarised over sliding time windows."""

    def __init__(self, *, max_records: int = MAX_RECORDS, reference=None, clock=time.time,
                 multilabel: bool = False):
        self.reference = reference  # a DriftReference, or None: drift unavailable
        self.multilabel = bool(multilabel)  # labels are tuples of labels; the prior is over label-set keys
        self._records: deque = deque(maxlen=int(max_records))  # (time, decision, confidence, label or labels, residual)
        self._lock = threading.Lock()  # appends come from the event loop, summaries maybe from a thread
        self.clock = clock
        self.total = 0

    def add(self, decisions: Sequence[str], confidences: Sequence[float],
            labels: Sequence[str | Sequence[str] | None], residuals: Sequence[float] | None = None, *, now: float | None = None) -> None:
        t = self.clock() if now is None else now
        res = residuals if residuals is not None else [math.nan] * len(decisions)
        with self._lock:
            self._records.extend((t, d, float(c), lab, float(r))
                                 for d, c, lab, r in zip(decisions, confidences, labels, res))
            self.total += len(decisions)

    def _window(self, window_s: float | None, last: int | None, now: float) -> list[tuple]:
        start = now - float(window_s) if window_s is not None else -math.inf
        out = []
        with self._lock:
            for rec in reversed(self._records):
                if rec[0] < start or (last is not None and len(out) >= last):
                    break
                out.append(rec)
        return out

    def summary(self, window_s: float | None = None, *, last: int | None = None, now: float | None = None) -> dict:
        """The answers of the last `window_s` seconds, or of the `last` images (both: whichever is fewer)."""
        now = self.clock() if now is None else now
        recs = self._window(window_s, last, now)
        n = len(recs)
        counts = Counter(r[1] for r in recs)
        conf = np.asarray([r[2] for r in recs], dtype=np.float64)
        hist, edges = np.histogram(np.clip(conf, 0.0, 1.0), bins=CONFIDENCE_BINS, range=(0.0, 1.0))
        labels: Counter = Counter()
        for r in recs:
            if isinstance(r[3], str):
                labels[r[3]] += 1
            elif r[3] is not None:  # a multi-label answer: each of its labels
                labels.update(map(str, r[3]))
        prior = self.reference.class_prior if self.reference is not None else {}
        mix = prior
        if self.multilabel:
            prior = label_prior(prior)
            total = sum(prior.values())
            mix = {c: v / total for c, v in prior.items()} if total else {}
        out = {
            "window": window_name(window_s, last), "window_s": window_s, "last": last, "images": n,
            "decisions": {d: int(counts.get(d, 0)) for d in DECISIONS},
            "rates": {d: (counts.get(d, 0) / n if n else None) for d in DECISIONS},
            "confidence": {"edges": [round(float(e), 6) for e in edges], "counts": hist.astype(int).tolist(),
                           "mean": float(conf.mean()) if n else None},
            "predicted": {c: v / n for c, v in sorted(labels.items())} if n else {},
            "prior": prior,
            "prior_distance": prior_distance(labels, mix),
        }
        if self.reference is None:
            out["drift"] = {"available": False, "reason": "the predictor has no drift reference (saved by "
                            "an older tlpipe): re-register it with `tlpipe run` to monitor drift"}
        else:
            scores = [r[4] for r in recs if not math.isnan(r[4])]
            out["drift"] = self.reference.judge(scores)
        return out


def label_prior(key_prior: dict) -> dict[str, float]:
    """Per label, the share of training images carrying it, from a prior over label-set keys
    ({"cat|dog": 0.2, "cat": 0.1} -> {"cat": 0.3, "dog": 0.2})."""
    return per_label({k: float(v) for k, v in key_prior.items()})


def window_name(window_s: float | None, last: int | None) -> str:
    """'300s', 'last500' or '300s,last500': how a window is labelled in JSON and metrics."""
    parts = ([f"{window_s:g}s"] if window_s is not None else []) + ([f"last{last}"] if last is not None else [])
    return ",".join(parts) or "all"
