"""`tlpipe suggest`: mine the captured traffic of a served model for new classes, and accept one.

`suggest_classes` clusters the captured embeddings of the model's current backbone(s)
(`pipeline.suggest`), writes ``suggestions.html`` (thumbnails + nearest known classes per
cluster) and ``suggestions.json`` (the cluster -> record ids `accept` reads, so ids stay what the
page showed even if more traffic is captured meanwhile) next to the capture.

`accept_cluster` adds a cluster's images as support examples of a new class through the same
support store the admin API writes (`deploy.support_store`): a running server picks them up on
its next registry poll (or ``POST /v1/reload``) and answers the class through the k-NN fallback
at once; and copies them into a labelled folder (``<export>/<label>/``) for the next `tlpipe run`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploy.capture import open_fs, read_captures
from deploy.model_source import ModelSource
from deploy.service import Backbones, backbones_fingerprint
from deploy.settings import ServeSettings
from deploy.support_store import SupportStore, check_class_name
from pipeline.suggest import THUMBS_PER_CLUSTER, min_cohesion, render_html, suggest, thumbnail

SUGGESTIONS_JSON = "suggestions.json"
SUGGESTIONS_HTML = "suggestions.html"


class SuggestError(ValueError):
    """Nothing to suggest or accept; the message says why and what to do."""


@dataclass
class SuggestResult:
    model: str
    capture: str
    records: int
    suggestions: list  # [pipeline.suggest.Suggestion]
    html: str
    json: str


def _model(settings: ServeSettings):
    source = ModelSource.for_settings(settings)
    resolved = source.resolve()
    predictor = source.load(resolved, engine=settings.engine)
    fingerprint = backbones_fingerprint(Backbones.of(getattr(predictor, "specs", None) or [predictor.spec]))
    return source, resolved, predictor, fingerprint


def capture_location(settings: ServeSettings, capture: str | None) -> str:
    key = ModelSource.for_settings(settings).ref.key
    url = capture or settings.capture_url(key) or str(settings.serve_dir(key) / "capture")
    return url


def suggest_classes(settings: ServeSettings, *, capture: str | None = None, min_cluster_size: int = 5,
                    min_samples: int | None = None) -> SuggestResult:
    _, resolved, predictor, fingerprint = _model(settings)
    url = capture_location(settings, capture)
    records, fs = read_captures(url, fingerprint=fingerprint)
    if not records:
        raise SuggestError(f"no captured images of {resolved.label}'s backbone under {url}: serve with "
                           f"`tlpipe serve --capture {url}` and let traffic arrive first")
    X = np.stack([r.embedding for r in records])
    known = predictor.reference or predictor.support  # the training sample, else every support vector
    floor = (min_cohesion(known.sample if known is predictor.reference else known.vectors, known.labels)
             if known is not None and len(known.labels) else None)
    found = suggest(X, support=predictor.support, decisions=[r.meta.get("decision", "") for r in records],
                    min_cluster_size=min_cluster_size, min_samples=min_samples, min_cohesion=floor)
    thumbs = {}
    for s in found:
        thumbs[s.cluster] = [thumbnail(fs.cat_file(records[i].image_path)) for i in s.members[:THUMBS_PER_CLUSTER]]
    noise = len(records) - sum(s.size for s in found)
    page = render_html(f"suggested classes for {resolved.label}", found, thumbs, noise=noise,
                       how_to_accept=f"tlpipe suggest {settings.model} --accept CLUSTER --label NAME")
    doc = {"model": resolved.label, "fingerprint": fingerprint, "capture": url, "records": len(records),
           "min_cohesion": floor,
           "clusters": [{**s.to_dict(), "records": [records[i].id for i in s.members]} for s in found]}
    _, root = open_fs(url)
    fs.pipe_file(f"{root}/{SUGGESTIONS_HTML}", page.encode())
    fs.pipe_file(f"{root}/{SUGGESTIONS_JSON}", json.dumps(doc, indent=2).encode())
    base = url.rstrip("/")
    return SuggestResult(resolved.label, url, len(records), found, f"{base}/{SUGGESTIONS_HTML}",
                         f"{base}/{SUGGESTIONS_JSON}")


@dataclass
class AcceptResult:
    label: str
    added: int
    duplicates: int
    exported: Path
    store: Path


def accept_cluster(settings: ServeSettings, cluster: int, label: str, *, capture: str | None = None,
                   export: str | Path | None = None) -> AcceptResult:
    try:
        check_class_name(label)
    except ValueError as exc:
        raise SuggestError(str(exc)) from None
    source = ModelSource.for_settings(settings)
    url = capture_location(settings, capture)
    records, fs = read_captures(url)
    _, croot = open_fs(url)
    json_path = f"{url.rstrip('/')}/{SUGGESTIONS_JSON}"
    try:
        doc = json.loads(fs.cat_file(f"{croot}/{SUGGESTIONS_JSON}"))
    except FileNotFoundError:
        raise SuggestError(f"no {SUGGESTIONS_JSON} under {url}: run `tlpipe suggest {settings.model}` first "
                           "and pick a cluster from its page") from None
    by_id = {r.id: r for r in records}
    clusters = {int(c["cluster"]): c for c in doc["clusters"]}
    if int(cluster) not in clusters:
        raise SuggestError(f"cluster {cluster} is not in {json_path} (clusters: "
                           f"{', '.join(map(str, sorted(clusters))) or 'none'}); rerun `tlpipe suggest`")
    members = [by_id[i] for i in clusters[int(cluster)]["records"] if i in by_id]
    if not members:
        raise SuggestError(f"the images of cluster {cluster} are no longer captured (evicted by the size or "
                           "age bound); rerun `tlpipe suggest`")
    images = [fs.cat_file(r.image_path) for r in members]
    root = settings.serve_dir(source.ref.key)
    store = SupportStore(root / "support")
    results = store.add(label, images, model=doc.get("model", ""))
    out = Path(export) if export is not None else root / "accepted"
    dest = out / label
    dest.mkdir(parents=True, exist_ok=True)
    for r, data in zip(members, images):
        (dest / r.meta["image"]).write_bytes(data)
    return AcceptResult(label, sum(not dup for _, dup in results), sum(dup for _, dup in results), out, store.root)
