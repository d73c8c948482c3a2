"""A shared MLflow tracking server (issue #13 item 2): every command against
``MLFLOW_TRACKING_URI=http://...`` of a real `mlflow server` process whose artifacts are proxied
through it (``mlflow-artifacts:/``), used by a two-node Ray cluster.

One real `mlflow server` (sqlite backend, ``--artifacts-destination`` a temp dir,
``--serve-artifacts``), one `ray.cluster_utils.Cluster` (head + one worker node, 1 CPU each; this
process is the driver), real CIFAR-10 photos, real EfficientNet-Lite0 weights. `tlpipe run` (the
CLI) logs the sweep and its child runs, plots and the model to the server and keeps its features
in ``TLPIPE_FEATURES`` (a ``file://`` URL); `tlpipe promote` moves the alias; a task pinned to the
worker node opens ``models:/NAME@champion`` through the server and logs to the sweep's run; Ray
Serve serves the champion from the server and hot-swaps when the alias moves.

The server and the cluster are stopped by their own process ids (the server's process group).
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cifar_subsets import copy_cifar_subset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ray_nodes import NODE, add_node, cpu_used  # noqa: E402

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"
NAME = "cifar3-shared"
CLASSES = ("airplane", "cat", "ship")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_manifest() -> tuple[dict, dict]:
    """(Service, the mlflow container) of deploy/kuberay/mlflow.yaml."""
    import yaml

    docs = {d["kind"]: d for d in yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text())}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return docs["Service"], container


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


class MlflowServer:
    """`mlflow server` in its own process group (it starts a uvicorn child), stopped by that group.
    Its options are the production manifest's (deploy/kuberay/mlflow.yaml) but for the stores
    (a sqlite file and a directory instead of PostgreSQL and a bucket) and the address."""

    def __init__(self, base: Path):
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        args = _server_manifest()[1]["args"]
        self.cluster_hosts = _option(args, "--allowed-hosts")
        self.artifacts = base / "artifacts"
        self.log = open(base / "server.log", "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        # the GenAI job runner (3 more processes) is not needed to track runs and models
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        mlflow_exe = str(Path(sys.executable).parent / "mlflow")
        self.proc = subprocess.Popen(
            [mlflow_exe, "server", "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
             "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--allowed-hosts", f"127.0.0.1:{self.port},{self.cluster_hosts}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        import httpx

        deadline = time.time() + timeout_s
        while True:
            assert self.proc.poll() is None, "mlflow server exited: " + self.tail()
            try:
                if httpx.get(f"{self.uri}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "mlflow server never answered /health: " + self.tail()
            time.sleep(0.5)

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)  # the group of the server we started, nothing else
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The tracking server and a head + worker Ray cluster (started while the server boots)."""
    import mlflow
    import ray
    from ray.cluster_utils import Cluster

    from jobs.ray_runtime import ensure_ray
    from jobs.tracking import use_tracking_uri

    base = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(base)
    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    cluster = None
    previous_uri = mlflow.get_tracking_uri()
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(NODE, include_dashboard=False))
        worker = add_node(cluster)
        ensure_ray(address=cluster.address)
        server.wait_ready()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", server.uri)
            mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
            yield {"server": server, "cluster": cluster, "worker": worker}
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        server.stop()
        use_tracking_uri(previous_uri)  # not mlflow.set_tracking_uri: it would export the URI to later tests
        if was_running:
            ensure_ray(num_cpus=2)


@pytest.fixture(scope="module")
def ran(stack, cifar10_dir, tmp_path_factory):
    """`tlpipe run` (the CLI, in this process) on the cluster, logging to the server; features in
    a `file://` URL outside the state root."""
    from typer.testing import CliRunner

    from cli.app import app

    base = tmp_path_factory.mktemp("shared-run")
    full, data = copy_cifar_subset(cifar10_dir, base / "cifar10", {"train": 8, "test": 4}), base / "cifar3"
    for split in ("train", "test"):  # 3 classes x (8 train + 4 test) real photos
        for cls in CLASSES:
            (data / split).mkdir(parents=True, exist_ok=True)
            (full / split / cls).rename(data / split / cls)
    features = base / "shared" / "features"
    root = base / "state"
    worker_id = stack["worker"].node_id
    seen = {"worker_busy": False}
    stop = threading.Event()

    def watch():  # did the run's Ray work use the worker node?
        while not stop.is_set():
            try:
                seen["worker_busy"] |= cpu_used(worker_id) > 0
            except Exception:  # a status call racing shutdown: keep watching
                pass
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TLPIPE_FEATURES", features.as_uri())
            mp.setenv("TLPIPE_DEBUG", "1")  # a failure keeps its traceback
            result = CliRunner().invoke(app, ["run", str(data), "-b", LITE0, "--heads", "centroid,knn",
                                              "--no-ensembles", "--model-name", NAME, "--root", str(root)])
    finally:
        stop.set()
        t.join(10)
    seconds = time.monotonic() - t0
    assert result.exit_code == 0, result.output[-4000:] + repr(result.exception)
    return {"output": result.output, "root": root, "features": features, "data": data,
            "seconds": seconds, **seen}


