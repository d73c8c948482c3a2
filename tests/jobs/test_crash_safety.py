"""Crash safety (issue #6 item 2): SIGKILL the extraction driver and an extraction worker mid-job,
then check what a rerun sees; SIGKILL a tracked MLflow driver and check its runs end KILLED.

Real CIFAR-10 photos, real EfficientNet-Lite0 weights (96 px input, ONNX Runtime), a real local
Ray, a real sqlite MLflow store. Every process the tests start runs in its own process group and
is killed by group at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from feature_store import FeatureStore

REPO = Path(__file__).resolve().parents[2]
N_PER_CLASS = 16  # 160 images

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cifar_subsets import copy_cifar_subset  # noqa: E402


@pytest.fixture(scope="module")
def cifar_160(cifar10_dir, tmp_path_factory) -> Path:
    return copy_cifar_subset(cifar10_dir, tmp_path_factory.mktemp("cifar-160"), {"train": N_PER_CLASS})


@pytest.fixture(scope="module")
def dataset_files(cifar_160):
    from pipeline.data import load_dataset

    ds = load_dataset(cifar_160)
    return [(r.sha256, r.path) for r in ds.records]


@pytest.fixture(scope="module")
def reference(ray_local, dataset_files, small_spec, tmp_path_factory):
    """Features from one clean, uninterrupted in-process run: (fingerprint, keys, features)."""
    from jobs.extract import extract_features

    store = FeatureStore(tmp_path_factory.mktemp("reference") / "features")
    (s,) = extract_features(dataset_files, [small_spec], store=store)
    assert s.extracted == len(dataset_files) and not s.failed
    keys = sorted(k for k, _ in dataset_files)
    return s.fingerprint, keys, store.get(s.fingerprint, keys)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


class _Group:
    """Subprocesses started in their own session; whatever is left is SIGKILLed by group."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, args, log: Path) -> subprocess.Popen:
        out = open(log, "wb")
        p = subprocess.Popen(args, cwd=REPO, env=_child_env(), stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        out.close()
        self.procs.append(p)
        return p

    def cleanup(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the driver and anything it started (Ray)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def procs():
    g = _Group()
    yield g
    g.cleanup()


def _shards(features: Path) -> list[Path]:
    return sorted(features.glob("*/shard-*.parquet"))


def _check_every_shard_verifies(store: FeatureStore, fp: str) -> None:
    rep = store.verify(fp)
    assert rep.ok_shards and not rep.corrupt, rep
    assert not store.problems(fp) or all(
        why.startswith("temp") for why in store.problems(fp).values())


def test_driver_sigkill_then_rerun_computes_only_missing(reference, small_spec, cifar_160, procs,
                                                         tmp_path):
    """`python -m jobs.extract` SIGKILLed once a few shards are committed: every shard still
    verifies, the rerun extracts exactly the images the killed run had not stored, and the
    features equal a clean run's."""
    fp, keys, ref = reference
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(small_spec.to_dict()))
    root = tmp_path / "state"
    features = root / "features"
    cmd = [sys.executable, "-m", "jobs.extract", str(cifar_160), "-b", str(spec_file),
           "--root", str(root), "--shard-rows", "8", "--chunk-size", "8", "--micro-batch", "8"]

    driver = procs.start(cmd, tmp_path / "killed.log")
    deadline = time.monotonic() + 120
    while len(_shards(features)) < 3:
        assert driver.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the driver wrote no shards within 120 s"
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)  # the driver only: no handler, no cleanup runs
    driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL

    store = FeatureStore(features)
    _check_every_shard_verifies(store, fp)
    stored_after_kill = int(store.contains(fp, keys).sum())
    assert 24 <= stored_after_kill < len(keys), (
        f"the kill should land mid-job ({stored_after_kill}/{len(keys)} stored)")

    rerun = procs.start(cmd, tmp_path / "rerun.log")
    assert rerun.wait(timeout=180) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    line = [ln for ln in (tmp_path / "rerun.log").read_text().splitlines() if ln.startswith("{")][-1]
    stats = json.loads(line)
    assert stats["fingerprint"] == fp
    assert (stats["cached"], stats["extracted"], stats["failed"]) == (
        stored_after_kill, len(keys) - stored_after_kill, [])

    store = FeatureStore(features)
    _check_every_shard_verifies(store, fp)
    assert store.verify(fp).rows == len(keys)
    got = store.get(fp, keys)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def _map_workers() -> list:
    """Ray Data actor processes of THIS test session (descendants of this process only)."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "_EmbedFilesActor" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:
            continue
    return out


def test_worker_sigkill_mid_job_completes_with_identical_features(ray_local, reference,
                                                                  dataset_files, small_spec,
                                                                  tmp_path):
    """SIGKILL the extraction actor's process once it has produced a shard: Ray restarts the
    actor and retries its chunk; the job completes with every image and the same features."""
    from jobs.extract import extract_features

    fp, keys, ref = reference
    features = tmp_path / "features"
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set():
            if _shards(features):
                workers = _map_workers()
                if workers:
                    for w in workers:
                        killed.append(w.pid)
                        os.kill(w.pid, signal.SIGKILL)
                    return
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        (s,) = extract_features(dataset_files, [small_spec], store=FeatureStore(features),
                                inline_max=0, chunk_size=8, micro_batch=8, shard_rows=8)
    finally:
        stop.set()
        t.join(timeout=5)
    assert killed, "no extraction worker was found to kill before the job ended"
    assert (s.executor, s.fingerprint, s.extracted, s.failed) == ("ray-actors", fp, len(keys), [])
    store = FeatureStore(features)
    _check_every_shard_verifies(store, fp)
    np.testing.assert_allclose(store.get(fp, keys), ref, rtol=1e-5, atol=1e-5)


def _fake_embedding(key: str, dim: int) -> np.ndarray:
    return np.random.default_rng(int(key[:8], 16)).normal(size=dim).astype(np.float32)


def test_ray_failure_ray_did_not_absorb_reruns_only_missing_then_fails_clearly(
        ray_local, small_spec, tmp_path, monkeypatch, caplog):
    """A Ray system error out of the pipeline (what a lost node can surface as): the rows that
    arrived are kept, the job reruns only the rest, and after `max_attempts` it stops with one
    message saying what is missing and how to resume."""
    import hashlib

    import ray.exceptions

    import jobs.extract as extract

    dim = small_spec.embed_dim
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(40)]
    files = [(k, f"/nowhere/{k}.jpg") for k in keys]
    calls: list[list[str]] = []

    def flaky_pipeline(spec, engine, device, items, *, fail_after, **kw):
        calls.append([k for k, _ in items])
        for i in range(0, len(items), 8):
            if i >= fail_after:
                raise ray.exceptions.ActorDiedError()
            chunk = [k for k, _ in items[i:i + 8]]
            yield {"key": np.array(chunk, dtype=object),
                   "embedding": np.stack([_fake_embedding(k, dim) for k in chunk]),
                   "ok": np.ones(len(chunk), dtype=bool),
                   "error": np.array([""] * len(chunk), dtype=object)}

    # attempt 1 dies after 16 rows, attempt 2 completes
    fail = iter([16, 10**9])
    for executor in ("_run_pipeline", "_run_actor_pool"):  # the retry logic is the same for both
        monkeypatch.setattr(extract, executor, lambda *a, **kw: flaky_pipeline(*a, fail_after=next(fail), **kw))
    store = FeatureStore(tmp_path / "a")
    with caplog.at_level("WARNING", logger="jobs.extract"):
        (s,) = extract.extract_features(files, [small_spec], store=store, engine="torch",
                                        inline_max=0, shard_rows=1000)
    assert (s.extracted, s.failed) == (40, [])
    assert [len(c) for c in calls] == [40, 24] and set(calls[1]) == set(keys[16:])
    assert "attempt 2/3" in caplog.text and "ActorDiedError" in caplog.text
    np.testing.assert_array_equal(store.get(s.fingerprint, keys),
                                  np.stack([_fake_embedding(k, dim) for k in keys]))

    # every attempt dies: a clear error; what finished is stored and a rerun resumes from it
    calls.clear()
    fail = iter([8, 8])
    store = FeatureStore(tmp_path / "b")
    with pytest.raises(RuntimeError, match=r"failed 2 times on Ray .*24 image\(s\) are still "
                                           r"missing.*rerun the same command"):
        extract.extract_features(files, [small_spec], store=store, engine="torch", inline_max=0,
                                 max_attempts=2)
    assert [len(c) for c in calls] == [40, 32]
    fp = small_spec.fingerprint_for("torch", "float32")
    assert int(store.contains(fp, keys).sum()) == 16
    fail = iter([10**9])
    (s,) = extract.extract_features(files, [small_spec], store=store, engine="torch", inline_max=0)
    assert (s.cached, s.extracted) == (16, 24)


# ----------------------------------------------------------------------------- MLflow

_DRIVER = """
import sys, time
from pathlib import Path
from jobs.tracking import setup_mlflow, tracked_run
root, ready = sys.argv[1], Path(sys.argv[2])
exp = setup_mlflow(root, "crash")
with tracked_run(exp, run_name="sweep") as parent:
    with tracked_run(exp, run_name="candidate", parent_run_id=parent.info.run_id) as child:
        ready.write_text(parent.info.run_id + " " + child.info.run_id)
        time.sleep(600)
