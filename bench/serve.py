"""Serving benchmark (issue #4): tlpipe on Ray Serve vs `mlflow models serve`, one run, loopback.

The model: an EfficientNet-Lite0 @224 champion for clothing-small (LinearProbe head on real
train photos, calibrated on the validation split, support index = the train embeddings),
registered in a temporary MLflow registry. Requests: clothing-small test photos, one JPEG per
request, sent by a closed-loop load generator (1 / 4 / 16 clients, each sending its next request
when the last one answered) in this process.

Rows, side by side:
  (a) tlpipe: `deploy.app.run` (what `tlpipe serve` calls) on a fresh local Ray per configuration
      (``--configs``): tlpipe's CPU engine (OpenVINO, else ONNX Runtime) with @serve.batch, multipart JPEG; the backbone colocated in the
      ingress replica or a separate Backbone deployment; direct ingress (the ingress replica answers
      HTTP itself, the local default) or through Serve's proxy
  (b) `mlflow models serve` of the same predictor as an eager-PyTorch pyfunc (base64 JPEG in JSON)
  (c) tlpipe open-loop (Poisson arrivals) at 80 % of (a)'s peak throughput: p50 / p99
  (d) the k-NN fallback's cost with 100k support vectors (flat and HNSW): p50 ms added to a
      prediction, compared with the classifier-only path
Every closed-loop row also reports the server processes' CPU ms per request (robust against other
load on the machine) and the load generator's; the report names the best configuration.

    python -m bench.serve [--duration 20] [--clients 1,4,16] [--configs colocated+direct:2,...] [--write]

Targets: (a) peak >= 2.5x (b) peak; (c) p99 <= 250 ms; (d) HNSW p50 added <= 2 ms.

``--multi`` (issue 13 item 3) measures instead, in one run, with the first ``--configs`` entry:
three models (heads on three class subsets) on the same backbone in ONE app
(``tlpipe serve --model A --model B --model C``; the load spread over their routes), one model
alone (its peak), and three single-model apps side by side (each its own backbone), all deployed
on one Ray at once, rows interleaved in ``--rounds``. Target: three models in one app >= 90 % of
one model's peak req/s. Section ``serve-multi``.

    python -m bench.serve --multi [--rounds 3] [--duration 8] [--clients 4,16] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPEC = "efficientnet/tf_efficientnet_lite0.in1k"
MODEL_NAME = "clothing-small-bench"
TORCH_PYFUNC = '''"""Eager-PyTorch pyfunc of a tlpipe predictor (bench/serve.py baseline), models from code."""
import base64

import mlflow.pyfunc
from mlflow.models import set_model


class EagerTorchPredictor(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from pipeline.predictor import Predictor

        self.predictor = Predictor.load(context.artifacts["predictor"], engine="torch")
        _ = self.predictor.backbone  # load the weights now, not on the first request

    def predict(self, context, model_input, params=None):
        import pandas as pd

        images = [base64.b64decode(x) for x in model_input["image"]]
        preds = self.predictor.predict_images(images)
        return pd.DataFrame([{"label": p.label, "score": p.score, "decision": p.decision} for p in preds])


set_model(EagerTorchPredictor())
'''


# ---------------------------------------------------------------------------- data + model
def clothing_root(data: str | None) -> Path:
    from pipeline.archives import is_archive, unpack

    if data is None:
        shared = Path(os.environ.get("TLPIPE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
        data = str(shared / "clothing-small.tar.gz")
    return unpack(data) if is_archive(data) else Path(data)


def split_files(root: Path, split: str, per_class: int | None = None) -> list[tuple[Path, str]]:
    out = []
    for cls in sorted(p.name for p in (root / split).iterdir() if p.is_dir()):
        files = sorted((root / split / cls).glob("*.jpg"))
        out += [(f, cls) for f in (files[:per_class] if per_class else files)]
    return out


def build_champion(root: Path, state: Path, per_class: int) -> tuple[str, Path, object, np.ndarray]:
    """Fit, calibrate, save and register the champion; returns (version, predictor dir, predictor, X_test)."""
    import mlflow

    from feature_store.index import SupportIndex
    from jobs.registry import register_predictor
    from jobs.tracking import setup_mlflow
    from pipeline.backbones import get_spec, load_backbone
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor
    from pipeline.preprocess import load_pixels

    spec = get_spec(SPEC)
    backbone = load_backbone(spec, engine="auto")

    def embed(items):
        return np.concatenate([backbone.embed(np.stack([load_pixels(p, spec) for p, _ in items[i:i + 64]]))
                               for i in range(0, len(items), 64)])

    train, val, test = (split_files(root, "train", per_class), split_files(root, "validation"),
                        split_files(root, "test"))
    t0 = time.perf_counter()
    X_tr, X_val, X_te = embed(train), embed(val), embed(test)
    print(f"embedded {len(train) + len(val) + len(test)} photos in {time.perf_counter() - t0:.0f}s", flush=True)
    y_tr, y_val = [c for _, c in train], [c for _, c in val]
    head = LinearProbe(n_threads=1).fit(X_tr, y_tr, X_val, y_val)
    support = SupportIndex(X_tr.shape[1])
    support.add(X_tr, y_tr)
    predictor = Predictor(backbone.spec, head, support=support, info={"bench": "serve"})
    predictor.calibrate(X_val, y_val, target_precision=0.9)
    pdir = state / "predictor"
    predictor.save(pdir)
    exp = setup_mlflow(state, "bench-serve")
    mlflow.set_experiment(experiment_id=exp)
    version = register_predictor(pdir, MODEL_NAME, alias="champion")
    return version, pdir, predictor, X_te


def build_family(root: Path, state: Path, per_class: int, n: int = 3) -> list[str]:
    """`n` champions on the one backbone (Lite0 @224), each a LinearProbe on its own class subset
    (a window of all-but-(n-1) classes), calibrated and registered as MODEL_NAME-a, -b, ...;
    the photos are embedded once for all. Returns the registered names."""
    import mlflow

    from feature_store.index import SupportIndex
    from jobs.registry import register_predictor
    from jobs.tracking import setup_mlflow
    from pipeline.backbones import get_spec, load_backbone
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor
    from pipeline.preprocess import load_pixels

    spec = get_spec(SPEC)
    backbone = load_backbone(spec, engine="auto")

    def embed(items):
        return np.concatenate([backbone.embed(np.stack([load_pixels(p, spec) for p, _ in items[i:i + 64]]))
                               for i in range(0, len(items), 64)])

    train, val = split_files(root, "train", per_class), split_files(root, "validation")
    X_tr, X_val = embed(train), embed(val)
    y_tr, y_val = np.array([c for _, c in train]), np.array([c for _, c in val])
    classes = sorted(set(y_tr))
    exp = setup_mlflow(state, "bench-serve-multi")
    mlflow.set_experiment(experiment_id=exp)
    names = []
    for k in range(n):
        keep = classes[k:len(classes) - (n - 1) + k]
        tr, va = np.isin(y_tr, keep), np.isin(y_val, keep)
        head = LinearProbe(n_threads=1).fit(X_tr[tr], y_tr[tr], X_val[va], y_val[va])
        support = SupportIndex(X_tr.shape[1])
        support.add(X_tr[tr], y_tr[tr])
        predictor = Predictor(backbone.spec, head, support=support, info={"bench": "serve-multi", "classes": keep})
        predictor.calibrate(X_val[va], y_val[va], target_precision=0.9)
        name = f"{MODEL_NAME}-{'abcdefgh'[k]}"
        predictor.save(state / name)
        register_predictor(state / name, name, alias="champion")
        names.append(name)
    return names


def register_torch_pyfunc(pdir: Path, state: Path) -> str:
    import mlflow

    code = state / "eager_torch_pyfunc.py"
    code.write_text(TORCH_PYFUNC)
    with mlflow.start_run(run_name="eager-torch-pyfunc"):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), artifacts={"predictor": str(pdir)},
                                       registered_model_name=MODEL_NAME + "-torch", pip_requirements=["mlflow"])
    return f"models:/{MODEL_NAME}-torch/{info.registered_model_version}"


# ---------------------------------------------------------------------------- servers
def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@dataclass(frozen=True)
class ServerConfig:
    """One tlpipe server configuration: ``TOPOLOGY+INGRESS:THREADS[xPASSES]`` on the command line."""

    colocated: bool  # backbone in the ingress replica (else a separate Backbone deployment)
    direct: bool  # direct ingress: the ingress replica answers HTTP itself (else Serve's proxy)
    threads: int  # backbone engine threads (OpenVINO / ORT intra-op)
    passes: int = 1  # forward passes at once (`concurrent_batches`)

    @classmethod
    def parse(cls, text: str) -> "ServerConfig":
        layout, _, compute = text.strip().partition(":")
        topology, _, ingress = layout.partition("+")
        threads, _, passes = compute.partition("x")
        if topology not in ("colocated", "deployment") or ingress not in ("", "direct", "proxy") or \
                not (threads or "2").isdigit() or not (passes or "1").isdigit():
            raise SystemExit(f"bad --configs entry {text!r}: want "
                             "(colocated|deployment)[+(direct|proxy)][:THREADS[xPASSES]]")
        return cls(topology == "colocated", ingress != "proxy", int(threads or 2), int(passes or 1))

    @property
    def cli(self) -> str:
        return (f"{'colocated' if self.colocated else 'deployment'}+{'direct' if self.direct else 'proxy'}:"
                f"{self.threads}x{self.passes}")

    @property
    def label(self) -> str:
        return (f"tlpipe Ray Serve ({'backbone in the ingress' if self.colocated else 'Backbone deployment'}, "
                f"{'direct ingress' if self.direct else 'via Serve proxy'}, "
                f"{_engine_label()} {self.threads} thread{'s' if self.threads > 1 else ''} x {self.passes} "
                f"pass{'es' if self.passes > 1 else ''} at once)")


def _engine_label() -> str:
    from pipeline.backbones.registry import default_cpu_engine

    return {"openvino": "OpenVINO", "onnx": "ORT", "torch": "eager torch"}[default_cpu_engine()]


def start_tlpipe(state: Path, port: int, args, config: ServerConfig) -> str:
    """`deploy.app.run` (what `tlpipe serve` calls) on a fresh local Ray: its environment is per config."""
    import ray

    from deploy.app import LOCAL_RAY_ENV, direct_ingress_env, run

    if ray.is_initialized():
        ray.shutdown()
    for key in (*LOCAL_RAY_ENV, *direct_ingress_env(port)):
        os.environ.pop(key, None)  # run() sets them for this config's Ray
    run(f"{MODEL_NAME}@champion", host="127.0.0.1", port=port, name="bench", blocking=False,
        direct_ingress=config.direct, colocate_backbone=config.colocated, state_root=str(state), engine="auto",
        poll_interval_s=0, max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
        decode_threads=args.decode_threads, intra_op_num_threads=config.threads, concurrent_batches=config.passes)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", 600)
    return url


def start_apps(state: Path, port: int, args, config: ServerConfig, apps: list[tuple[str, list[str]]]) -> dict:
    """Several apps on ONE fresh local Ray, each `deploy.app.run` (what `tlpipe serve` calls) of its
    models under route prefix /NAME, each with its own backbone (colocated in its ingress). With
    direct ingress, Ray is started here with a port per app (Serve hands them out as the apps
    deploy); each app's URL is found by asking every port for its prefix. Returns {name: URL}."""
    import httpx
    import ray

    from deploy.app import INLINE_ARGS_ENV, LOCAL_RAY_ENV, direct_ingress_env, free_port, run
    from jobs.ray_runtime import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    for key in (*LOCAL_RAY_ENV, *direct_ingress_env(port)):
        os.environ.pop(key, None)
    os.environ.update({**INLINE_ARGS_ENV, **LOCAL_RAY_ENV})
    if config.direct:
        os.environ.update(direct_ingress_env(port, len(apps)))
    ensure_ray("local")
    proxy = free_port() if config.direct else port
    for name, models in apps:  # run() joins the Ray started here; the proxy listens on `proxy`
        run([f"{m}@champion" for m in models] if len(models) > 1 else f"{models[0]}@champion", host="127.0.0.1",
            port=proxy, name=name, route_prefix=f"/{name}", blocking=False, direct_ingress=False,
            colocate_backbone=config.colocated, state_root=str(state), engine="auto", poll_interval_s=0,
            ingress_options={"ray_actor_options": {"num_cpus": 0.2}},  # all apps on 2 CPUs
            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
            decode_threads=args.decode_threads, intra_op_num_threads=config.threads, concurrent_batches=config.passes)
    urls = {}
    for name, _ in apps:
        for p in ([port + i for i in range(len(apps))] if config.direct else [proxy]):
            try:
                if httpx.get(f"http://127.0.0.1:{p}/{name}/readyz", timeout=10).status_code == 200:
                    urls[name] = f"http://127.0.0.1:{p}/{name}"
                    break
            except httpx.HTTPError:
                continue
        else:
            raise RuntimeError(f"no port answers for app {name}")
    return urls


