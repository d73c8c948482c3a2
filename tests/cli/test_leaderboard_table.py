"""`tlpipe run` / `tlpipe compare` leaderboard: selection and test scores side by side, and rows
of older sweeps (no cross-validation keys) still render."""

from __future__ import annotations

from rich.console import Console

from cli.console import leaderboard_table

NEW = [
    {"rank": 1, "name": "efficientnet/tf_efficientnet_lite0.in1k+linear", "kind": "probe",
     "backbone": "efficientnet/tf_efficientnet_lite0.in1k", "head": "linear",
     "status": "FINISHED", "winner": True, "selection_metric": "balanced_accuracy",
     "selection_on": "5-fold CV on train+val (3 409 images)", "selection_score": 0.87312,
     "selection_std": 0.0121, "test_score": 0.86104, "test_ci_low": 0.8302, "test_ci_high": 0.8891,
     "accuracy": 0.8755, "macro_f1": 0.8601, "ece": 0.0312, "latency_ms_b1": 4.234,
     "latency_ms_b32": 1.12, "params_m": 3.41, "run_id": "r1"},
    {"rank": 2, "name": "efficientnet/tf_efficientnet_lite0.in1k+efficientnet/"
     "tf_efficientnet_lite2.in1k+linear", "kind": "ensemble", "status": "FINISHED",
     "winner": False, "selection_on": "5-fold CV on train+val (3 409 images)",
     "selection_score": 0.881, "selection_std": None, "test_score": 0.85, "latency_ms_b1": 12.5,
     "params_m": 0.42},
    {"rank": None, "name": "clip/ViT-B-32.openai+knn", "status": "FAILED", "error": "boom"},
]
OLD = [  # as `tlpipe compare` reads an older sweep back from MLflow
    {"rank": 1, "name": "resnet/resnet18.a1_in1k+knn", "backbone": "resnet/resnet18.a1_in1k",
     "head": "knn", "family": "resnet", "status": "FINISHED", "winner": True,
     "selection_metric": "balanced_accuracy", "metric": 0.9, "ci_low": 0.85, "ci_high": 0.95,
     "accuracy": 0.91, "latency_ms_b1": 2.0, "params_m": 11.7},
    {"rank": None, "name": None, "backbone": "resnet/resnet50", "head": "[mlp]", "status": "FAILED"},
]


def _render(rows, width=160) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(leaderboard_table(rows, "sweep x"))
    return console.export_text()


def _cells(text: str, needle: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if needle in ln)
    return [c.strip() for c in line.strip("│ ").split("│")]


def test_new_rows_show_selection_and_test_side_by_side():
    text = _render(NEW)
    assert "selection" in text and "(5-fold CV)" in text and "test" in text
    assert "5-fold CV on train+val (3 409 images)" in text           # the caption says on what
    assert "never used for choosing" in text
    cells = _cells(text, "★ 1")
    assert cells[2:] == ["probe", "0.873 ± 0.012", "0.861 [0.830–0.889]", "0.031", "4.2", "3.4"]
    assert _cells(text, "ensemble")[3:] == ["0.881", "0.850", "", "12.5", "0.42"]
    assert "[FAILED]" in text


def test_old_rows_without_the_new_keys():
    text = _render(OLD)
    cells = _cells(text, "★ 1")
    assert cells[1] == "resnet/resnet18.a1_in1k+knn"
    assert cells[2:] == ["0.900", "", "", "2.0", "11.7"]  # metric as selection, no test score
    assert "kind" not in text                               # no row has a kind
    assert "resnet/resnet50+[mlp] [FAILED]" in text         # brackets are text, not markup


def test_fits_a_narrow_terminal():
    text = _render(NEW, width=100)
    top = next(ln for ln in text.splitlines() if ln.lstrip().startswith("┏"))
    assert top.rstrip().endswith("┓")  # not cropped: the last column is whole
    assert _cells(text, "★ 1")[-2:] == ["4.2", "3.4"]


def test_no_rows():
    assert "selection" in _render([])


def test_compare_prints_both_kinds_of_sweep(monkeypatch):
    from typer.testing import CliRunner

    import cli.app as cli
    import jobs.leaderboard

    runner = CliRunner()
    failed = [{**r, "status": "FAILED", "selection_score": None} for r in NEW]
    for rows, note in ((NEW, False), (OLD, True), (failed, False), ([], False)):
        monkeypatch.setattr(jobs.leaderboard, "compare", lambda root, sweep, _rows=rows: _rows)
        monkeypatch.setattr(cli, "console", Console(width=160, color_system=None))
        result = runner.invoke(cli.app, ["compare", "abc"])
        assert result.exit_code == 0, result.output
        assert "sweep abc" in result.output and "selection" in result.output
        assert ("no selection scores in this sweep" in result.output) is note
