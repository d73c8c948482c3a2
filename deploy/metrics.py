"""Prometheus metrics of one ingress replica, in its own `CollectorRegistry`.

Exposed at ``GET /metrics`` (text format 0.0.4). With several ingress replicas each scrape
reaches one replica; scrape the replicas (pods) directly, or use Ray's own metrics export.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the API)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tlpipe_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("tlpipe_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("tlpipe_predictions", "Per-image decisions",
                                 ["decision"], registry=r)
        self.images_per_request = Histogram("tlpipe_images_per_request", "Images in one predict request",
                                            buckets=BATCH_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "tlpipe_backbone_batch_images",
            "Images per backbone forward pass (each batch counted once, by the ingress that sent its "
            "first request)", buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("tlpipe_backbone_batch_requests",
                                        "Requests merged into one backbone forward pass",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.stage = Histogram("tlpipe_stage_duration_seconds", "Time per stage of a predict request",
                               ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_info = Gauge("tlpipe_model_info", "The model version served (value 1)",
                                ["name", "version"], registry=r)
        self.reloads = Counter("tlpipe_model_reloads", "Model reload attempts by result",
                               ["result"], registry=r)
        self.support_added = Gauge("tlpipe_support_added_examples", "Support examples added via the API",
                                   ["model"], registry=r)
        self.errors = Counter("tlpipe_client_errors", "Rejected requests by error code", ["code"],
                              registry=r)
        # production monitoring (deploy/monitor.py), set at scrape time over sliding windows
        w = ["model", "window"]
        self.mon_images = Gauge("tlpipe_monitor_images", "Images answered in the window", w, registry=r)
        self.mon_rate = Gauge("tlpipe_monitor_decision_rate", "Share of the window's images per decision",
                              w + ["decision"], registry=r)
        self.mon_confidence = Gauge("tlpipe_monitor_confidence_images",
                                    "Images per bin of the head's top probability (bin lower edge `ge`)",
                                    w + ["ge"], registry=r)
        self.mon_predicted = Gauge("tlpipe_monitor_predicted_share", "Share of the window's images per "
                                   "predicted class", w + ["label"], registry=r)
        self.mon_prior = Gauge("tlpipe_monitor_prior_distance", "Total variation distance between the "
                               "predicted-class mix and the training prior", w, registry=r)
        self.mon_drift = Gauge("tlpipe_monitor_drift_score", "Mean embedding-drift residual of the window",
                               w, registry=r)
        self.mon_drift_threshold = Gauge("tlpipe_monitor_drift_threshold", "Calibrated drift threshold "
                                         "for the window's image count", w, registry=r)
        self.mon_drifted = Gauge("tlpipe_monitor_drifted", "1 when the window's drift score is above its "
                                 "threshold", w, registry=r)
        self.capture = Gauge("tlpipe_capture", "Capture writer counters and sizes", ["model", "what"], registry=r)
        self._monitor_gauges = (self.mon_images, self.mon_rate, self.mon_confidence, self.mon_predicted,
                                self.mon_prior, self.mon_drift, self.mon_drift_threshold, self.mon_drifted,
                                self.capture)
        self._versions: dict[str, str] = {}  # name -> the version model_info shows

    def set_model(self, name: str, version: str) -> None:
        """`name` now serves `version` (the other models of a multi-model replica keep theirs)."""
        old = self._versions.get(name)
        if old is not None and old != version:
            self.model_info.remove(name, old)
        self._versions[name] = version
        self.model_info.labels(name=name, version=version).set(1)

    def monitor_clear(self) -> None:
        for g in self._monitor_gauges:
            g.clear()

    def set_window(self, model: str, summary: dict) -> None:
        """The gauges of one `pipeline.monitoring.DecisionWindows.summary`."""
        lab = {"model": model, "window": summary["window"]}
        self.mon_images.labels(**lab).set(summary["images"])
        for decision, rate in summary["rates"].items():
            if rate is not None:
                self.mon_rate.labels(**lab, decision=decision).set(rate)
        for edge, count in zip(summary["confidence"]["edges"], summary["confidence"]["counts"]):
            self.mon_confidence.labels(**lab, ge=f"{edge:g}").set(count)
        for label, share in summary["predicted"].items():
            self.mon_predicted.labels(**lab, label=label).set(share)
        if summary["prior_distance"] is not None:
            self.mon_prior.labels(**lab).set(summary["prior_distance"])
        drift = summary["drift"]
        if drift.get("available") and drift.get("score") is not None:
            self.mon_drift.labels(**lab).set(drift["score"])
            self.mon_drift_threshold.labels(**lab).set(drift["threshold"])
            self.mon_drifted.labels(**lab).set(1.0 if drift["drifted"] else 0.0)

    def set_capture(self, stats: dict, model: str = "") -> None:
        for key, value in stats.items():
            if isinstance(value, (int, float)):
                self.capture.labels(model=model, what=key).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
