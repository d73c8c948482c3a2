"""Suggested classes: density-based clusters of captured embeddings (the images a served model
was unsure about), each with its nearest known classes, and an HTML page to review them.

HDBSCAN keeps what is not dense as noise (label -1), so a handful of odd images never becomes a
"class"; clustering runs on a PCA projection of the L2-normalised embeddings (density is
meaningless in 1000+ dimensions). Density is relative, though: a few dozen unrelated images
spread evenly can still form an HDBSCAN cluster. So a cluster is suggested only when it is about
as tight as the classes the model knows: its cohesion (mean cosine similarity of its members to
their centroid) must reach `COHESION_SLACK` times the loosest known class's; looser ones are noise.

A cluster can also be a known class the model is merely unsure about (harder photos of it). It
is flagged `looks_like` that class when most of its neighbours' vote goes to it and its members
are as close to that class's examples as the class's own examples are to each other
(`within_class_similarity`): accepting it as a new class would split a class in two.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from pipeline.drift import normalise

DEFAULT_MIN_CLUSTER_SIZE = 5
DEFAULT_COMPONENTS = 16
THUMBS_PER_CLUSTER = 12
THUMB_PX = 96
COHESION_SLACK = 0.75  # a suggested class may be a quarter looser than the loosest known class
NEIGHBOURS = 10
#: a cluster looks like known class c when c has this share of its neighbours' vote ...
LOOK_ALIKE_SHARE = 0.6
#: ... and its members' similarity to c's examples reaches this fraction of c's own within-class one
LOOK_ALIKE_SLACK = 0.95
#: examples per class whose neighbours set the class's within-class similarity
WITHIN_SAMPLE = 200


@dataclass
class Suggestion:
    """One cluster of captured images: a candidate new class."""

    cluster: int  # 0 = the largest
    members: list[int]  # row indices into the clustered embeddings
    cohesion: float  # mean cosine similarity of the members to their centroid
    nearest: list[dict] = field(default_factory=list)  # [{"label", "share", "similarity"}]
    decisions: dict = field(default_factory=dict)
    looks_like: str | None = None  # a known class this cluster is indistinguishable from

    @property
    def size(self) -> int:
        return len(self.members)

    def to_dict(self) -> dict:
        return {**asdict(self), "size": self.size}


def cluster_embeddings(X, *, min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE, min_samples: int | None = None,
                       n_components: int = DEFAULT_COMPONENTS, seed: int = 0) -> np.ndarray:
    """HDBSCAN labels (-1: noise) of the rows of `X`."""
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA

    Z = normalise(X)
    n = len(Z)
    if n < max(2, int(min_cluster_size)):
        return np.full(n, -1, dtype=int)
    # a few dozen captured images cannot support 16 principal directions: at most n/5 of them
    dims = max(1, min(int(n_components), max(2, n // 5), n - 1, Z.shape[1]))
    P = PCA(dims, random_state=seed).fit_transform(Z)
    if min_samples is None:
        # HDBSCAN's default (min_cluster_size) smooths the density over so many neighbours that a
        # capture of a few dozen images is all noise; 2 still leaves isolated images as noise, and
        # larger captures smooth more (up to min_cluster_size)
        min_samples = max(2, min(int(min_cluster_size), n // 50))
    return HDBSCAN(min_cluster_size=int(min_cluster_size), min_samples=int(min_samples),
                   copy=True).fit(P).labels_


def nearest_classes(members: np.ndarray, support, *, k: int = NEIGHBOURS, top: int = 3) -> list[dict]:
    """The known classes closest to a cluster: a similarity-weighted vote of each member's k
    nearest support vectors, as shares of the vote."""
    if support is None or not len(support):
        return []
    scores, labels, _ = support.search(normalise(members), k)
    votes: Counter = Counter()
    sims: dict[str, list[float]] = {}
    for row_s, row_l in zip(scores, labels):
        for s, lab in zip(row_s, row_l):
            votes[str(lab)] += max(float(s), 0.0)
            sims.setdefault(str(lab), []).append(float(s))
    total = sum(votes.values()) or 1.0
    return [{"label": lab, "share": v / total, "similarity": float(np.mean(sims[lab]))}
            for lab, v in votes.most_common(top)]


def within_class_similarity(support, *, k: int = NEIGHBOURS, sample: int = WITHIN_SAMPLE,
                            seed: int = 0) -> dict[str, float]:
    """{class: median over (a sample of) its support examples of their mean similarity to the
    other examples of that class among their `k` nearest neighbours}: how close a class's own
    images sit to each other, in the units `nearest_classes` reports."""
    if support is None or not len(support):
        return {}
    labels = np.asarray(support.labels, dtype=str)
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:sample] for c in np.unique(labels)])
    scores, found, ids = support.search(support.vectors_at(rows), k + 1)
    own = np.asarray(support.ids)[rows]
    out: dict[str, list[float]] = {}
    for c, row_s, row_l, row_i, me in zip(labels[rows], scores, found, ids, own):
        same = [float(s_) for s_, lab, i in zip(row_s, row_l, row_i) if str(lab) == c and i != me]
        if same:
            out.setdefault(str(c), []).append(float(np.mean(same)))
    return {c: float(np.median(v)) for c, v in out.items()}


def look_alike(nearest: Sequence[dict], within: dict[str, float], *, share: float = LOOK_ALIKE_SHARE,
               slack: float = LOOK_ALIKE_SLACK) -> str | None:
    """The known class a cluster with these `nearest_classes` cannot be told apart from, or None."""
    if not nearest:
        return None
    top = nearest[0]
    ref = within.get(top["label"])
    if ref is None or top["share"] < share or top["similarity"] < slack * ref:
        return None
    return top["label"]


def cohesion(X) -> float:
    """Mean cosine similarity of the rows of `X` to their (normalised) centroid."""
    Z = normalise(X)
    return float((Z @ normalise(Z.mean(axis=0))[0]).mean())


def min_cohesion(X, labels: Sequence[str], *, slack: float = COHESION_SLACK) -> float | None:
    """`slack` times the cohesion of the loosest known class (classes of 2+ vectors), or None."""
    labels = np.asarray([str(v) for v in labels])
    values = [cohesion(X[labels == c]) for c in np.unique(labels) if (labels == c).sum() >= 2]
    return slack * min(values) if values else None


def suggest(X, *, support=None, decisions: Sequence[str] | None = None,
            min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE, min_samples: int | None = None,
            n_components: int = DEFAULT_COMPONENTS, min_cohesion: float | None = None) -> list[Suggestion]:
    """Clusters of `X` as suggestions, largest first (noise, and clusters looser than
    `min_cohesion`, left out)."""
    X = normalise(X)
    labels = cluster_embeddings(X, min_cluster_size=min_cluster_size, min_samples=min_samples,
                                n_components=n_components)
    within = None
    out = []
    for c in sorted(set(labels.tolist()) - {-1}, key=lambda c: -(labels == c).sum()):
        idx = np.flatnonzero(labels == c)
        tight = cohesion(X[idx])
        if min_cohesion is not None and tight < min_cohesion:
            continue
        near = nearest_classes(X[idx], support)
        if within is None:
            within = within_class_similarity(support)
        out.append(Suggestion(cluster=len(out), members=idx.tolist(), cohesion=tight, nearest=near,
                              decisions=dict(Counter(decisions[i] for i in idx)) if decisions is not None else {},
                              looks_like=look_alike(near, within)))
    return out


def thumbnail(data: bytes, px: int = THUMB_PX) -> str | None:
    """A data: URL of a small JPEG of the image, or None if it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((px, px))
            if min(im.size) < px // 2:  # tiny images (32 px) scale up so they can be seen
                scale = px / max(im.size)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
    except Exception:  # noqa: BLE001 - a damaged capture: no thumbnail
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def render_html(title: str, suggestions: Sequence[Suggestion], thumbs: dict[int, list[str | None]], *,
                noise: int = 0, how_to_accept: str = "") -> str:
    """A self-contained page: one section per cluster with example thumbnails and nearest classes."""
    esc = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}img{margin:2px;border:1px solid #ccc}"
             "section{margin-bottom:2em}code{background:#eee;padding:2px 4px}</style>",
             f"<h1>{esc(title)}</h1>",
             f"<p>{len(suggestions)} cluster(s); {noise} captured image(s) left as noise.</p>"]
    if how_to_accept:
        parts.append(f"<p>Accept a cluster as a new class: <code>{esc(how_to_accept)}</code></p>")
    for s in suggestions:
        near = ", ".join(f"{esc(n['label'])} ({n['share']:.0%}, sim {n['similarity']:.2f})" for n in s.nearest)
        dec = ", ".join(f"{esc(k)} {v}" for k, v in sorted(s.decisions.items()))
        alike = (f"<br><strong>looks like the known class {esc(s.looks_like)}</strong>: its images sit "
                 f"as close to {esc(s.looks_like)}'s examples as those do to each other — more likely "
                 f"hard {esc(s.looks_like)} photos than a new class") if s.looks_like else ""
        parts.append(f"<section id='cluster-{s.cluster}'><h2>cluster {s.cluster}: {s.size} images</h2>"
                     f"<p>nearest known classes: {near or 'none'}<br>cohesion {s.cohesion:.3f}"
                     + (f"; decisions: {dec}" if dec else "") + alike + "</p><div>")
        parts.extend(f"<img src='{t}' alt='cluster {s.cluster}'>" for t in thumbs.get(s.cluster, []) if t)
        parts.append("</div></section>")
    return "\n".join(parts)
