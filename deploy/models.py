"""Several models behind one endpoint: one `ServingService` per model, one embedder for all.

`ModelSet` is what an ingress replica serves: the models by their route name
(``/v1/models/{name}/...``, the registered name), each with its own state, alias poll and hot
reload, support store, monitor and capture; and, shared by all, the embedder (so models whose
backbones have the same spec ride in the same `@serve.batch` forward pass: one embedding, many
heads), the decode thread pool and the Prometheus registry.

A one-model set is today's single-model app: the unprefixed routes (``/v1/predict``,
``/v1/model``, ...) answer for that model. With several, they answer 404 naming the models.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

from deploy.errors import ApiError
from deploy.metrics import ServeMetrics
from deploy.model_source import parse_model_ref
from deploy.service import Embedder, ServingService
from deploy.settings import ServeSettings, load_settings


def model_names(models: Sequence[str]) -> list[str]:
    """The route name of each reference (its registered name); ValueError on a malformed or
    repeated one (two references of one name would share a support store and a download cache)."""
    names: list[str] = []
    for text in models:
        name = parse_model_ref(text).key
        if name in names:
            raise ValueError(f"model {name!r} is given twice ({', '.join(m for m in models if parse_model_ref(m).key == name)}); "
                             "serve each registered model once (one alias or version per name)")
        names.append(name)
    return names


def per_model_settings(models: Sequence[str], overrides: Mapping[str, Any] | None = None, *,
                       environ: Mapping[str, str] | None = None) -> list[ServeSettings]:
    """`ServeSettings` of each model: the shared `overrides` with its own `model`. With several
    models an explicit capture folder is split per model (``<capture>/<name>``, what
    `tlpipe suggest NAME --capture <capture>/<name>` reads); 'auto' is per model already."""
    names = model_names(models)
    out = []
    for text, name in zip(models, names):
        values = {**dict(overrides or {}), "model": text}
        capture = values.get("capture")
        if len(models) > 1 and capture and capture != "auto":
            values["capture"] = capture.rstrip("/") + "/" + name
        out.append(load_settings(values, environ=environ))
    return out


class ModelSet:
    """The models one replica serves, by route name (in the order given)."""

    def __init__(self, services: Sequence[ServingService]):
        if not services:
            raise ValueError("no model to serve: pass at least one model (NAME@champion)")
        self.services: dict[str, ServingService] = {}
        for s in services:
            if s.ref.key in self.services:
                raise ValueError(f"model {s.ref.key!r} is given twice; serve each registered model once")
            self.services[s.ref.key] = s
        first = services[0]
        self.settings = first.settings  # limits and the admin token: the same for every model
        self.metrics = first.metrics

    @classmethod
    def build(cls, settings: Sequence[ServeSettings], embedder: Embedder) -> "ModelSet":
        """One service per settings, sharing `embedder`, one decode pool and one metrics registry."""
        metrics = ServeMetrics()
        pool = ThreadPoolExecutor(settings[0].decode_threads, thread_name_prefix="tlpipe-decode")
        return cls([ServingService(s, embedder, metrics=metrics, decode_pool=pool) for s in settings])

    @property
    def names(self) -> list[str]:
        return list(self.services)

    @property
    def single(self) -> bool:
        return len(self.services) == 1

    def get(self, name: str) -> ServingService:
        service = self.services.get(name)
        if service is None:
            raise ApiError(404, "unknown_model", f"no model named {name!r} is served here; the models are "
                           f"{', '.join(self.names)} (GET /v1/models)", [{"models": self.names}])
        return service

    def only(self) -> ServingService:
        """The model of a one-model app (the unprefixed routes); 404 naming them when several."""
        if self.single:
            return next(iter(self.services.values()))
        raise ApiError(404, "model_required", f"this server serves {len(self.services)} models "
                       f"({', '.join(self.names)}): use /v1/models/{{name}}/... (e.g. POST "
                       f"/v1/models/{self.names[0]}/predict); GET /v1/models lists them",
                       [{"models": self.names}])

    @property
    def ready(self) -> bool:
        return all(s.ready for s in self.services.values())

    async def start(self) -> None:
        """Load every model (at once: their backbone probes share the embedder's batches)."""
        await asyncio.gather(*(s.start() for s in self.services.values()))

    def set_poll_interval(self, seconds: float) -> None:
        for s in self.services.values():
            s.set_poll_interval(seconds)

    def render_metrics(self) -> bytes:
        self.metrics.monitor_clear()
        for s in self.services.values():
            s.export_monitoring()
        return self.metrics.render()

    def describe(self) -> dict:
        """`GET /v1/models`: each model's route name, version, reference, classes, task (multiclass
        or multilabel: one server may serve both) and backbones; and
        which models share a backbone (the same fingerprint: one forward pass per batch for all)."""
        out = []
        for name, s in self.services.items():
            row: dict[str, Any] = {"name": name, "reference": str(s.ref), "alias": s.ref.alias, "ready": s.ready}
            if s.ready:
                st = s.state
                row.update(model=st.label, version=st.resolved.version, classes=st.base.classes, task=st.task,
                           backbones=st.backbones.names, fingerprint=st.fingerprint)
            out.append(row)
        shared: dict[str, dict] = {}
        for row in out:
            if row.get("fingerprint"):
                group = shared.setdefault(row["fingerprint"], {"fingerprint": row["fingerprint"],
                                                               "backbones": row["backbones"], "models": []})
                group["models"].append(row["name"])
        return {"models": out, "shared_backbones": list(shared.values())}

    def close_captures(self, timeout: float = 5.0) -> None:
        for s in self.services.values():
            if s.monitor is not None and s.monitor.capture is not None:
                s.monitor.capture.close(timeout=timeout)