def start_mlflow(model_uri: str, tracking_uri: str, port: int, workers: int) -> subprocess.Popen:
    # mlflow execs `uvicorn` from PATH: put this interpreter's bin dir (the venv) first
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "-p", str(port), "-h", "127.0.0.1",
           "--env-manager", "local", "-w", str(workers)]
    log = open(Path(tempfile.gettempdir()) / f"bench-mlflow-serve-{port}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/ping", 600, proc)
    return proc


# ---------------------------------------------------------------------------- load generation
class HttpConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: the load generator's client.

    The generator shares the machine with the server under test, so it must be cheap: this costs
    about 0.3 ms of CPU per request where an httpx.AsyncClient costs about 4 ms (measured on the
    2-core bench machine). Both servers are driven by this same client.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                          f"Content-Length: {len(body)}\r\n{head}\r\n".encode("latin-1") + body)
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            raise
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if "content-length" in fields:
            data = await self.reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readuntil(b"\r\n")
            data = b"".join(parts)
        else:  # body until the server closes
            data = await self.reader.read()
            fields["connection"] = "close"
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def target_of(url: str) -> tuple[str, int, str]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80, u.path or "/"


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


async def closed_loop(url: str | list[str], bodies: list[tuple[bytes, dict]], clients: int, duration: float,
                      warmup: float) -> dict:
    """`clients` workers, each sending its next request as soon as the previous one answered;
    several URLs: request i goes to url i mod n (each worker keeps a connection per URL)."""
    targets = [target_of(u) for u in ([url] if isinstance(url, str) else url)]
    lat: list[float] = []
    errors = 0
    start = time.perf_counter()
    t_measure, t_end = start + warmup, start + warmup + duration
    done_in_window = answered = 0

    async def worker(k: int):
        nonlocal errors, done_in_window, answered
        conns = [HttpConnection(host, port) for host, port, _ in targets]
        i = k
        try:
            while True:
                body, headers = bodies[i % len(bodies)]
                conn, path = conns[i % len(targets)], targets[i % len(targets)][2]
                i += clients
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    status, _ = await conn.post(path, body, headers)
                except (OSError, asyncio.IncompleteReadError):
                    status = 0
                t1 = time.perf_counter()
                answered += 1
                if status != 200:
                    errors += 1
                elif t0 >= t_measure and t1 <= t_end:
                    lat.append(t1 - t0)
                    done_in_window += 1
        finally:
            for conn in conns:
                conn.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    cpu = time.process_time() - cpu0
    return {"clients": clients, "req_s": done_in_window / duration, "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3, "requests": done_in_window, "errors": errors,
            "answered": answered, "client_cpu_ms": cpu / max(1, answered) * 1e3}


