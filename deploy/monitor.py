"""Production monitoring of one ingress replica: wires `pipeline.monitoring.DecisionWindows`
(one per served model version) and the capture writer into the request path, `GET /v1/monitor`
and the Prometheus gauges on ``/metrics``.

Per request the cost is one small matrix product (the drift residuals against the reference
sample) and a few appended tuples; summaries are computed when asked for. Any failure here is
logged and counted, never a failed request.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from pipeline.monitoring import DecisionWindows, window_name
from pipeline.multilabel.predictor import MULTILABEL_TASK, task_of

log = logging.getLogger("tlpipe.serve")
MAX_MODELS = 4  # versions remembered per replica: the served one and a few before a hot reload


class ServingMonitor:
    def __init__(self, windows_s, *, last: int | None = None, capture=None, track: bool = True,
                 max_records: int | None = None):
        self.windows_s = tuple(float(w) for w in windows_s)
        # (window_s, last) pairs summarised: each time window, and the last `last` images
        self.windows = [(w, None) for w in self.windows_s] + ([(None, int(last))] if last else [])
        self.track = bool(track)  # False: capture only (the monitor setting is off)
        self.capture = capture  # deploy.capture.CaptureWriter or None
        self.max_records = max_records
        self.models: "OrderedDict[str, DecisionWindows]" = OrderedDict()
        self.errors = 0

    def _windows(self, state) -> DecisionWindows:
        w = self.models.get(state.label)
        if w is None:
            ref = getattr(state.base, "reference", None)
            if ref is not None and ref.dim != int(sum(state.dims)):
                log.warning("%s: the drift reference is %d-d but the embeddings are %d-d; drift is off",
                            state.label, ref.dim, int(sum(state.dims)))
                ref = None
            kw = {"max_records": self.max_records} if self.max_records else {}
            w = self.models[state.label] = DecisionWindows(
                reference=ref, multilabel=task_of(state.base) == MULTILABEL_TASK, **kw)
            while len(self.models) > MAX_MODELS:
                self.models.popitem(last=False)
        return w

    def observe(self, state, items, embeddings: np.ndarray, preds) -> None:
        """Record one request's answers (and offer its uncertain images to the capture)."""
        try:
            if self.track:
                w = self._windows(state)
                residuals = w.reference.residuals(embeddings) if w.reference is not None else None
                # a multi-label answer counts each of its labels (not its "a|b" key)
                labels = ([tuple(d["label"] for d in p.labels) for p in preds] if w.multilabel
                          else [p.label for p in preds])
                w.add([p.decision for p in preds], [p.top_k[0]["score"] if p.top_k else p.score for p in preds],
                      labels, residuals)
            if self.capture is not None:
                self.capture.offer_predictions(
                    [it.data for it in items], embeddings, preds,
                    {"model": state.label, "fingerprint": state.fingerprint}, [it.filename for it in items])
        except Exception:  # noqa: BLE001 - monitoring must never fail a request
            self.errors += 1
            if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                log.exception("monitoring failed (%d times so far); requests are unaffected", self.errors)

    def snapshot(self, current: str | None) -> dict:
        models = {}
        for label, w in self.models.items():
            ref = w.reference
            models[label] = {
                "serving": label == current, "images_total": w.total,
                "windows": [w.summary(s, last=n) for s, n in self.windows],
                "reference": None if ref is None else {
                    "sample": int(len(ref.sample)), "heldout": ref.n_heldout, "k": ref.k, "z": ref.z,
                    "mu": ref.mu, "sigma": ref.sigma, "min_window": ref.min_window},
            }
        return {"current": current, "windows": [window_name(s, n) for s, n in self.windows], "models": models,
                "capture": self.capture.stats() if self.capture is not None else None,
                "monitor_errors": self.errors}

    def export(self, metrics, current: str | None, capture_model: str = "") -> None:
        """Set the monitoring gauges (at scrape time) from the current model's windows; the caller
        clears them first (once for every model of the replica)."""
        w = self.models.get(current) if current else None
        if w is not None:
            for s, n in self.windows:
                metrics.set_window(current, w.summary(s, last=n))
        if self.capture is not None:
            metrics.set_capture(self.capture.stats(), capture_model)
