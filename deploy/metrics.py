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
                                   registry=r)
        self.errors = Counter("tlpipe_client_errors", "Rejected requests by error code", ["code"],
                              registry=r)

    def set_model(self, name: str, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name=name, version=version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
