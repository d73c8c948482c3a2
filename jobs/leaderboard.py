"""Sweeps read back from MLflow: the leaderboard of a sweep's candidate runs, the latest sweep,
`tlpipe compare`. The tags and kinds are the ones `jobs.sweep` writes."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from pipeline.settings import DEFAULT_EXPERIMENT
from pipeline.sweep.leaderboard import display_rows, leaderboard_row, rows_csv, sort_rows

SWEEP_KIND = "sweep"
CANDIDATE_KIND = "candidate"
WINNER_TAG = "tlpipe.winner_run_id"
WINNER_NAME_TAG = "tlpipe.winner"
WHY_TAG = "tlpipe.selection_why"
SELECTION_ERROR_TAG = "tlpipe.selection_error"


def _row_from_run(run: Any, winner_run_id: str | None) -> dict[str, Any]:
    return leaderboard_row(run.data.params, run.data.metrics, run.data.tags,
                           status=run.info.status, run_id=run.info.run_id,
                           run_name=run.info.run_name, winner=bool(winner_run_id)
                           and run.info.run_id == winner_run_id)


def leaderboard(parent_run_id: str) -> list[dict[str, Any]]:
    """Rows of one sweep (its child runs' params / metrics / tags), best selection score first."""
    from jobs.tracking import client

    c = client()
    parent = c.get_run(parent_run_id)
    winner = parent.data.tags.get(WINNER_TAG)
    runs, token = [], None
    while True:
        page = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                             max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    runs = [r for r in runs if r.data.tags.get("tlpipe.kind") == CANDIDATE_KIND]
    return sort_rows([_row_from_run(r, winner) for r in runs])


def latest_sweep_run_id(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """The most recent FINISHED sweep of `experiment` (tracking URI already set)."""
    from jobs.tracking import KIND_TAG, client

    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} here; run a sweep first")
    runs = c.search_runs([exp.experiment_id],
                         filter_string=f"tags.`{KIND_TAG}` = '{SWEEP_KIND}' and "
                                       "attributes.status = 'FINISHED'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise LookupError(f"no finished sweep in experiment {experiment!r}; run a sweep first")
    return runs[0].info.run_id


def compare(root: str | os.PathLike, sweep_run_id: str | None = None, *,
            experiment: str = DEFAULT_EXPERIMENT) -> list[dict[str, Any]]:
    """Leaderboard rows of the latest finished sweep (or `sweep_run_id`), read back from MLflow."""
    from jobs.tracking import quiet_mlflow, tracking_uri_for, use_tracking_uri

    quiet_mlflow()
    use_tracking_uri(tracking_uri_for(root))
    return leaderboard(sweep_run_id or latest_sweep_run_id(experiment))


def log_selection(parent_id: str, rows: list[dict[str, Any]], selected: Any, selection_error: str | None,
                  skipped: Sequence[Mapping[str, str]], lat_by_backbone: Mapping[str, Any]
                  ) -> tuple[dict[str, Any] | None, str | None]:
    """The selection's tags and the leaderboard's artifacts on a sweep's parent run (the rows get
    their `winner` flag); returns (the selection as a dict, the winner's run id)."""
    from jobs.tracking import format_markdown_table, log_json, log_metrics, log_table, log_tags, log_text

    winner_run_id = None
    sel_dict = selected.to_dict() if selected is not None else None
    if selected is not None:
        winner_run_id = selected.winner.extra.get("run_id")
        log_tags({WINNER_TAG: winner_run_id, WINNER_NAME_TAG: selected.winner.name,
                  WHY_TAG: selected.why}, run_id=parent_id)
        log_json(sel_dict, "selection.json", run_id=parent_id)
    else:
        log_tags({SELECTION_ERROR_TAG: selection_error}, run_id=parent_id)
    for r in rows:
        r["winner"] = bool(winner_run_id) and r["run_id"] == winner_run_id
    log_table(rows, "leaderboard.json", run_id=parent_id)
    log_text(rows_csv(rows), "leaderboard.csv", run_id=parent_id)
    log_text(format_markdown_table(display_rows(rows)), "leaderboard.md", run_id=parent_id)
    log_json(skipped, "skipped.json", run_id=parent_id)
    log_json(lat_by_backbone, "backbone_latency.json", run_id=parent_id)
    log_metrics({"n_candidates": len(rows), "n_failed": sum(r["status"] != "FINISHED" for r in rows),
                 "n_skipped": len(skipped)}, run_id=parent_id)
    return sel_dict, winner_run_id
