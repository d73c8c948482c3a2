"""What a first `tlpipe run` prints when its output goes to a pipe (a file, a CI or job log):
no warnings from dependencies (Ray, MLflow, Ray Data, urllib3, ... — each one is fixed at its
cause or, when only informational, filtered where it is emitted), plain progress lines instead
of silence, and the next commands, which run as printed.

One real run: the `tlpipe` entry point of this environment, as a subprocess with stdout and
stderr piped, on 36 real CIFAR-10 photos (3 classes), real EfficientNet-Lite0 weights, one
head, a real embedded Ray and a real MLflow store under tmp_path.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cifar_subsets import copy_cifar_subset  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"
MODEL = "firstrun"  # the dataset folder's name

# Lines a dependency prints when it warns: logging records carry their level (Ray's
# "... WARNING file.py:85 -- ...", MLflow's "2026/01/01 10:00:00 WARNING mlflow.x: ..."),
# warnings.warn prints "path:line: SomeWarning: ...", and deprecation notices say so.
THIRD_PARTY_WARNING = re.compile(r"\bWARNING\b|\b[A-Z]\w*Warning: |\bdeprecated\b")


def tlpipe_launcher() -> list[str]:
    script = Path(sys.prefix) / "bin" / "tlpipe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.app"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cifar10_dir):
    base = tmp_path_factory.mktemp("first-run")
    data = base / MODEL
    for split in ("train", "test"):  # 3 classes x (8 train + 4 test) real photos
        (data / split).mkdir(parents=True)
    full = base / "cifar-3"
    copy_cifar_subset(cifar10_dir, full, {"train": 8, "test": 4})
    for split in ("train", "test"):
        for cls in ("airplane", "cat", "ship"):
            (full / split / cls).rename(data / split / cls)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TLPIPE_DEBUG": "", "RAY_ADDRESS": "local"}
    proc = subprocess.run([*tlpipe_launcher(), "run", MODEL, "-b", LITE0, "--heads", "centroid",
                           "--no-ensembles", "--root", "state"],
                          cwd=base, env=env, capture_output=True, text=True, timeout=600,
                          errors="backslashreplace")
    return dict(base=base, env=env, proc=proc, out=proc.stdout, err=proc.stderr)


def test_run_succeeds(first_run):
    assert first_run["proc"].returncode == 0, first_run["out"][-3000:] + first_run["err"][-3000:]


def test_no_third_party_warnings(first_run):
    lines = (first_run["out"] + first_run["err"]).splitlines()
    noisy = [line for line in lines if THIRD_PARTY_WARNING.search(line)]
    assert not noisy, "warnings reached the user:\n" + "\n".join(noisy)


def test_plain_progress_lines_in_a_pipe(first_run):
    out = first_run["out"]
    assert f"extract {LITE0}: started, 36 images" in out
    assert re.search(rf"^extract {re.escape(LITE0)}: done, 36/36 images in [\d.]+ s \([\d.]+ img/s\)$",
                     out, re.M), out
    assert "sweep: started, 1 candidates" in out
    assert re.search(r"^sweep: done, 1/1 candidates in [\d.]+ s", out, re.M), out
    assert "\x1b[" not in out  # no terminal control sequences in a log
    assert re.search(r"^thresholds: the classifier answers \d+ % of held-out images at the 90 % "
                     r"precision target", out, re.M), out


def next_commands(out: str) -> list[str]:
    """The commands of the indented "next:" block (its "# ..." lines are comments)."""
    block = out.split("\nnext:\n", 1)[1].splitlines()
    cmds = []
    for line in block:
        if not line.startswith("  "):
            break
        if not line.lstrip().startswith("#"):
            cmds.append(line.strip())
    return cmds


def test_next_commands_run_as_printed(first_run):
    cmds = next_commands(first_run["out"])
    verbs = [shlex.split(c)[1] if len(shlex.split(c)) > 1 else c for c in cmds]
    assert verbs[:4] == ["promote", "serve", "predict", "ui"], cmds
    assert all("--root state" in c for c in cmds[:4])
    promote, _serve, predict = cmds[:3]
    image = shlex.split(predict)[2]
    assert Path(first_run["base"], image).is_file() and "/test/" in image
    # promote, then predict exactly as printed, from the directory the run was started in
    for cmd, expect in ((promote, "promoted"), (predict, "predictions")):
        proc = subprocess.run(["bash", "-c", cmd], cwd=first_run["base"], env=first_run["env"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and expect in proc.stdout, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
        noisy = [line for line in (proc.stdout + proc.stderr).splitlines()
                 if THIRD_PARTY_WARNING.search(line)]
        assert not noisy, f"{cmd}:\n" + "\n".join(noisy)