async def open_loop(url: str, bodies: list[tuple[bytes, dict]], rate: float, duration: float,
                    warmup: float, seed: int = 0) -> dict:
    """Poisson arrivals at `rate` requests/s, independent of the answers (latency incl. queueing)."""
    host, port, path = target_of(url)
    rng = np.random.default_rng(seed)
    lat: list[float] = []
    errors = 0
    idle: list[HttpConnection] = []  # keep-alive pool: a connection per request in flight

    async def one(i: int, measured: bool):
        nonlocal errors
        body, headers = bodies[i % len(bodies)]
        conn = idle.pop() if idle else HttpConnection(host, port)
        t0 = time.perf_counter()
        try:
            status, _ = await conn.post(path, body, headers)
        except (OSError, asyncio.IncompleteReadError):
            status = 0
        if status != 200:
            errors += 1
        elif measured:
            lat.append(time.perf_counter() - t0)
        idle.append(conn)

    tasks, start, t, i = [], time.perf_counter(), 0.0, 0
    while t < warmup + duration:
        t += rng.exponential(1.0 / rate)
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, t >= warmup)))
        i += 1
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return {"rate": rate, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "requests": len(lat),
            "errors": errors}


def multipart_bodies(photos: list[Path]) -> list[tuple[bytes, dict]]:
    from deploy.multipart import encode_multipart

    out = []
    for p in photos:
        body, ctype = encode_multipart([("file", p.name, p.read_bytes(), "image/jpeg")])
        out.append((body, {"Content-Type": ctype}))
    return out


