"""Figures and the self-contained HTML report for an evaluation / selection.

Uses matplotlib's object API with the Agg canvas only: no pyplot, so no global figure state and
no backend switching. Every figure function returns a `matplotlib.figure.Figure`; `save_png`
writes one to disk and `png_bytes` renders one in memory (for `report_html`).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.evaluate import EvalReport
from pipeline.select import Candidate, pareto_front

_DPI = 110
_MAX_ANNOTATED_CLASSES = 20
_THUMB = 160


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure, *, dpi: int = _DPI) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_png(fig: Figure, path: str | os.PathLike, *, dpi: int = _DPI) -> str:
    """Write a figure as PNG to ``path`` (parent directories created); returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    data = png_bytes(fig, dpi=dpi)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ----------------------------------------------------------------------------- evaluation plots

def confusion_matrix_figure(report: EvalReport, *, title: str | None = None) -> Figure:
    """Confusion matrix normalised per row (true class), with class labels."""
    cm = np.asarray(report.confusion_matrix, dtype=np.float64)
    classes = list(report.classes)
    c = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(24.0, max(4.5, 0.45 * c + 2.5))
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fs = max(4.0, min(9.0, 180.0 / max(c, 1)))
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xticklabels(classes, rotation=90, fontsize=fs)
    ax.set_yticklabels(classes, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= _MAX_ANNOTATED_CLASSES:
        for i in range(c):
            for j in range(c):
                if cm[i, j] == 0:
                    continue
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=fs,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or f"Confusion matrix (row-normalised, n={report.n_samples})")
    fig.tight_layout()
    return fig


def reliability_figure(report: EvalReport, *, title: str | None = None) -> Figure:
    """Reliability diagram: per-bin accuracy bars, mean confidence, diagonal; counts below."""
    bins = report.reliability
    lower = np.array([b["lower"] for b in bins])
    upper = np.array([b["upper"] for b in bins])
    centers = (lower + upper) / 2
    width = upper - lower
    counts = np.array([b["count"] for b in bins])
    acc = np.array([b["accuracy"] if b["accuracy"] is not None else 0.0 for b in bins])
    conf = np.array([b["mean_confidence"] if b["mean_confidence"] is not None else np.nan
                     for b in bins])
    fig = _new_figure(5.5, 6.0)
    gs = fig.add_gridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
    ax = fig.add_subplot(gs[0])
    ax.bar(centers, acc, width=width, edgecolor="black", color="#4C72B0", alpha=0.85,
           label="accuracy")
    has = counts > 0
    ax.bar(centers[has], conf[has] - acc[has], bottom=acc[has], width=width[has],
           color="#DD8452", alpha=0.35, edgecolor="#DD8452", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.tick_params(labelbottom=False)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"Reliability diagram  (ECE = {report.ece:.4f}, n={report.n_samples})")
    ax2 = fig.add_subplot(gs[1], sharex=ax)
    ax2.bar(centers, counts, width=width, color="gray", edgecolor="black")
    ax2.set_xlabel("confidence (max probability)")
    ax2.set_ylabel("count")
    return fig


def _load_thumbnail(item: Any):
    from PIL import Image

    if isinstance(item, Image.Image):
        img = item
    else:
        from pipeline.images import open_image  # lazy: keeps plotting import-light

        img = open_image(item, draft_size=(_THUMB, _THUMB))
    img = img.convert("RGB")
    img.thumbnail((_THUMB, _THUMB))
    return np.asarray(img)


