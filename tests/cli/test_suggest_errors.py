"""`tlpipe suggest` says in one line what is missing: no captured traffic, no suggestions yet."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from cli.app import app


def _predictor(tmp_path):
    from pipeline.backbones import get_spec
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 16)).astype(np.float32)
    y = ["a"] * 20 + ["b"] * 20
    head = LinearProbe(weight_decays=[0.1], max_iter=20, n_threads=1).fit(X, y)
    return Predictor(get_spec("efficientnet/tf_efficientnet_lite0.in1k"), head).save(tmp_path / "model")


def test_suggest_without_captures_or_suggestions(tmp_path):
    model = _predictor(tmp_path)
    capture = tmp_path / "capture"
    args = ["--root", str(tmp_path / "state"), "--capture", str(capture)]
    res = CliRunner().invoke(app, ["suggest", str(model), *args])
    assert res.exit_code == 2 and "error: no captured images" in res.output and "--capture" in res.output
    res = CliRunner().invoke(app, ["suggest", str(model), *args, "--accept", "0", "--label", "new"])
    assert res.exit_code == 2 and "run `tlpipe suggest" in res.output
    res = CliRunner().invoke(app, ["suggest", str(model), *args, "--accept", "0", "--label", "no/slash"])
    assert res.exit_code == 2 and "invalid class name" in res.output
    res = CliRunner().invoke(app, ["suggest", str(model), *args, "--accept", "0"])
    assert res.exit_code == 2 and "--label" in res.output