def mlflow_bodies(photos: list[Path]) -> list[tuple[bytes, dict]]:
    return [(json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p.read_bytes()).decode()]]}}
                        ).encode(), {"Content-Type": "application/json"}) for p in photos]


def batch_stats(url: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name in ("tlpipe_backbone_batch_images_sum", "tlpipe_backbone_batch_images_count"):
                values[s.name] = s.value
    n = values.get("tlpipe_backbone_batch_images_count", 0)
    return {"batches": int(n), "mean_images": values.get("tlpipe_backbone_batch_images_sum", 0) / n if n else 0}


# ---------------------------------------------------------------------------- fallback cost
def fallback_cost(predictor, X_test: np.ndarray, n_support: int, hnsw_threshold: int, queries: int = 300) -> list[dict]:
    """p50 / p99 ms that the k-NN fallback adds to `predict_embeddings` for one image."""
    import copy

    from feature_store.index import SupportIndex

    base = predictor.support.vectors
    labels = predictor.support.labels
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(base), n_support)
    big = base[pick] + rng.normal(scale=0.1 / np.sqrt(base.shape[1]), size=(n_support, base.shape[1])).astype(np.float32)
    q = X_test[rng.integers(0, len(X_test), queries)]
    rows = []
    flat_votes = None
    for kind, threshold in (("flat (exact)", None), ("HNSW", hnsw_threshold)):
        t0 = time.perf_counter()
        index = SupportIndex(base.shape[1], hnsw_threshold=threshold)
        index.add(big, labels[pick])
        build = time.perf_counter() - t0
        p = copy.copy(predictor)
        p.support = index
        timings = {}
        for path, thr in (("classifier", 0.0), ("fallback", 1.01)):
            p.threshold = thr
            p.predict_embeddings(q[:5])  # warm-up
            ts = []
            for x in q:
                t0 = time.perf_counter()
                p.predict_embeddings(x[None])
                ts.append(time.perf_counter() - t0)
            timings[path] = ts
        added = [f - c for f, c in zip(sorted(timings["fallback"]), sorted(timings["classifier"]))]
        _, vote_labels, _ = index.search(q, predictor.knn_k)
        if flat_votes is None:
            flat_votes = vote_labels
            agree = 1.0
        else:
            agree = float(np.mean(vote_labels[:, 0] == flat_votes[:, 0]))
        rows.append({"index": f"{kind} ({index.kind})", "vectors": f"{len(index):,}", "build_s": f"{build:.1f}",
                     "classifier-only p50 ms": f"{statistics.median(timings['classifier']) * 1e3:.3f}",
                     "with fallback p50 ms": f"{statistics.median(timings['fallback']) * 1e3:.3f}",
                     "added p50 ms": f"{statistics.median(added) * 1e3:.3f}",
                     "added p99 ms": f"{pct(added, 99) * 1e3:.3f}",
                     "top-1 neighbour = exact": f"{agree:.3f}"})
        print(rows[-1], flush=True)
        del index, p
    return rows


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="clothing-small dir or archive (default: shared data)")
    parser.add_argument("--per-class", type=int, default=60, help="train photos per class for the head")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per row")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--configs", default="colocated+direct:2x1,colocated+direct:2x2,deployment+proxy:2x1",
                        help="server configurations, one fresh local Ray each: TOPOLOGY+INGRESS:THREADS with "
                             "TOPOLOGY 'colocated' (backbone in the ingress; the `tlpipe serve` default on a CPU-only "
                             "machine) or 'deployment' (separate Backbone deployment) and INGRESS 'direct' (the "
                             "ingress replica answers HTTP; the local default) or 'proxy' (through Serve's proxy); THREADS: "
                             "backbone engine threads; PASSES: forward passes at once (concurrent_batches)")
    parser.add_argument("--mlflow-workers", type=int, default=1)
    parser.add_argument("--support", type=int, default=100_000, help="support vectors for the fallback row")
    parser.add_argument("--hnsw-threshold", type=int, default=20_000)
    parser.add_argument("--skip-mlflow", action="store_true")
    parser.add_argument("--skip-fallback", action="store_true")
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    parser.add_argument("--rounds", type=int, default=3, help="--multi: rounds of interleaved rows")
    parser.add_argument("--multi", action="store_true", help="three models on one backbone in one app vs one "
                        "model vs three single-model apps (section serve-multi; the first --configs entry)")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if args.multi:
        return multi_main(args, clients)

    from bench.report import markdown_table, write_section

    photos = [p for p, _ in split_files(clothing_root(args.data), "test")]
    state = Path(tempfile.mkdtemp(prefix="tlpipe-bench-serve-"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the temporary registry under `state`
    _version, pdir, predictor, X_test = build_champion(clothing_root(args.data), state, args.per_class)
    import mlflow

    tracking_uri = mlflow.get_tracking_uri()
    rows = []

    # (b) first, alone on the machine: mlflow models serve, eager PyTorch pyfunc
    mlflow_peak = None
    if not args.skip_mlflow:
        uri = register_torch_pyfunc(pdir, state)
        port = free_port()
        proc = start_mlflow(uri, tracking_uri, port, args.mlflow_workers)
        try:
            bodies = mlflow_bodies(photos)
            for c in clients:
                r = measured_loop(f"http://127.0.0.1:{port}/invocations", bodies, c, args)
                rows.append({"server": f"mlflow models serve (eager torch pyfunc, {args.mlflow_workers} worker)",
                             **_fmt(r)})
                print(rows[-1], flush=True)
                mlflow_peak = max(mlflow_peak or 0, r["req_s"])
        finally:
            proc.terminate()
            proc.wait(30)

    # (a) tlpipe on Ray Serve, one fresh local Ray per configuration; (c) open loop at 80 % of its peak
    import ray
    from ray import serve

    bodies = multipart_bodies(photos)
    peak, open_rows, batch_rows, configs = 0.0, [], [], []
    for config in [ServerConfig.parse(c) for c in args.configs.split(",")]:
        url = start_tlpipe(state, free_port(), args, config)
        try:
            own_peak = 0.0
            for c in clients:
                r = measured_loop(url + "/v1/predict", bodies, c, args)
                rows.append({"server": config.label, **_fmt(r)})
                print(rows[-1], flush=True)
                own_peak = max(own_peak, r["req_s"])
            batches = batch_stats(url)
            ol = asyncio.run(open_loop(url + "/v1/predict", bodies, 0.8 * own_peak, args.duration, args.warmup))
            print(ol, flush=True)
            open_rows.append({"server": config.label, "rate req/s": f"{ol['rate']:.1f}", "p50 ms": f"{ol['p50_ms']:.0f}",
                              "p99 ms": f"{ol['p99_ms']:.0f}", "requests": ol["requests"], "errors": ol["errors"],
                              "_p99": ol["p99_ms"], "_peak": own_peak})
            batch_rows.append(f"{config.label}: {batches['batches']} backbone batches, {batches['mean_images']:.2f} "
                              "images each on average")
            configs.append((own_peak, ol["p99_ms"], config))
            peak = max(peak, own_peak)
        finally:
            serve.shutdown()
            ray.shutdown()

    fb = [] if args.skip_fallback else fallback_cost(predictor, X_test, args.support, args.hnsw_threshold)

    columns = ["server", "clients", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "client CPU ms/req",
               "requests", "errors"]
    body = [markdown_table(rows, columns), ""]
    if mlflow_peak:
        ratio = peak / mlflow_peak
        body.append(f"Peak throughput: tlpipe **{peak:.1f} req/s** vs mlflow models serve **{mlflow_peak:.1f} req/s** "
                    f"= **{ratio:.2f}x** (target >= 2.5x: {'met' if ratio >= 2.5 else 'NOT met'}).")
    best = max(open_rows, key=lambda r: r["_peak"])
    best_peak, best_p99, best_config = max(configs, key=lambda x: x[0])
    cli = best_config.cli
    body.append(f"\nBest configuration: **{best_config.label}** (`--configs {cli}`): peak {best_peak:.1f} req/s, "
                f"open-loop p99 {best_p99:.0f} ms at 80 % of it.")
    print(f"BEST CONFIG: {cli} peak={best_peak:.1f} req/s p99@80%={best_p99:.0f} ms", flush=True)
    body += ["", "Open loop (Poisson arrivals) at 80 % of each configuration's closed-loop peak:", "",
             markdown_table(open_rows, ["server", "rate req/s", "p50 ms", "p99 ms", "requests", "errors"]), "",
             f"At the best configuration ({best['server']}): **p99 {best['_p99']:.0f} ms** at {best['rate req/s']} req/s "
             f"(target p99 <= 250 ms: {'met' if best['_p99'] <= 250 else 'NOT met'}).", ""]
    body.append("; ".join(batch_rows) + f" (max_batch_size {args.max_batch_size}, busy-aware batch window "
                f"up to {args.batch_wait_ms:g} ms, one replica each, {args.decode_threads} decode threads, "
                "call arguments inline up to 2 MiB).")
    body.append("\nserver CPU ms/req: CPU seconds of every server process (Ray's included) over the row, per "
                "answered request; robust against other load on the machine, unlike req/s.")
    if fb:
        body += ["", f"k-NN fallback cost at {args.support:,} support vectors (1280-d, one image per call, "
                 f"k={predictor.knn_k}; vectors: the champion's train embeddings resampled with small noise):", "",
                 markdown_table(fb, list(fb[0]))]
        hnsw_added = float(fb[-1]["added p50 ms"])
        body.append(f"\nHNSW fallback search adds **{hnsw_added:.2f} ms** p50 (target <= 2 ms: "
                    f"{'met' if hnsw_added <= 2 else 'NOT met'}).")
    body.append(f"\nModel: {SPEC} @224 + LinearProbe ({args.per_class} train photos a class), calibrated on the "
                f"validation split; requests: {len(photos)} clothing-small test photos, one JPEG per request, "
                f"closed loop over loopback HTTP, {args.duration:g} s measured per row after {args.warmup:g} s warm-up, "
                "the load generator (raw asyncio HTTP/1.1 keep-alive client, the same for both servers) on the "
                "same machine.")
    text = "\n".join(body)
    print(text)
    if args.write:
        write_section("serve", "Serving — Ray Serve vs mlflow models serve (EfficientNet-Lite0 @224)",
                      "python -m bench.serve " + " ".join(sys.argv[1:]), text)


def multi_main(args, clients: list[int]) -> None:
    """Three models on one backbone: one app vs one model's peak vs three apps side by side.

    Every setup is deployed at once on one Ray (five apps: the idle ones cost memory, not CPU) and
    the rows are interleaved in rounds, so other load on a shared machine falls on all setups alike;
    each setup's peak is the median over rounds of its best row in the round."""
    import mlflow
    import ray
    from ray import serve

    from bench.accuracy import cpu_facts, describe_cpu, load_average
    from bench.report import markdown_table, write_section

    config = ServerConfig.parse(args.configs.split(",")[0])
    photos = [p for p, _ in split_files(clothing_root(args.data), "test")]
    state = Path(tempfile.mkdtemp(prefix="tlpipe-bench-serve-multi-"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the temporary registry under `state`
    t0 = time.perf_counter()
    names = build_family(clothing_root(args.data), state, args.per_class)
    print(f"registered {names} in {time.perf_counter() - t0:.0f}s ({mlflow.get_tracking_uri()})", flush=True)
    bodies = multipart_bodies(photos)
    solo = [f"solo-{n[-1]}" for n in names]
    setups = {  # setup -> (label, apps it measures)
        "one model": ("one app, one model (`--model A`): POST /v1/predict", ["one"]),
        "three in one app": ("one app, three models on one backbone (`--model A --model B --model C`): requests "
                             "round-robin over /v1/models/{A,B,C}/predict", ["three"]),
        "three apps": ("three single-model apps side by side (each its own backbone in its ingress): requests "
                       "round-robin over the three", solo)}
    apps = [("one", [names[0]]), ("three", names)] + [(a, [n]) for a, n in zip(solo, names)]
    loads = [f"start {load_average()}"]
    urls = start_apps(state, free_port_range(len(apps)), args, config, apps)
    targets = {"one model": urls["one"] + "/v1/predict",
               "three in one app": [urls["three"] + f"/v1/models/{n}/predict" for n in names],
               "three apps": [urls[a] + "/v1/predict" for a in solo]}
    rss = {key: sum(app_rss_mib(a) for a in app_names) for key, (_, app_names) in setups.items()}
    rows, best = [], {key: [] for key in setups}
    try:
        for k in range(args.rounds):
            round_best = dict.fromkeys(setups, 0.0)
            for c in clients:
                for key, (label, _) in setups.items():
                    r = measured_loop(targets[key], bodies, c, args)
                    rows.append({"round": k + 1, "setup": label, **_fmt(r), "server RSS MiB": f"{rss[key]:.0f}"})
                    print(rows[-1], flush=True)
                    round_best[key] = max(round_best[key], r["req_s"])
            for key in setups:
                best[key].append(round_best[key])
            loads.append(f"after round {k + 1} {load_average()}")
    finally:
        serve.shutdown()
        ray.shutdown()

    peaks = {key: statistics.median(v) for key, v in best.items()}
    ratio, apps_ratio = peaks["three in one app"] / peaks["one model"], peaks["three apps"] / peaks["one model"]
    per_round = ", ".join(f"{a / b:.0%}" for a, b in zip(best["three in one app"], best["one model"]))
    columns = ["round", "setup", "clients", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "client CPU ms/req",
               "server RSS MiB", "requests", "errors"]
    body = [markdown_table(rows, columns), "",
            f"Peak (median over {args.rounds} rounds of each round's best row): three models in one app "
            f"**{peaks['three in one app']:.1f} req/s** = **{ratio:.0%}** of one model's **{peaks['one model']:.1f} "
            f"req/s** (per round: {per_round}; target >= 90 %: {'met' if ratio >= 0.9 else 'NOT met'}); three "
            f"single-model apps side by side **{peaks['three apps']:.1f} req/s** ({apps_ratio:.0%}) in "
            f"{rss['three apps']:.0f} MiB of replicas against {rss['three in one app']:.0f} MiB for the one app.", "",
            f"Server: {config.label}, each app its own ingress replica; max_batch_size {args.max_batch_size}, "
            f"busy-aware batch window up to {args.batch_wait_ms:g} ms, {args.decode_threads} decode threads. All five "
            "apps run on one local Ray at once and the rows alternate, so load from elsewhere falls on every setup "
            f"alike. Models: {SPEC} @224 + a LinearProbe on each of three overlapping 8-class subsets of "
            f"clothing-small ({args.per_class} train photos a class), calibrated on the validation split; requests: "
            f"{len(photos)} clothing-small test photos, one JPEG per request, closed loop over loopback HTTP, "
            f"{args.duration:g} s measured per row after {args.warmup:g} s warm-up, the load generator on the same "
            "machine. server CPU ms/req: CPU of every server process over the row per answered request; server "
            "RSS MiB: resident memory of the setup's ingress replicas (backbones included).", "",
            f"Machine: {describe_cpu(cpu_facts())}. Load average (1/5/15 min): " + "; ".join(loads)
            + " (a shared machine: req/s include other work; server CPU ms/req does not)."]
    text = "\n".join(body)
    print(text)
    if args.write:
        write_section("serve-multi", "Serving — three models on one backbone, one endpoint (EfficientNet-Lite0 @224)",
                      "python -m bench.serve " + " ".join(sys.argv[1:]), text)


def app_rss_mib(app: str) -> float:
    """Resident memory (MiB) of the Serve replicas of `app` (process title ray::ServeReplica:APP:...)."""
    import psutil

    total = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:{app}:" in " ".join(proc.cmdline()):
                total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _fmt(r: dict) -> dict:
    return {"clients": r["clients"], "req/s": f"{r['req_s']:.1f}", "p50 ms": f"{r['p50_ms']:.0f}",
            "p99 ms": f"{r['p99_ms']:.0f}", "server CPU ms/req": f"{r.get('server_cpu_ms', float('nan')):.1f}",
            "client CPU ms/req": f"{r['client_cpu_ms']:.1f}", "requests": r["requests"], "errors": r["errors"]}


def server_cpu_seconds() -> dict[int, float]:
    """CPU seconds so far of every process this one started (a local Ray's, `mlflow models serve`)."""
    import psutil

    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return out


def measured_loop(url: str | list[str], bodies, clients: int, args) -> dict:
    """`closed_loop` plus the server processes' CPU per answered request."""
    before = server_cpu_seconds()
    r = asyncio.run(closed_loop(url, bodies, clients, args.duration, args.warmup))
    after = server_cpu_seconds()
    used = sum(v - before.get(pid, 0.0) for pid, v in after.items())
    return {**r, "server_cpu_ms": used / max(1, r["answered"]) * 1e3}


def free_port() -> int:
    from deploy.app import free_port

    return free_port()


def free_port_range(n: int) -> int:
    """A port P with P .. P+n-1 all free right now (direct ingress gives app i port P+i)."""
    import socket

    for _ in range(100):
        base = free_port()
        try:
            for p in range(base, base + n):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError(f"found no {n} free consecutive ports")


if __name__ == "__main__":
    main()