"""


def test_runs_of_a_sigkilled_driver_are_marked_killed_by_the_next_setup(tmp_path, procs,
                                                                        monkeypatch):
    import mlflow

    from jobs.tracking import (DRIVER_HOST_TAG, DRIVER_PID_TAG, DRIVER_PIDNS_TAG,
                               DRIVER_START_TAG, ERROR_TAG, REAPED_TAG, driver_tags, setup_mlflow,
                               tracking_uri_for)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "state"
    ready = tmp_path / "ready"
    driver = procs.start([sys.executable, "-c", _DRIVER, str(root), str(ready)],
                         tmp_path / "driver.log")
    deadline = time.monotonic() + 120
    while not ready.exists() or not ready.read_text().strip():
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the driver did not start its runs within 120 s"
        time.sleep(0.05)
    parent_id, child_id = ready.read_text().split()
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)

    c = mlflow.MlflowClient(tracking_uri=tracking_uri_for(root))
    for rid in (parent_id, child_id):
        run = c.get_run(rid)
        assert run.info.status == "RUNNING"  # nothing ran on the way out
        assert run.data.tags[DRIVER_PID_TAG] == str(driver.pid)

    # runs that must survive: a live driver (this process), another host, another container (pid
    # namespace) on this host; a reused pid is NOT one of them (same pid, other start token)
    exp_id = c.get_experiment_by_name("crash").experiment_id
    me = driver_tags()
    alive = c.create_run(exp_id, run_name="alive", tags=me).info.run_id
    other_host = c.create_run(exp_id, run_name="elsewhere", tags={
        **me, DRIVER_HOST_TAG: me[DRIVER_HOST_TAG] + "-other", DRIVER_PID_TAG: str(driver.pid)})
    other_ns = c.create_run(exp_id, run_name="container", tags={
        **me, DRIVER_PIDNS_TAG: "pid:[1]", DRIVER_PID_TAG: str(driver.pid)}).info.run_id
    reused = c.create_run(exp_id, run_name="reused-pid", tags={
        **me, DRIVER_START_TAG: "another-boot:1"}).info.run_id
    untagged = c.create_run(exp_id, run_name="untagged").info.run_id

    setup_mlflow(root, "crash")  # what the next `tlpipe run` does first

    for rid in (parent_id, child_id, reused):
        run = c.get_run(rid)
        assert run.info.status == "KILLED", run.info
        assert run.data.tags[REAPED_TAG] == "true"
        assert "is gone" in run.data.tags[ERROR_TAG] and run.info.end_time
    assert f"pid {driver.pid}" in c.get_run(parent_id).data.tags[ERROR_TAG]
    survivors = (alive, other_host.info.run_id, other_ns, untagged)
    for rid in survivors:
        assert c.get_run(rid).info.status == "RUNNING"
    for rid in survivors:
        c.set_terminated(rid, "FINISHED")
