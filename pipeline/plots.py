"""The sweep's Pareto plot and the self-contained HTML report for an evaluation / selection
(per-candidate figures: `pipeline.charts`).

Uses matplotlib's object API with the Agg canvas only: no pyplot, so no global figure state and
no backend switching. `pareto_figure` returns a `matplotlib.figure.Figure`; `save_png` writes
one to disk and `png_bytes` renders one in memory (for `report_html`).
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
from pipeline.numeric import finite_float
from pipeline.select import Candidate, pareto_front

_DPI = 110


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


# ----------------------------------------------------------------------------- selection plot

# Head -> marker shape; "*" is kept for the winner.
_HEAD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "d", "8", "H")
_LABEL_MAX = 28
_MARK_S, _STAR_S = 42, 300                       # scatter sizes, points squared
_MARK_R, _STAR_R = 0.5 * math.sqrt(_MARK_S), 0.5 * math.sqrt(_STAR_S)   # radii, points


def short_label(name: str, max_len: int = _LABEL_MAX) -> str:
    """A plot label for a candidate name (``family/arch+head``, ensembles ``a+b+head``).

    The family prefix goes first (colour already shows it); if that is not enough, the part of
    the architecture that repeats the family (``tf_efficientnet_lite0`` -> ``lite0``), then the
    pretrained tags; anything still too long is cut in the middle.
    """
    parts = [p.partition("/") for p in str(name).split("+")]
    stripped = [(fam if sep else "", rest if sep and rest else fam) for fam, sep, rest in parts]
    out = "+".join(p for _, p in stripped)
    if len(out) > max_len:
        shorter = []
        for fam, p in stripped:
            key = f"{fam}_" if fam else ""
            if key and key in p and p.split(key, 1)[1]:
                p = p.split(key, 1)[1]
            shorter.append(p)
        out = "+".join(shorter)
    if len(out) > max_len:  # pretrained tags (``.in1k``) matter least once names are this long
        out = "+".join(p.split(".", 1)[0] or p for p in out.split("+"))
    if len(out) > max_len:
        keep = max_len - 1
        out = out[: (keep + 1) // 2] + "\u2026" + out[len(out) - keep // 2:]
    return out


def _tick_ms(v: float, _pos: Any = None) -> str:
    """Plain millisecond tick text: '0', '2.5', '1,200' (never 1e3 or an offset)."""
    if abs(v) < 1e-9:
        return "0"
    return f"{v:,.3f}".rstrip("0").rstrip(".")


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _place_labels(fig: Figure, ax: Any, items: Sequence[tuple[float, float, str, bool]],
                  markers: Sequence[tuple[float, float, float]]) -> None:
    """Annotate ``items`` (x, y, text, bold) greedily: each label takes the first nearby offset
    whose box overlaps no earlier label and no marker (``markers``: x, y, radius in points) and
    stays inside the axes, else the offset with the least overlap; offsets beyond the first ring
    get a leader line back to their point. Bold items sit beside the big winner star."""
    fig.canvas.draw()  # settles the layout, so display coordinates below are final
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    axb = ax.get_window_extent(renderer)
    ax_box = (axb.x0, axb.y0, axb.x1, axb.y1)
    obstacles = []
    for x, y, r in markers:
        dx, dy = ax.transData.transform((x, y))
        obstacles.append((dx - r * px, dy - r * px, dx + r * px, dy + r * px))
    placed: list[tuple[float, float, float, float]] = []
    for x, y, text, bold in items:
        gap = _STAR_R + 1.0 if bold else _MARK_R + 1.0
        weight = "bold" if bold else "normal"
        probe = ax.text(0, 0, text, fontsize=7, fontweight=weight)
        ext = probe.get_window_extent(renderer)
        probe.remove()
        w, h = ext.width / px, ext.height / px
        ox, oy = ax.transData.transform((x, y))
        tries: list[tuple[float, float, bool]] = []
        for ring in range(6):
            lift = ring * (h + 2.0)
            far = ring > 0
            tries += [(gap, gap + lift, far), (gap, -h - gap - lift, far),
                      (-w - gap, gap + lift, far), (-w - gap, -h - gap - lift, far)]
            if ring:
                tries += [(-w / 2, gap + lift, True), (-w / 2, -h - gap - lift, True)]
        best = None
        for dx, dy, far in tries:
            box = (ox + dx * px, oy + dy * px, ox + (dx + w) * px, oy + (dy + h) * px)
            inside = _overlap(box, ax_box)
            outside = (box[2] - box[0]) * (box[3] - box[1]) - inside
            cost = 10.0 * outside + sum(_overlap(box, b) for b in placed) \
                + sum(_overlap(box, b) for b in obstacles)
            if best is None or cost < best[0]:
                best = (cost, dx, dy, far, box)
            if cost == 0:
                break
        _, dx, dy, far, box = best
        leader = dict(arrowstyle="-", lw=0.6, color="0.45", shrinkA=0, shrinkB=4) if far else None
        ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha="left",
                          va="bottom", fontsize=7, fontweight=weight, zorder=6,
                          annotation_clip=False, arrowprops=leader)
        ann.set_in_layout(False)
        placed.append(box)


def pareto_figure(candidates: Sequence[Candidate], *, metric_name: str = "balanced_accuracy",
                  latency_key: str = "latency_ms_b1", winner: str | None = None,
                  title: str | None = None, score_label: str | None = None,
                  label_points: bool = True) -> Figure:
    """Selection score vs latency for every candidate, with the Pareto frontier.

    y is the candidate's selection score (``metric``; error bar = ``metric_std``, the spread
    across folds, when known); x is milliseconds per image on a linear axis (x error bar =
    latency noise when known). Colour = backbone family, marker = head. Only frontier points
    and the ``winner`` (starred) are labelled, with shortened names placed so they do not
    overlap. Candidates without score or latency are left out and counted in the title.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    noise_key = latency_key.replace("latency_ms", "latency_noise_ms")
    pts = [c for c in candidates
           if finite_float(c.metric) is not None
           and finite_float(getattr(c, latency_key, None)) is not None]
    skipped = len(candidates) - len(pts)
    fig = _new_figure(9.5, 5.5)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(1, 1, 1)
    families = sorted({str(c.family) for c in pts})
    heads = sorted({str(c.head) for c in pts})
    cmap = matplotlib.colormaps["tab10" if len(families) <= 10 else "tab20"]
    colour = {f: cmap(i % cmap.N) for i, f in enumerate(families)}
    marker = {h: _HEAD_MARKERS[i % len(_HEAD_MARKERS)] for i, h in enumerate(heads)}

    def xy(c: Any) -> tuple[float, float]:
        return float(getattr(c, latency_key)), float(c.metric)

    for c in pts:
        x, y = xy(c)
        ystd = finite_float(getattr(c, "metric_std", None))
        xnoise = finite_float(getattr(c, noise_key, None))
        if ystd or xnoise:
            ax.errorbar([x], [y], yerr=[ystd] if ystd else None, xerr=[xnoise] if xnoise else None,
                        fmt="none", ecolor=colour[str(c.family)], alpha=0.6, capsize=2.5, lw=1,
                        zorder=2)
    for fam in families:
        for head in heads:
            group = [c for c in pts if str(c.family) == fam and str(c.head) == head]
            if group:
                ax.scatter([xy(c)[0] for c in group], [xy(c)[1] for c in group],
                           marker=marker[head], s=_MARK_S, color=colour[fam], edgecolor="white",
                           linewidth=0.6, alpha=0.9, zorder=3)
    front = pareto_front(pts, latency_key=latency_key)
    if front:
        ax.plot([xy(c)[0] for c in front], [xy(c)[1] for c in front], drawstyle="steps-post",
                color="black", lw=1.1, alpha=0.6, zorder=1)
    win = next((c for c in pts if winner is not None and c.name == winner), None)
    if win is not None:
        ax.scatter([xy(win)[0]], [xy(win)[1]], marker="*", s=_STAR_S, facecolor="gold",
                   edgecolor="black", linewidth=0.8, zorder=5)

    ax.set_xscale("linear")
    if pts:
        xmax = max(xy(c)[0] + (finite_float(getattr(c, noise_key, None)) or 0.0) for c in pts)
        ax.set_xlim(0, xmax * 1.12 if xmax > 0 else 1.0)
        ys = [xy(c)[1] for c in pts]
        pad = max(0.02, 0.08 * (max(ys) - min(ys)))
        stds = [(finite_float(getattr(c, "metric_std", None)) or 0.0) for c in pts]
        ax.set_ylim(min(y - s for y, s in zip(ys, stds)) - pad,
                    max(y + s for y, s in zip(ys, stds)) + pad)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10], min_n_ticks=3))
    ax.xaxis.set_major_formatter(FuncFormatter(_tick_ms))
    batch = latency_key.rsplit("_b", 1)[-1] if "_b" in latency_key else latency_key
    ax.set_xlabel(f"latency, ms per image (batch {batch})")
    ax.set_ylabel(score_label or f"{metric_name} (selection: cross-validation)")
    ax.grid(True, alpha=0.3)

    if pts:
        # One legend outside the axes: colour rows, then marker rows, each under a heading.
        blank = Line2D([], [], linestyle="none", marker=None)
        handles: list[Any] = [blank]
        labels = ["family (colour)"]
        for fam in families:
            handles.append(Line2D([], [], linestyle="none", marker="o", markersize=7,
                                  color=colour[fam]))
            labels.append(fam)
        handles.append(blank)
        labels.append("head (marker)")
        for head in heads:
            handles.append(Line2D([], [], linestyle="none", marker=marker[head], markersize=7,
                                  color="0.35"))
            labels.append(head)
        if front:
            handles.append(Line2D([], [], color="black", lw=1.1, alpha=0.6))
            labels.append("Pareto frontier")
        if win is not None:
            handles.append(Line2D([], [], linestyle="none", marker="*", markersize=13,
                                  markerfacecolor="gold", markeredgecolor="black"))
            labels.append("winner")
        leg = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                        borderaxespad=0.0, fontsize=7.5, frameon=False, handletextpad=0.4,
                        ncols=1 if len(labels) <= 24 else 2)
        for t in leg.get_texts():
            if t.get_text() in ("family (colour)", "head (marker)"):
                t.set_fontweight("bold")
    t = title or f"{metric_name} vs latency"
    if skipped:
        t += f"  ({skipped} without score/latency not shown)"
    ax.set_title(t, fontsize=10)

    if pts and label_points:
        chosen = list(front)
        if win is not None and win not in chosen:
            chosen.append(win)
        # The winner is placed first so that it gets the best spot.
        chosen.sort(key=lambda c: (c is not win, xy(c)[0]))
        items = [(xy(c)[0], xy(c)[1], short_label(c.name), c is win) for c in chosen]
        markers = [(*xy(c), _STAR_R if c is win else _MARK_R) for c in pts]
        _place_labels(fig, ax, items, markers)
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
    return (f"<div class='scroll'><table{cls}><thead><tr>{head}</tr></thead><tbody>{body}"
            "</tbody></table></div>")


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
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;padding:0 1.5em;
max-width:1200px;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;overflow-wrap:anywhere}
thead th{background:#f3f3f3;vertical-align:bottom}
table.facts th{background:#fafafa;font-weight:600}
td{font-variant-numeric:tabular-nums} figure{margin:1em 0} img{max-width:100%;height:auto}
table.leaderboard td.num,table.leaderboard th.num{text-align:right;white-space:nowrap}
table.leaderboard td.name{min-width:12em;max-width:26em;word-break:break-word;
overflow-wrap:anywhere}
table.leaderboard td.status{max-width:20em;word-break:break-word;font-size:12px}
table.leaderboard tr.winner td{background:#fff8d6;font-weight:600}
table.leaderboard td.star{text-align:center;color:#b8860b}
.caption{color:#555;font-size:13px;margin:.3em 0 1em}
.note{background:#f6f8fa;border-left:4px solid #4C72B0;padding:.6em 1em;white-space:pre-wrap;
overflow-wrap:anywhere}
pre.section{background:#f6f8fa;padding:.6em 1em;white-space:pre-wrap;overflow-wrap:anywhere;
font-size:12.5px}
"""

LEADERBOARD_CAPTION = ("selection score = what chose the winner (cross-validation / validation); "
                       "test score = reported once, never used for choosing")


def _f(v: Any, spec: str = ".3f") -> str:
    """A number formatted with ``spec``, '' when missing or not a number."""
    x = finite_float(v)
    return "" if x is None else format(x, spec)


def _params(v: Any) -> str:
    x = finite_float(v)
    return "" if x is None else (f"{x:.1f}" if abs(x) >= 1 else f"{x:.2f}")


def fmt_selection(row: Mapping[str, Any]) -> str:
    """Selection score '0.873 ± 0.012' of a leaderboard row. Rows of older sweeps carry only
    ``metric`` (which then is what chose the winner) and no spread."""
    score = row.get("selection_score", row.get("metric"))
    s, std = _f(score), _f(row.get("selection_std"))
    return f"{s} \u00b1 {std}" if s and std else s


def fmt_test(row: Mapping[str, Any]) -> str:
    """Test score '0.861 [0.832–0.889]' of a leaderboard row; '' when it has none."""
    s = _f(row.get("test_score"))
    lo, hi = _f(row.get("test_ci_low")), _f(row.get("test_ci_high"))
    return f"{s} [{lo}\u2013{hi}]" if s and lo and hi else s


def selection_texts(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The distinct ``selection_on`` texts of the rows, in order of first appearance."""
    seen: list[str] = []
    for r in rows:
        v = r.get("selection_on")
        if v and str(v) not in seen:
            seen.append(str(v))
    return seen


def _status(row: Mapping[str, Any]) -> str:
    status = str(row.get("status") or "")
    err = row.get("error")
    if err and str(err) not in status:
        status = f"{status}: {str(err)[:160]}" if status else str(err)[:160]
    return status


# (header, cell text, css class of the cell)
_LEADERBOARD: tuple[tuple[str, Any, str], ...] = (
    ("#", lambda r: "" if r.get("rank") is None else str(r.get("rank")), "num"),
    ("name", lambda r: str(r.get("name") or f"{r.get('backbone') or ''}+{r.get('head') or ''}"),
     "name"),
    ("kind", lambda r: str(r.get("kind") or ""), ""),
    ("selection score ± std", fmt_selection, "num"),
    ("test score [95% CI]", fmt_test, "num"),
    ("accuracy", lambda r: _f(r.get("accuracy")), "num"),
    ("macro-F1", lambda r: _f(r.get("macro_f1")), "num"),
    ("ECE", lambda r: _f(r.get("ece")), "num"),
    ("latency ms", lambda r: _f(r.get("latency_ms_b1"), ".1f"), "num"),
    ("params M", lambda r: _params(r.get("params_m")), "num"),
    ("winner", lambda r: "\u2605" if r.get("winner") else "", "star"),
    ("status", _status, "status"),
)


def _leaderboard_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The leaderboard's chosen columns, formatted; the run id and the full backbone / head
    ride along as the name's tooltip so the page stays narrow but every row stays traceable."""
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th{f' class={css!r}' if css else ''}>{html.escape(h)}</th>"
                   for h, _, css in _LEADERBOARD)
    body = []
    for r in rows:
        tip = " | ".join(f"{k}: {r[k]}" for k in ("backbone", "head", "run_id") if r.get(k))
        cells = []
        for _, cell, css in _LEADERBOARD:
            attrs = f" class='{css}'" if css else ""
            if css == "name" and tip:
                attrs += f" title='{html.escape(tip, quote=True)}'"
            cells.append(f"<td{attrs}>{html.escape(cell(r))}</td>")
        cls = " class='winner'" if r.get("winner") else ""
        body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return ("<div class='scroll'><table class='leaderboard'><thead><tr>" + head
            + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>")


def report_html(leaderboard_rows: Sequence[Mapping[str, Any]], card_dict: Mapping[str, Any] | None,
                figures: Mapping[str, bytes], *, title: str = "tlpipe report",
                notes: str | None = None,
                sections: Sequence[tuple[str, str]] = ()) -> str:
    """A single self-contained HTML page: leaderboard, sections, dataset card, embedded figures.

    The leaderboard shows a fixed set of formatted columns (see `_LEADERBOARD`); missing keys
    show blank, so rows of older sweeps render too. ``figures`` maps a heading to PNG bytes (see
    `png_bytes`); images are base64-embedded, no external assets are referenced. ``notes``
    (e.g. the selection's ``why``) and each ``sections`` entry (heading, text, e.g. the
    selection's paired differences) are shown verbatim, HTML-escaped.
    """
    rows = list(leaderboard_rows)
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if notes:
        parts.append(f"<div class='note'>{html.escape(notes)}</div>")
    parts.append(f"<h2>Leaderboard ({len(rows)})</h2>")
    parts.append(_leaderboard_html(rows))
    caption = LEADERBOARD_CAPTION
    on = selection_texts(rows)
    metric = next((str(r["selection_metric"]) for r in rows if r.get("selection_metric")), None)
    if on:
        caption += ". Selection: " + "; ".join(on)
    if metric:
        caption += f". Scores are {metric}"
    parts.append(f"<p class='caption'>{html.escape(caption)}; latency in ms per image at "
                 "batch size 1.</p>")
    for heading, text in sections:
        parts.append(f"<h2>{html.escape(str(heading))}</h2>")
        parts.append(f"<pre class='section'>{html.escape(str(text))}</pre>")
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
