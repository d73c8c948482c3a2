"""The leaderboard as plain rows: ordering, display columns, CSV, and the selector's view.

Rows are ranked by the SELECTION score (out-of-fold or validation); the test-split score sits
beside it for reporting and never decides anything.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

from pipeline.numeric import finite_float

#: leaderboard columns, in order (also the keys of every row `compare` returns)
ROW_KEYS = (
    "rank", "name", "backbone", "head", "family", "kind", "status", "winner", "selection_metric",
    "selection_on", "selection_score", "selection_std", "test_score", "test_ci_low", "test_ci_high",
    "accuracy", "balanced_accuracy", "macro_f1", "top5", "ece",
    "latency_ms_b1", "latency_ms_b32", "latency_noise_ms_b1", "latency_noise_ms_b32",
    "backbone_latency_ms_b1", "head_latency_ms_b1", "params_m", "fit_seconds", "n_selection",
    "n_train", "n_test", "head_params", "run_id", "head_dir", "error",
)

#: tags and metric names a candidate's tracking run carries (written by `jobs.sweep`)
CANDIDATE_TAG = "tlpipe.candidate"
HEAD_DIR_TAG = "tlpipe.head_dir"
_TEST_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "top5", "ece")
_COST_METRICS = ("latency_ms_b1", "latency_ms_b32", "latency_noise_ms_b1", "latency_noise_ms_b32",
                 "backbone_latency_ms_b1", "head_latency_ms_b1", "params_m", "fit_seconds")

DISPLAY_COLUMNS = ("rank", "name", "kind", "status", "selection_score", "selection_std",
                   "test_score", "test_ci_low", "test_ci_high", "accuracy", "macro_f1", "ece",
                   "latency_ms_b1", "latency_ms_b32", "params_m", "winner", "run_id")


def leaderboard_row(params: Mapping[str, str], metrics: Mapping[str, float],
                    tags: Mapping[str, str], *, status: str, run_id: str, run_name: str,
                    winner: bool) -> dict[str, Any]:
    """One leaderboard row from a candidate run's params, metrics and tags (test metrics are the
    evaluation's `metric_value` / `ci_low` / `ci_high`; the selection score is its own metric)."""
    p, m, t = params, metrics, tags
    finished = status == "FINISHED"
    row = {"name": t.get(CANDIDATE_TAG) or run_name, "backbone": p.get("backbone"),
           "head": p.get("head_label") or p.get("head"), "family": p.get("family") or "",
           "kind": p.get("kind") or t.get("tlpipe.candidate_kind"), "status": status,
           "winner": winner, "selection_metric": p.get("selection_metric"),
           "selection_on": p.get("selection_on"),
           "selection_score": finite_float(m.get("selection_score")) if finished else None,
           "selection_std": finite_float(m.get("selection_std")),
           "test_score": finite_float(m.get("metric_value")) if finished else None,
           "test_ci_low": finite_float(m.get("ci_low")), "test_ci_high": finite_float(m.get("ci_high")),
           "head_params": p.get("head_params"), "run_id": run_id,
           "head_dir": t.get(HEAD_DIR_TAG), "error": t.get("tlpipe.error")}
    for k in _TEST_METRICS + _COST_METRICS:
        row[k] = finite_float(m.get(k))
    for k in ("n_selection", "n_train", "n_test"):
        v = finite_float(m.get(k) if k in m else p.get(k))
        row[k] = None if v is None else int(v)
    return {k: row.get(k) for k in ROW_KEYS}


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best selection score first (then faster, then name); failed rows last, unranked."""
    def key(r):
        m = r.get("selection_score")
        lat = r.get("latency_ms_b1")
        return (m is None, -(m or 0.0), math.inf if lat is None else lat, r.get("name") or "")

    rows = sorted(rows, key=key)
    rank = 0
    for r in rows:
        if r.get("selection_score") is not None:
            rank += 1
            r["rank"] = rank
        else:
            r["rank"] = None
    return rows


def display_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        d = {c: r.get(c) for c in DISPLAY_COLUMNS}
        d["winner"] = "\u2605" if r.get("winner") else ""
        if r.get("error"):
            d["status"] = f"{r['status']}: {r['error'][:120]}"
        out.append(d)
    return out


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_KEYS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in ROW_KEYS})
    return buf.getvalue()


def candidates_from_rows(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The selector's view of finished rows (selection score, costs; never the test score)."""
    from pipeline.select import Candidate

    return [Candidate(name=r["name"], backbone=r["backbone"], head=r["head"], family=r["family"],
                      metric=r.get("selection_score"), metric_std=r.get("selection_std"),
                      latency_ms_b1=r.get("latency_ms_b1"), latency_ms_b32=r.get("latency_ms_b32"),
                      latency_noise_ms_b1=r.get("latency_noise_ms_b1"),
                      latency_noise_ms_b32=r.get("latency_noise_ms_b32"),
                      params_m=r.get("params_m"),
                      extra={"run_id": r.get("run_id"), "kind": r.get("kind"),
                             "test_score": r.get("test_score")})
            for r in rows if r.get("status") == "FINISHED"]