def hardest_examples_figure(images: Sequence[Any], captions: Sequence[str], *, ncols: int = 4,
                            title: str = "Most confident mistakes") -> Figure:
    """Thumbnail grid. ``images``: PIL images, paths or bytes (opened with pipeline.images)."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    n = len(images)
    if n == 0:
        fig = _new_figure(4, 1.5)
        fig.text(0.5, 0.5, "no mistakes on this split", ha="center", va="center")
        return fig
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = _new_figure(2.4 * ncols, 2.7 * nrows + 0.4)
    for i, (item, cap) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        try:
            ax.imshow(_load_thumbnail(item))
        except Exception as e:  # show the failure in the tile instead of losing the whole grid
            ax.text(0.5, 0.5, f"cannot open:\n{type(e).__name__}", ha="center", va="center",
                    fontsize=7, transform=ax.transAxes, wrap=True)
        ax.set_title(str(cap), fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def hardest_captions(examples: Sequence[Mapping[str, Any]]) -> list[str]:
    """Captions for `hardest_examples` output: 'true → predicted (confidence)'."""
    return [f"{e['true']} \u2192 {e['predicted']} ({e['confidence']:.2f})" for e in examples]


# ----------------------------------------------------------------------------- selection plot

def pareto_figure(candidates: Sequence[Candidate], *, metric_name: str = "balanced_accuracy",
                  latency_key: str = "latency_ms_b1", winner: str | None = None,
                  title: str | None = None, label_points: bool = True) -> Figure:
    """Selection metric vs latency (log x) for all candidates, coloured by family, with the
    Pareto frontier and CI error bars. ``winner`` (a candidate name) is starred."""
    pts = [c for c in candidates
           if c.metric is not None and getattr(c, latency_key) is not None
           and not math.isnan(float(c.metric))]
    skipped = len(candidates) - len(pts)
    fig = _new_figure(8.0, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    families = sorted({c.family for c in pts})
    cmap = matplotlib.colormaps["tab10" if len(families) <= 10 else "tab20"]
    colour = {f: cmap(i % cmap.N) for i, f in enumerate(families)}
    for fam in families:
        fc = [c for c in pts if c.family == fam]
        x = np.array([float(getattr(c, latency_key)) for c in fc])
        y = np.array([float(c.metric) for c in fc])
        lo = np.array([float(c.ci_low) if c.ci_low is not None else v for c, v in zip(fc, y)])
        hi = np.array([float(c.ci_high) if c.ci_high is not None else v for c, v in zip(fc, y)])
        ax.errorbar(x, y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)], fmt="o",
                    color=colour[fam], ecolor=colour[fam], alpha=0.85, capsize=3, label=fam)
    front = pareto_front(pts, latency_key=latency_key)
    if front:
        fx = [float(getattr(c, latency_key)) for c in front]
        fy = [float(c.metric) for c in front]
        ax.plot(fx, fy, drawstyle="steps-post", color="black", lw=1.2, alpha=0.7,
                label="Pareto frontier")
    for c in pts:
        x, y = float(getattr(c, latency_key)), float(c.metric)
        if winner is not None and c.name == winner:
            ax.scatter([x], [y], marker="*", s=320, facecolor="gold", edgecolor="black",
                       zorder=5, label=f"winner: {c.name}")
        if label_points:
            ax.annotate(c.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if pts:
        ax.set_xscale("log")
    ax.set_xlabel(f"latency, ms per image ({latency_key.replace('latency_ms_', '')}, log scale)")
    ax.set_ylabel(metric_name)
    ax.grid(True, which="both", alpha=0.3)
    if pts:
        ax.legend(fontsize=8, loc="lower right")
    t = title or f"{metric_name} vs latency"
    if skipped:
        t += f"  ({skipped} without metric/latency not shown)"
    ax.set_title(t)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- tables / HTML

def per_class_csv(report: EvalReport) -> str:
    """Per-class precision / recall / F1 / support as CSV text (header included)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "precision", "recall", "f1", "support"])
    for row in report.per_class:
        w.writerow([row["class"], f"{row['precision']:.6f}", f"{row['recall']:.6f}",
                    f"{row['f1']:.6f}", int(row["support"])])
    return buf.getvalue()


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else (f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}")
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(x) for x in v)
    return str(v)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
           css_class: str = "") -> str:
    if not rows:
        return "<p><em>none</em></p>"
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows)
    cls = f' class="{css_class}"' if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card_html(card: Mapping[str, Any], max_listed: int = 200) -> str:
    if not card:
        return "<p><em>no dataset card</em></p>"
    out = []
    facts = [("name", card.get("name")), ("source", card.get("source")),
             ("source kind", card.get("source_kind")), ("dataset hash", card.get("dataset_hash")),
             ("classes", len(card.get("classes") or [])),
             ("imbalance ratio (largest / smallest class)", card.get("imbalance_ratio")),
             ("split strategy", card.get("split_strategy")), ("seed", card.get("seed")),
             ("fractions", card.get("fractions")),
             ("excluded files", len(card.get("excluded") or [])),
             ("duplicate groups", len(card.get("duplicates") or [])),
             ("label conflicts", len(card.get("label_conflicts") or []))]
    def fact(v: Any) -> str:
        if isinstance(v, Mapping):
            return ", ".join(f"{a}={_cell(b)}" for a, b in v.items())
        return _cell(v)

    out.append("<table class='facts'><tbody>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(fact(v))}</td></tr>"
        for k, v in facts if v is not None) + "</tbody></table>")
    counts: Mapping[str, Mapping[str, int]] = card.get("counts") or {}
    if counts:
        splits = [s for s in ("train", "val", "test") if s in counts] + \
                 [s for s in counts if s not in ("train", "val", "test")]
        classes = list(card.get("classes") or [])
        for s in splits:
            for c in counts[s]:
                if c not in classes:
                    classes.append(c)
        rows = []
        for c in classes:
            r: dict[str, Any] = {"class": c}
            for s in splits:
                r[s] = int(counts[s].get(c, 0))
            r["total"] = sum(r[s] for s in splits)
            rows.append(r)
        total = {"class": "total", **{s: sum(int(v) for v in counts[s].values()) for s in splits}}
        total["total"] = sum(total[s] for s in splits)
        rows.append(total)
        out.append("<h3>Images per class and split</h3>")
        out.append(_table(rows, ["class", *splits, "total"], "counts"))
    excluded = list(card.get("excluded") or [])
    out.append(f"<h3>Excluded files ({len(excluded)})</h3>")
    if excluded:
        shown = [e if isinstance(e, Mapping) else {"path": str(e)} for e in excluded[:max_listed]]
        out.append(_table(shown, ["path", "code", "reason"]))
        if len(excluded) > max_listed:
            out.append(f"<p>… and {len(excluded) - max_listed} more (see dataset_card.json)</p>")
    else:
        out.append("<p>none</p>")
    for key, label in (("duplicates", "Duplicate groups"), ("label_conflicts", "Label conflicts")):
        groups = list(card.get(key) or [])
        if groups:
            out.append(f"<h3>{label} ({len(groups)})</h3><ul>" + "".join(
                f"<li>{html.escape(', '.join(map(str, g)))}</li>" for g in groups[:max_listed])
                + "</ul>")
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
thead th{background:#f3f3f3} table.facts th{background:#fafafa;font-weight:600}
td{font-variant-numeric:tabular-nums} figure{margin:1em 0} img{max-width:100%;height:auto}
.note{background:#f6f8fa;border-left:4px solid #4C72B0;padding:.6em 1em;white-space:pre-wrap}
"""


def report_html(leaderboard_rows: Sequence[Mapping[str, Any]], card_dict: Mapping[str, Any] | None,
                figures: Mapping[str, bytes], *, title: str = "tlpipe report",
                notes: str | None = None) -> str:
    """A single self-contained HTML page: leaderboard, dataset card summary, embedded figures.

    ``figures`` maps a heading to PNG bytes (see `png_bytes`); images are base64-embedded, no
    external assets are referenced. ``notes`` (e.g. the selection's ``why``) is shown verbatim.
    """
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if notes:
        parts.append(f"<div class='note'>{html.escape(notes)}</div>")
    parts.append(f"<h2>Leaderboard ({len(leaderboard_rows)})</h2>")
    parts.append(_table(list(leaderboard_rows), css_class="leaderboard"))
    parts.append("<h2>Dataset</h2>")
    parts.append(_card_html(card_dict or {}))
    if figures:
        parts.append("<h2>Figures</h2>")
        for name, data in figures.items():
            if not isinstance(data, (bytes, bytearray)) or not bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
                raise ValueError(f"figure {name!r} is not PNG bytes; render it with png_bytes(fig)")
            b64 = base64.b64encode(bytes(data)).decode("ascii")
            parts.append(f"<figure><figcaption><h3>{html.escape(str(name))}</h3></figcaption>"
                         f"<img alt='{html.escape(str(name), quote=True)}' "
                         f"src='data:image/png;base64,{b64}'></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
