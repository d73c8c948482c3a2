"""`tlpipe run --precision/--sizes`: bad values are one `error:` line and exit 2, before any work."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.app import app


@pytest.mark.parametrize("option, value, message", [
    ("--precision", "fp32,fp16", "--precision takes fp32, int8"),
    ("--sizes", "160,big", "--sizes takes input sizes in pixels"),
    ("--sizes", "4", "--sizes takes input sizes in pixels"),
])
def test_bad_variant_options_fail_in_one_line(tmp_path, option, value, message):
    res = CliRunner().invoke(app, ["run", str(tmp_path / "no-data"), option, value, "--root", str(tmp_path / "s")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