def _client(stack):
    from mlflow import MlflowClient

    uri = stack["server"].uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _all_files(c, run_id, path=None) -> set[str]:
    out = set()
    for f in c.list_artifacts(run_id, path):
        out |= _all_files(c, run_id, f.path) if f.is_dir else {f.path}
    return out


@pytest.mark.slow
def test_run_logs_runs_children_plots_and_the_model_to_the_server(stack, ran, tmp_path):
    import httpx

    c = _client(stack)
    mv = c.get_model_version_by_alias(NAME, "challenger")
    assert str(mv.version) == "1"
    parent = c.get_run(mv.tags["sweep_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied, not a local path
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["tlpipe.kind"] for r in children) == ["candidate", "candidate"]
    assert all(r.info.status == "FINISHED" and "balanced_accuracy" in r.data.metrics for r in children)
    # plots come back through the server's artifact proxy
    png = Path(c.download_artifacts(parent.info.run_id, "pareto.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    child_pngs = {f for f in _all_files(c, children[0].info.run_id) if f.endswith(".png")}
    assert child_pngs, "no plot logged on the candidate run"
    plot = Path(c.download_artifacts(children[0].info.run_id, sorted(child_pngs)[0], str(tmp_path)))
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "report.html" in _all_files(c, parent.info.run_id)
    # every byte went to the server's artifact destination; nothing to the state root
    stored = {p.name for p in stack["server"].artifacts.rglob("*") if p.is_file()}
    assert {"pareto.png", "report.html", "MLmodel", "predictor.json"} <= stored
    assert not (ran["root"] / "mlartifacts").exists() and not (ran["root"] / "mlflow.db").exists()
    # the features went to TLPIPE_FEATURES, not under the state root
    assert list(ran["features"].glob("*/shard-*.parquet")) and not (ran["root"] / "features").exists()
    assert "View run" not in ran["output"]  # no MLflow link pair per run on stdout
    assert ran["worker_busy"], "no Ray work of the run was seen on the worker node"
    # the names the cluster's pods use are accepted, others refused (MLflow's DNS-rebinding guard)
    search = f"{stack['server'].uri}/api/2.0/mlflow/experiments/search"
    for host in stack["server"].cluster_hosts.split(","):
        assert httpx.post(search, json={"max_results": 1}, headers={"Host": host}).status_code == 200
    assert httpx.post(search, json={"max_results": 1}, headers={"Host": "mlflow.example.com"}).status_code >= 400
    print(f"\ntlpipe run against the server on 2 nodes: {ran['seconds']:.1f} s")


def _photos(data: Path) -> list[tuple[str, bytes]]:
    return [(cls, p.read_bytes()) for cls in CLASSES for p in sorted((data / "test" / cls).glob("*.jpg"))[:2]]


@pytest.fixture(scope="module")
def promoted(stack, ran):
    from typer.testing import CliRunner

    from cli.app import app

    result = CliRunner().invoke(app, ["promote", NAME, "--root", str(ran["root"])])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert _client(stack).get_model_version_by_alias(NAME, "champion").version == "1", result.output
    return result.output


@pytest.mark.slow
def test_a_task_on_the_worker_node_loads_the_champion_and_logs_through_the_server(stack, ran, promoted):
    import numpy as np
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from jobs.registry import predictor_path
    from pipeline.predictor import Predictor

    def on_worker(model_uri: str, images: list[str], run_id: str) -> tuple[str, list[dict]]:
        import mlflow
        import pandas as pd

        model = mlflow.pyfunc.load_model(model_uri)  # MLFLOW_TRACKING_URI from the job's env
        out = model.predict(pd.DataFrame({"image": images}))
        mlflow.MlflowClient().log_metric(run_id, "worker_check_images", len(out))
        return ray.get_runtime_context().get_node_id(), out[["label", "decision", "score"]].to_dict("records")

    c = _client(stack)
    photos = _photos(ran["data"])
    run_id = c.get_model_version(NAME, "1").tags["sweep_run_id"]
    task = ray.remote(on_worker).options(
        num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(stack["worker"].node_id, soft=False),
        runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": stack["server"].uri}})
    node_id, rows = ray.get(task.remote(f"models:/{NAME}@champion",
                                        [base64.b64encode(b).decode() for _, b in photos], run_id),
                            timeout=300)
    assert node_id == stack["worker"].node_id
    local = Predictor.load(predictor_path(NAME, "1")).predict_images([b for _, b in photos])
    assert [r["label"] for r in rows] == [p.label for p in local]
    assert [r["decision"] for r in rows] == [p.decision for p in local]
    np.testing.assert_allclose([r["score"] for r in rows], [p.score for p in local], rtol=1e-4, atol=1e-5)
    assert set(r["label"] for r in rows) <= set(CLASSES)
    assert c.get_run(run_id).data.metrics["worker_check_images"] == len(photos)


@pytest.mark.slow
def test_compare_predict_and_ui_read_the_server(stack, ran, promoted, tmp_path):
    from typer.testing import CliRunner

    from cli.app import app

    root = str(tmp_path / "another-machine")  # nothing local: everything comes from the server
    out = CliRunner().invoke(app, ["compare", "--root", root], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "centroid" in out.output and "knn" in out.output
    photos = []
    for cls in CLASSES:
        photos += sorted((ran["data"] / "test" / cls).glob("*.jpg"))[:1]
    out = CliRunner().invoke(app, ["predict", *map(str, photos), "--model", f"{NAME}@champion",
                                   "--root", root], terminal_width=200)
    assert out.exit_code == 0, out.output + repr(out.exception)
    decisions = sum(out.output.count(d) for d in ("classifier", "fallback", "abstain"))
    assert decisions == len(photos) and "error" not in out.output, out.output  # one answer per photo
    out = CliRunner().invoke(app, ["ui", "--root", root])
    assert out.exit_code == 0 and stack["server"].uri in out.output, out.output


@pytest.mark.slow
def test_serve_the_champion_from_the_server_and_hot_reload_when_it_moves(stack, ran, promoted, tmp_path):
    import httpx
    from ray import serve
    from typer.testing import CliRunner

    from cli.app import app
    from deploy.app import build_app
    from jobs.registry import predictor_path, register_predictor

    uri = stack["server"].uri
    port = _free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(f"{NAME}@champion", tracking_uri=uri, state_root=str(tmp_path / "serve-state"),
                            engine="torch", poll_interval_s=0.5, colocate_backbone=True,
                            ingress_options={"ray_actor_options": {"num_cpus": 0.1}}),
                  name="shared", route_prefix="/", blocking=False)
        (cls, photo), url = _photos(ran["data"])[0], f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=60.0) as http:
            r = http.post(f"{url}/v1/predict", files=[("file", ("a.jpg", photo, "image/jpeg"))])
            assert r.status_code == 200, r.text[:500]
            (pred,) = r.json()["predictions"]
            assert pred["model"] == f"{NAME}@1" and pred["label"] in CLASSES
            # version 2 (the same predictor, registered again as `tlpipe run` does) becomes the
            # champion: the replica sees the alias move on the server and swaps without a restart
            v2 = register_predictor(predictor_path(NAME, "1", tmp_path / "v1"), NAME,
                                    tags=_client(stack).get_model_version(NAME, "1").tags)
            result = CliRunner().invoke(app, ["promote", NAME, "--root", str(ran["root"])])
            assert result.exit_code == 0 and result.output.startswith(f"promoted {NAME} v{v2}"), result.output
            deadline = time.time() + 120
            while time.time() < deadline:
                info = http.get(f"{url}/v1/model").json()
                if info.get("version") == v2:
                    break
                time.sleep(0.5)
            assert info.get("version") == v2, info
            r = http.post(f"{url}/v1/predict", files=[("file", ("a.jpg", photo, "image/jpeg"))])
            (after,) = r.json()["predictions"]
            assert after["model"] == f"{NAME}@{v2}" and after["label"] == pred["label"]
    finally:
        serve.shutdown()


def test_an_unreachable_tracking_server_is_one_error_before_any_work(tmp_path, monkeypatch, cifar10_dir):
    """A job fails in seconds, before extraction, naming the URI and the fix (not after MLflow's
    minutes of retries, nor after hours of extraction); a serving replica's resolve likewise."""
    import ray
    from typer.testing import CliRunner

    from cli.app import app
    from deploy.model_source import ModelSource, ModelSourceError

    ray_was_up = ray.is_initialized()
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("TLPIPE_DEBUG", raising=False)
    data = copy_cifar_subset(cifar10_dir, tmp_path / "cifar10", {"train": 3, "test": 1})
    t0 = time.monotonic()
    out = CliRunner().invoke(app, ["run", str(data), "-b", LITE0, "--root", str(tmp_path / "state")])
    seconds = time.monotonic() - t0
    errors = [ln for ln in out.output.splitlines() if ln.startswith("error:")]
    assert out.exit_code == 2 and len(errors) == 1, out.output[-3000:]
    assert f"cannot reach the MLflow tracking server at {uri}" in errors[0]
    assert "unset MLFLOW_TRACKING_URI" in out.output and "Traceback" not in out.output
    assert seconds < 30 and not (tmp_path / "state" / "features").exists()  # nothing extracted
    assert ray.is_initialized() == ray_was_up  # and no Ray started for it
    # `tlpipe serve` resolves the model before Ray starts, and a replica's alias poll likewise
    out = CliRunner().invoke(app, ["serve", "--model", f"{NAME}@champion", "--root", str(tmp_path / "state"),
                                   "--port", str(_free_port())])
    errors = [ln for ln in out.output.splitlines() if ln.startswith("error:")]
    assert out.exit_code == 2 and len(errors) == 1, out.output[-3000:]
    assert "cannot reach the MLflow tracking server" in errors[0]
    source = ModelSource(f"{NAME}@champion", tracking_uri=uri, cache_dir=tmp_path / "cache")
    with pytest.raises(ModelSourceError, match="cannot reach the MLflow tracking server"):
        source.resolve()


def test_production_manifests_wire_jobs_and_serving_to_the_tracking_server():
    """deploy/kuberay: the server runs real `mlflow server` options with proxied artifacts in a
    bucket and its store from a Secret; every Ray pod's MLFLOW_TRACKING_URI is a name the server
    accepts on its Service port; jobs keep features in an object store; Ray token auth is on."""
    from urllib.parse import urlparse

    import mlflow
    import yaml
    from fsspec.registry import known_implementations
    from mlflow.cli import server as server_command

    service, container = _server_manifest()
    assert container["image"].endswith(":" + mlflow.__version__), "server image != MLflow in uv.lock"
    args = container["args"]
    known = {o for p in server_command.params for o in p.opts}
    assert {a for a in args if a.startswith("--")} <= known
    assert "--serve-artifacts" in args and urlparse(_option(args, "--artifacts-destination")).scheme in ("s3", "gs")
    env = {e["name"]: e for e in container["env"]}
    store_var = _option(args, "--backend-store-uri")
    assert store_var.startswith("$(") and "secretKeyRef" in env[store_var[2:-1]]["valueFrom"]
    port = int(_option(args, "--port"))
    assert service["spec"]["ports"][0]["targetPort"] == port
    allowed = set(_option(args, "--allowed-hosts").split(","))
    for name, spec_key in (("rayjob.yaml", "rayClusterSpec"), ("rayservice.yaml", "rayClusterConfig")):
        cluster = yaml.safe_load((KUBERAY / name).read_text())["spec"][spec_key]
        assert cluster["authOptions"]["mode"] == "token", name
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            for c in group["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c["env"]}
                uri = urlparse(env["MLFLOW_TRACKING_URI"])
                assert uri.port == service["spec"]["ports"][0]["port"] and uri.netloc in allowed, (name, uri)
                assert uri.hostname.split(".")[0] == service["metadata"]["name"]
                if name == "rayjob.yaml":
                    protocol = urlparse(env["TLPIPE_FEATURES"]).scheme
                    assert protocol in known_implementations and protocol != "file"


def test_submit_forwards_the_shared_locations_and_keeps_url_roots():
    from jobs.submit import FORWARDED_ENV, run_entrypoint

    assert {"MLFLOW_TRACKING_URI", "TLPIPE_FEATURES", "TLPIPE_HOME"} <= set(FORWARDED_ENV)
    assert run_entrypoint("/data/set", ["--root", "file:///mnt/state"]) == \
        "tlpipe run /data/set --root file:///mnt/state"  # not made "absolute" into <cwd>/file:/...
