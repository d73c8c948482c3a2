"""`tlpipe submit` against a real `ray start --head` cluster with token authentication: the run
goes through Ray's Jobs API, its logs come back as plain lines, and the model is registered.

The head gets its own ports, temp dir and token; it is stopped by the process ids that belong to
it (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cifar_subsets import copy_cifar_subset  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(temp_dir: str) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


@pytest.fixture(scope="module")
def head():
    """A `ray start --head` with token auth (its own token), 2 CPUs, dashboard (Jobs API)."""
    import httpx

    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a limit
    token = secrets.token_hex(16)
    # every port its own: the suite's other Rays hold the defaults (the dashboard agent's 52365,
    # the client server's 10001), and a head whose job agent cannot bind takes no jobs
    gcs, dash, agent, agent_grpc, client, metrics, runtime_env = (_free_port() for _ in range(7))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    bin_dir = str(Path(sys.executable).parent)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=bin_dir + os.pathsep + env.get("PATH", ""), PYTHONPATH=str(REPO))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    ray_exe = str(Path(bin_dir) / "ray")
    proc = subprocess.run([ray_exe, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
                           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
                           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                           f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
                           f"--runtime-env-agent-port={runtime_env}",
                           f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                          env=env, capture_output=True, text=True, timeout=180)
    try:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:  # the Jobs API answers once the dashboard's job module is up
            try:
                r = httpx.get(f"{address}/api/version", timeout=5,
                              headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the dashboard of the `ray start` head never answered"
            time.sleep(1)
        yield dict(address=address, token=token, env=env, temp_dir=temp_dir)
    finally:
        pids = _cluster_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        while time.time() < deadline and _cluster_pids(temp_dir):
            time.sleep(0.5)
        for pid in _cluster_pids(temp_dir):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _tlpipe(args, env, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "cli.app", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_without_the_token_is_one_clear_error(head, tmp_path):
    env = {k: v for k, v in head["env"].items() if not k.startswith("RAY_AUTH")}
    proc = _tlpipe(["submit", str(tmp_path), "--address", head["address"]], env, tmp_path, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "RAY_AUTH_MODE=token" in errors[0] and "Traceback" not in proc.stderr


def test_submit_runs_tlpipe_on_the_cluster_and_registers_the_model(head, tmp_path, cifar10_dir):
    from mlflow import MlflowClient

    full, data = copy_cifar_subset(cifar10_dir, tmp_path / "cifar10", {"train": 8, "test": 4}), tmp_path / "cifar3"
    for split in ("train", "test"):  # 3 classes x (8 train + 4 test) real photos
        for cls in ("airplane", "cat", "ship"):
            (data / split).mkdir(parents=True, exist_ok=True)
            (full / split / cls).rename(data / split / cls)
    state = tmp_path / "state"
    env = {**head["env"], "TLPIPE_DEBUG": ""}
    proc = _tlpipe(["submit", str(data), "--address", head["address"], "-b", LITE0, "--heads", "centroid",
                    "--no-ensembles", "--root", str(state), "--model-name", "submitted"], env, tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    assert "submitted job " in out and out.rstrip().endswith("SUCCEEDED")
    assert "sweep: done, 1/1 candidates" in out  # the job's plain progress lines came back
    client = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    mv = client.get_model_version_by_alias("submitted", "challenger")
    assert str(mv.version) == "1" and mv.tags.get("head") == "centroid", mv.tags


def test_entrypoint_makes_local_paths_absolute_and_address_defaults(tmp_path, monkeypatch):
    from jobs.submit import DEFAULT_ADDRESS, job_address, run_entrypoint

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    cmd = run_entrypoint("data", ["-b", LITE0, "--root", "state", "--heads", "linear"])
    assert cmd == (f"tlpipe run {tmp_path / 'data'} -b {LITE0} --root {tmp_path / 'state'} "
                   "--heads linear")
    assert run_entrypoint("s3://bucket/set", []) == "tlpipe run s3://bucket/set"  # not local: as given
    (tmp_path / "my-clip").mkdir()  # a checkpoint folder among backbone names
    assert run_entrypoint("data", ["--backbones", f"my-clip,{LITE0}"]) == (
        f"tlpipe run {tmp_path / 'data'} --backbones {tmp_path / 'my-clip'},{LITE0}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert job_address() == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # a GCS address is not the Jobs API
    assert job_address() == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert job_address() == "http://head:8265" and job_address("http://x:1") == "http://x:1"
