"""The sweep's self-contained report.html: leaderboard, selection reasoning, Pareto plot, the
winner's figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.sweep.leaderboard import candidates_from_rows


def selection_text(selection: Mapping[str, Any] | None) -> str:
    """The selection's paired comparisons as plain text lines (one per candidate)."""
    if not selection:
        return ""
    lines = []
    for c in selection.get("comparisons") or []:
        diff, upper = c.get("diff"), c.get("upper")
        if diff is None:
            lines.append(f"{c['name']}: no paired comparison (no predictions on shared images)")
            continue
        lines.append(
            f"{c['name']}: best − this = {100 * diff:+.2f} points (one-sided upper bound "
            f"{100 * upper:+.2f}) on {c.get('n_images')} images; cheaper beyond noise: "
            f"{'yes' if c.get('cheaper_beyond_noise') else 'no'}; equivalent within tolerance: "
            f"{'yes' if c.get('equivalent') else 'no'}"
            + (f"; dominated by {c['dominated_by']}" if c.get("dominated_by") else ""))
    return "\n".join(lines)


def write_report(sweep_dir: Path, rows: Sequence[Mapping[str, Any]], card: Mapping[str, Any],
                 selection: Mapping[str, Any] | None, selection_error: str | None,
                 skipped: Sequence[Mapping[str, str]], figures_by_name: Mapping[str, Mapping[str, bytes]],
                 *, selection_metric: str, selection_on: str, latency_key: str, title: str,
                 parent_id: str, extra_notes: Sequence[str] = ()) -> Path:
    from pipeline import plots

    figures: dict[str, bytes] = {}
    cands = candidates_from_rows(rows)
    winner = selection["winner"]["name"] if selection else None
    if cands:
        pareto = plots.png_bytes(plots.pareto_figure(
            cands, metric_name=selection_metric, latency_key=latency_key, winner=winner,
            score_label=f"{selection_metric} ({selection_on})"))
        (sweep_dir / "pareto.png").write_bytes(pareto)
        figures[f"{selection_metric} (selection) vs latency"] = pareto
    if winner and winner in figures_by_name:
        wf = figures_by_name[winner]
        for file, label in (("confusion_matrix.png", "confusion matrix"),
                            ("reliability.png", "reliability diagram"),
                            ("hardest_examples.png", "most confident mistakes")):
            if file in wf:
                figures[f"Winner ({winner}) on the test split: {label}"] = wf[file]
    notes = [selection["why"] if selection else f"No winner: {selection_error}",
             f"Selection: {selection_metric} on {selection_on}; the test split is scored once "
             "per candidate for this report and never used to choose."]
    notes.extend(extra_notes)
    failed = [r for r in rows if r["status"] != "FINISHED"]
    if failed:
        notes.append(f"{len(failed)} candidate(s) failed: " + "; ".join(
            f"{r['name']} ({r['error']})" for r in failed))
    if skipped:
        notes.append(f"{len(skipped)} skipped: " + "; ".join(
            f"{s['backbone']}+{s['head']} ({s['reason']})" for s in skipped))
    notes.append(f"MLflow sweep run: {parent_id}")
    sections = []
    reasoning = selection_text(selection)
    if reasoning:
        sections.append(("Selection reasoning (paired comparisons against the best)", reasoning))
    html = plots.report_html(list(rows), card, figures, title=f"tlpipe sweep {title}",
                             notes="\n".join(notes), sections=sections)
    path = sweep_dir / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def hardest_png_bytes(hardest: Sequence[Mapping[str, Any]]) -> bytes:
    """The most confident mistakes as one PNG grid (items need `path`)."""
    from pipeline import plots

    return plots.png_bytes(plots.hardest_examples_figure(
        [h["path"] for h in hardest], plots.hardest_captions(hardest)))
