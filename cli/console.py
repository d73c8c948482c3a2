"""What every `tlpipe` command shares: the console, the state root option, one-line errors,
dataset loading, and the tables and messages printed by several commands (run, compare, demo)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline import settings


def _console() -> Console:
    """Wide tables when output is not a terminal (CI logs, pipes), the terminal's width otherwise."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


console = _console()

RootOpt = typer.Option(None, "--root", help="State root (default $TLPIPE_HOME or ./.tlpipe).")


def state_root(root: Optional[Path]) -> Path:
    return settings.state_root(root)


def fail(msg: str, code: int = 2) -> None:
    """One line on stderr (never wrapped, never read as rich markup: it quotes file names) and
    exit `code`."""
    from rich.text import Text

    line = " ".join(str(msg).split())  # exception texts may carry newlines
    Console(stderr=True, soft_wrap=True, highlight=False).print(Text.assemble(("error: ", "bold red"), line))
    raise typer.Exit(code)


def clean_errors(command):
    """Turn tlpipe's own "cannot do this, here is why" errors into one `error:` line and exit 2
    instead of a traceback (TLPIPE_DEBUG=1 keeps the traceback). Bugs still raise."""
    import functools

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            from pipeline.archives import ArchiveError
            from pipeline.backbones import UnknownBackboneError, WeightsUnavailableError
            from pipeline.data import DatasetError
            from jobs.mlflow_setup import TrackingServerError
            from pipeline.select import NoEligibleCandidateError
            from pipeline.settings import StateRootError

            known = (DatasetError, ArchiveError, UnknownBackboneError, WeightsUnavailableError,
                     NoEligibleCandidateError, FileNotFoundError, PermissionError,
                     TrackingServerError, StateRootError)
            if not isinstance(exc, known) or os.environ.get("TLPIPE_DEBUG"):
                raise
            fail(str(exc) or type(exc).__name__)

    return wrapper


def load_dataset_arg(data: str, seed: int, max_pixels: Optional[int]):
    """The dataset (unpacked first if an archive); its errors reach `clean_errors`."""
    from pipeline.archives import is_archive, unpack
    from pipeline.data import load_dataset
    from pipeline.images import DEFAULT_MAX_PIXELS

    if is_archive(data):
        data = str(unpack(data))
    return load_dataset(data, seed=seed, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)


# how `pipeline.backbones.weights_available` words "the weights are simply not here"
_WEIGHTS_NOT_HERE = ("are not on this machine", "are not installed")


def skipped_backbone_lines(skipped: list[dict]) -> list[str]:
    """What `tlpipe run` says of the default backbones it left out: one line naming those whose
    weights are simply not on this machine (each one's fix is in `tlpipe backbones show NAME`,
    the full reasons in the run's `skipped_backbones.json`), then any other cause in full."""
    absent = [s["backbone"] for s in skipped if any(m in s["reason"] for m in _WEIGHTS_NOT_HERE)]
    lines = [f"[yellow]skipped[/] {s['backbone']}: {s['reason']}" for s in skipped if s["backbone"] not in absent]
    if absent:
        lines.insert(0, f"[yellow]skipped[/] {len(absent)} backbone(s) whose weights are not on this machine: "
                        f"{', '.join(absent)}. `tlpipe backbones show NAME` says how to add one; "
                        "`--backbones DIR` takes a weights folder directly")
    return lines


def stats_table(stats) -> Table:
    table = Table(title="feature extraction")
    for col in ("backbone", "engine", "images", "cached", "extracted", "failed", "seconds", "img/s"):
        table.add_column(col, justify="left" if col in ("backbone", "engine") else "right")
    for s in stats:
        table.add_row(s.backbone, s.engine, str(s.requested), str(s.cached), str(s.extracted),
                      str(len(s.failed)), f"{s.seconds:.1f}", f"{s.images_per_s:.1f}")
    return table


