"""Where the feature store lives: ``$TLPIPE_FEATURES`` (a path or any fsspec URL) or
``<state root>/features``; the state root itself is a local directory and says so when given a URL.

The `memory://` filesystem lives in one process: it shows the URL wiring end to end here (put in
this process, listed by the CLI in this process) but cannot be shared between Ray workers or jobs.
A real shared store is a URL every node can open (s3://, gs://, a `file://` on a shared mount);
tests/jobs/test_tracking_server.py runs `tlpipe run` on two Ray nodes with a `file://` one.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from typer.testing import CliRunner

from feature_store import FeatureStore

FP = "lite0-test-fingerprint"


def _keys(n: int) -> list[str]:
    import hashlib

    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def test_features_root_prefers_the_environment_then_the_state_root(tmp_path, monkeypatch):
    from pipeline.settings import FEATURES_ENV, STATE_ROOT_ENV, features_root, state_root

    monkeypatch.delenv(FEATURES_ENV, raising=False)
    monkeypatch.delenv(STATE_ROOT_ENV, raising=False)
    assert features_root(tmp_path) == str(tmp_path / "features")
    assert features_root() == str(state_root() / "features") == ".tlpipe/features"
    monkeypatch.setenv(STATE_ROOT_ENV, str(tmp_path / "home"))
    assert features_root() == str(tmp_path / "home" / "features")
    monkeypatch.setenv(FEATURES_ENV, "s3://bucket/tlpipe/features")
    assert features_root(tmp_path) == "s3://bucket/tlpipe/features"  # like MLFLOW_TRACKING_URI: env wins


def test_state_root_takes_file_urls_and_refuses_other_urls_with_the_fix(tmp_path):
    from pathlib import Path

    from pipeline.settings import StateRootError, state_root

    assert state_root(tmp_path.as_uri()) == tmp_path
    assert state_root(Path(tmp_path.as_uri())) == tmp_path  # `--root file:///...` through typer's Path
    for bad in ("s3://bucket/tlpipe", Path("s3://bucket/tlpipe"), "memory://x"):
        with pytest.raises(StateRootError) as e:
            state_root(bad)
        assert "TLPIPE_FEATURES=" in str(e.value) and "MLFLOW_TRACKING_URI" in str(e.value)
    with pytest.raises(StateRootError, match="TLPIPE_FEATURES=s3://bucket/tlpipe/features"):
        state_root(Path("s3://bucket/tlpipe"))  # the hint is the URL as typed, not Path's "s3:/..."


def test_cli_uses_the_features_url_and_explains_a_url_state_root(tmp_path, monkeypatch):
    from cli.app import app

    url = f"memory://tlpipe-{uuid.uuid4().hex}/features"
    store = FeatureStore(url)
    emb = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    store.put(FP, _keys(5), emb, meta={"backbone": "lite0-test"})
    monkeypatch.setenv("TLPIPE_FEATURES", url)
    out = CliRunner().invoke(app, ["features", "ls", "--root", str(tmp_path)], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert url in out.output and "lite0-test" in out.output and FP[:10] in out.output
    assert not (tmp_path / "features").exists()
    np.testing.assert_array_equal(FeatureStore(url).get(FP, _keys(5)), emb)

    monkeypatch.delenv("TLPIPE_FEATURES")
    monkeypatch.chdir(tmp_path)  # where Path("s3://bucket/tlpipe") would have become a folder
    out = CliRunner().invoke(app, ["features", "ls", "--root", "s3://bucket/tlpipe"])
    errors = [ln for ln in out.output.splitlines() if ln.startswith("error:")]
    assert out.exit_code == 2 and len(errors) == 1, out.output
    assert "TLPIPE_FEATURES=s3://bucket/tlpipe/features" in out.output
    assert not (tmp_path / "s3:").exists()  # no local folder named after the URL
