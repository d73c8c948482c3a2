"""`tlpipe run --set HEAD.PARAM=VALUE`: parsed as JSON, checked against the head before any work,
and handed to the sweep (fine-tune recipes included)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from cli import app as cli


def test_parse_values_as_json_else_string():
    got = cli.parse_head_params(["lora.epochs=3", "lora.lr=5e-4", "lora.scale=[0.5, 1.0]",
                                 "linear.class_weight=balanced", "lora.dtype=null", "mlp.hidden=\"256\""])
    assert got == {"lora": {"epochs": 3, "lr": 5e-4, "scale": [0.5, 1.0], "dtype": None},
                   "linear": {"class_weight": "balanced"}, "mlp": {"hidden": "256"}}


@pytest.mark.parametrize("bad", ["epochs=3", "lora.epochs", ".epochs=3", "lora.=3"])
def test_parse_rejects_malformed(bad):
    with pytest.raises(typer.BadParameter, match="HEAD.PARAM=VALUE"):
        cli.parse_head_params([bad])


def test_check_accepts_known_and_rejects_unknown_params():
    cli.check_head_params(["linear", "lora"], {"linear": {"class_weight": "balanced"},
                                               "lora": {"epochs": 2, "num_workers": 2, "mixup_alpha": 0.2}})
    with pytest.raises(typer.BadParameter, match=r"lora takes no parameter \['epoch'\].*'epochs'"):
        cli.check_head_params(["lora"], {"lora": {"epoch": 2}})
    with pytest.raises(typer.BadParameter, match=r"linear takes no parameter \['lr'\]"):
        cli.check_head_params(["linear"], {"linear": {"lr": 0.1}})
    with pytest.raises(typer.BadParameter, match="not among --heads"):
        cli.check_head_params(["linear"], {"lora": {"epochs": 2}})
    cli.check_head_params(["linear", "KNN", "zero-shot", "LoRA", "full"], {})
    with pytest.raises(typer.BadParameter, match=r"unknown head 'lineer'; choose from .*'linear'.*lora / full"):
        cli.check_head_params(["lineer", "knn"], {})


def test_run_fails_before_any_work_on_an_unknown_head(tmp_path, monkeypatch):
    import jobs.run

    called = []
    monkeypatch.setattr(jobs.run, "run", lambda *a, **k: called.append(a))
    res = CliRunner().invoke(cli.app, ["run", str(tmp_path), "--heads", "linear,mpl"])
    assert res.exit_code == 2 and not called
    assert "unknown head 'mpl'" in res.output


def test_run_fails_before_any_work_on_a_bad_set(tmp_path, monkeypatch):
    import jobs.run

    called = []
    monkeypatch.setattr(jobs.run, "run", lambda *a, **k: called.append(a))
    res = CliRunner().invoke(cli.app, ["run", str(tmp_path), "--heads", "linear,lora", "--set", "lora.epoch=2"])
    assert res.exit_code == 2 and not called
    assert "lora takes no parameter" in res.output


def test_run_hands_head_params_to_the_job(tmp_path, monkeypatch):
    import jobs.run

    seen = {}

    class Stop(Exception):
        pass

    def fake_run(data, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(jobs.run, "run", fake_run)
    res = CliRunner().invoke(cli.app, ["run", str(tmp_path), "--heads", "linear,lora", "--set", "lora.epochs=2",
                                       "--set", "lora.num_workers=2", "--set", "linear.class_weight=balanced"])
    assert isinstance(res.exception, Stop), res.output
    assert seen["heads"] == ["linear", "lora"]
    assert seen["head_params"] == {"lora": {"epochs": 2, "num_workers": 2}, "linear": {"class_weight": "balanced"}}