def leaderboard_table(rows: list[dict], title: str = "leaderboard") -> Table:
    """The sweep's leaderboard: the selection score (what chose the winner) and the test score
    (reported, never used for choosing) side by side, with cost. Keys a row lacks (sweeps logged
    before cross-validation) show blank; such rows' ``metric`` stands in as the selection score."""
    import math

    from rich.text import Text

    def num(v):
        try:
            x = float(v)
        except (TypeError, ValueError):
            return None
        return None if math.isnan(x) or math.isinf(x) else x

    def fmt(v, spec=".3f"):
        x = num(v)
        return "" if x is None else format(x, spec)

    def selection(r):
        s, std = fmt(r.get("selection_score", r.get("metric"))), fmt(r.get("selection_std"))
        return f"{s} ± {std}" if s and std else s

    def test(r):
        s, lo, hi = fmt(r.get("test_score")), fmt(r.get("test_ci_low")), fmt(r.get("test_ci_high"))
        return f"{s} [{lo}–{hi}]" if s and lo and hi else s

    def rank(r):
        return "" if r.get("rank") is None else str(r.get("rank"))

    def params(v):
        x = num(v)
        return "" if x is None else (f"{x:.1f}" if abs(x) >= 1 else f"{x:.2f}")

    on: list[str] = []
    for r in rows:
        if r.get("selection_on") and str(r["selection_on"]) not in on:
            on.append(str(r["selection_on"]))
    # "5-fold CV on train+val (3 409 images)" -> header "selection (5-fold CV)"; the full text
    # goes in the caption.
    short = on[0].split(" on ")[0].split(" (")[0].strip() if len(on) == 1 else ""
    metric = next((str(r["selection_metric"]) for r in rows if r.get("selection_metric")), "")
    caption = []
    if on:
        caption.append("selection: " + "; ".join(on) + " — chose the winner")
    if any(r.get("test_score") is not None for r in rows):
        caption.append("test: reported once, never used for choosing")
    if metric:
        caption.append(f"scores: {metric}")
    table = Table(title=title, caption=" · ".join(caption) or None)
    # Two-line headers keep the numeric columns as narrow as their numbers, "kind" only appears
    # when rows have one and a run that did not finish says so after its name: the table fits
    # a 100-column terminal. The other test-split metrics (accuracy, macro-F1, top-5) are in
    # report.html.
    show_kind = any(r.get("kind") for r in rows)

    def name(r):
        n = str(r.get("name") or f"{r.get('backbone') or ''}+{r.get('head') or ''}")
        status = r.get("status")
        return n if status in (None, "", "FINISHED") else f"{n} [{status}]"
    cols = [("#", lambda r: (f"★ {rank(r)}" if r.get("winner") else rank(r))),
            ("name", name),
            *([("kind", lambda r: str(r.get("kind") or ""))] if show_kind else []),
            (f"selection\n({short})" if short else "selection", selection),
            ("test\n[95% CI]", test),
            ("ECE", lambda r: fmt(r.get("ece"))),
            ("ms/img\nb1", lambda r: fmt(r.get("latency_ms_b1"), ".1f")),
            ("params\nM", lambda r: params(r.get("params_m")))]
    for label, _ in cols:
        if label == "name":  # the one long column: it folds rather than squeezing the numbers
            table.add_column(label, overflow="fold", min_width=16)
        elif label == "kind":
            table.add_column(label, overflow="fold")
        else:
            table.add_column(label, justify="right", overflow="fold")
    for r in rows:
        failed = r.get("status") not in (None, "", "FINISHED")
        # Text, not markup: names and statuses may hold brackets.
        table.add_row(*(Text(cell(r)) for _, cell in cols),
                      style="bold green" if r.get("winner") else ("red" if failed else None))
    return table


def print_promotion(model: str, version: Optional[str], force: bool, root: Optional[Path]) -> None:
    from jobs.registry import promote as promote_version
    from jobs.tracking import setup_mlflow

    setup_mlflow(state_root(root), settings.DEFAULT_EXPERIMENT)
    try:
        r = promote_version(model, version=version, force=force)
    except ValueError as exc:
        fail(str(exc))
    verb = "[green]promoted[/]" if r.promoted else "[yellow]not promoted[/]"
    console.print(f"{verb} {model} v{r.version} (champion was {r.previous_champion or 'none'}): {r.reason}")
