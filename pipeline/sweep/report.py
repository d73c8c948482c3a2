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
    from pipeline import charts

    return charts.hardest_examples_png([h["path"] for h in hardest], charts.hardest_captions(hardest))


def calibration_section(calibration: Mapping[str, Any]) -> str:
    """HTML: what the deployed thresholds promise (out-of-fold) and deliver (test split)."""
    import html as html_lib

    test = calibration.get("test") or {}

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * float(v):.1f} %"

    rows = [("target precision of classifier decisions", pct(calibration.get("target_precision"))),
            ("confidence threshold", f"{calibration.get('threshold', float('nan')):.4f}"),
            ("fallback (k-NN vote) threshold", f"{calibration.get('knn_threshold', float('nan')):.4f}"),
            ("calibrated on", f"{calibration.get('calibrated_on')} "
                              f"({calibration.get('calibration_rows')} images)"),
            ("classifier decisions out of fold", pct(calibration.get("oof_coverage"))),
            (f"test split ({test.get('n', 0)} images): classifier decisions", pct(test.get("classifier_rate"))),
            ("test split: precision of classifier decisions", pct(test.get("classifier_precision"))),
            ("test split: fallback decisions / their precision",
             f"{pct(test.get('fallback_rate'))} / {pct(test.get('fallback_precision'))}"),
            ("test split: abstentions", pct(test.get("abstain_rate")))]
    body = "".join(f"<tr><th>{html_lib.escape(k)}</th><td>{html_lib.escape(v)}</td></tr>"
                   for k, v in rows)
    return ("<h2>Deployed thresholds: what they promise and deliver</h2>"
            f"<table class='facts'><tbody>{body}</tbody></table>")


def add_section(report_path: str | Path, section_html: str) -> None:
    """Insert a section before the end of a report written by `write_report`."""
    path = Path(report_path)
    page = path.read_text(encoding="utf-8")
    cut = page.rfind("</body>")
    path.write_text(page[:cut] + section_html + page[cut:] if cut >= 0 else page + section_html,
                    encoding="utf-8")
