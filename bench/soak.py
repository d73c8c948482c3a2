"""Sustained-load soak of the serving app (issue #6 item 4), loopback, one run.

The app (`deploy.app` on a local Ray Serve, EfficientNet-Lite0 @224 ONNX champion for
clothing-small built by `bench.serve.build_champion`, with one class held out of the head) is first
driven closed-loop briefly to measure its peak throughput; then open-loop (Poisson arrivals) at
``--fraction`` of that peak (or ``--rate``) for ``--minutes``. During the run:

* at 1/3: the held-out class is added through the admin API (30 photos); photos of it that the
  champion + those examples answer by the k-NN fallback (computed in this process, same code
  path) must come back from the server as that label, decision ``fallback``;
* at 2/3: the registry alias ``champion`` moves to a new version (hot reload); the served version
  must change (seen in ``/v1/model`` and in the predictions' ``model``).

Counted: requests sent, answered, 5xx, other non-200 answers, lost (sent - answered: timeouts,
connection errors), latency p50 / p99 per minute, and the RSS of every Ray / Serve process
(proxy, replicas, controller, raylet, GCS) at start and end.

    python -m bench.soak --minutes 10 [--rate R | --fraction 0.8] [--write]

``--overhead`` measures instead what production monitoring costs (issue #17): the closed-loop
peak with monitoring and capture off, then on (drift reference, decision windows, capture of
every fallback/abstain image to a local folder), alternating for ``--rounds`` rounds on one Ray,
with traffic that includes the held-out class (so the capture really writes).

    python -m bench.soak --overhead [--peak-seconds 20] [--rounds 2] [--write]

The driver (`drive`, `SoakPlan`, `SoakEvent`, `add_class_event`, `hot_reload_event`,
`ray_processes_rss`) is shared with the CI version, tests/deploy/test_soak.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench.serve import pct

MB = 1024 * 1024


# ---------------------------------------------------------------------------- the driver
@dataclass(frozen=True)
class SoakPlan:
    """Open-loop (Poisson) traffic at `rate` requests/s for `duration_s` seconds."""

    rate: float
    duration_s: float
    window_s: float = 60.0  # latency percentiles per window of this length
    timeout_s: float = 60.0  # a request unanswered after this is lost
    seed: int = 0

    def __post_init__(self):
        if self.rate <= 0 or self.duration_s <= 0:
            raise ValueError(f"SoakPlan needs rate > 0 and duration_s > 0, got {self.rate} and {self.duration_s}")


@dataclass(frozen=True)
class SoakEvent:
    """`action()` runs in a worker thread `at_s` seconds into the run; it returns details (a dict)
    or raises when its check fails. The traffic goes on meanwhile."""

    at_s: float
    name: str
    action: Callable[[], dict]


@dataclass
class SoakResult:
    plan: SoakPlan
    sent: int = 0
    answered: int = 0
    ok: int = 0
    server_errors: int = 0  # 5xx
    other_errors: int = 0  # answered, neither 200 nor 5xx
    lost: int = 0  # sent - answered: timeouts, resets, refused connections
    stale_retries: int = 0  # requests re-sent because a pooled keep-alive connection had been closed
    error_samples: list[str] = field(default_factory=list)
    windows: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    models: list[tuple[float, str]] = field(default_factory=list)  # (time, model) when it changed
    rss: list[tuple[float, dict]] = field(default_factory=list)  # (time, {process: bytes}) samples
    elapsed_s: float = 0.0

    @property
    def events_ok(self) -> bool:
        return all(e["ok"] for e in self.events)

    def to_dict(self) -> dict:
        return {"rate": self.plan.rate, "duration_s": self.plan.duration_s, "sent": self.sent,
                "answered": self.answered, "ok": self.ok, "server_errors": self.server_errors,
                "other_errors": self.other_errors, "lost": self.lost, "stale_retries": self.stale_retries, "error_samples": self.error_samples,
                "windows": self.windows, "events": self.events, "models": self.models,
                "elapsed_s": self.elapsed_s}


async def drive(url: str, bodies: list[tuple[bytes, dict]], plan: SoakPlan, events: list[SoakEvent] = (),
                *, rss_every_s: float | None = None, log: Callable[[str], None] | None = None) -> SoakResult:
    """POST `bodies` (round robin) to `url` at Poisson arrivals; run `events` meanwhile.

    Every request is awaited to the end (answer or `plan.timeout_s`), so sent = answered + lost.
    `rss_every_s` samples `ray_processes_rss()` that often (and at start and end).
    """
    from bench.serve import HttpConnection, target_of

    host, port, path = target_of(url)
    rng = np.random.default_rng(plan.seed)
    res = SoakResult(plan)
    records: list[tuple[float, float, int]] = []  # (sent at, latency, status) of answered requests
    last_model: list[str | None] = [None]
    idle: list[HttpConnection] = []  # keep-alive pool: one connection per request in flight
    start = time.perf_counter()
    say = log or (lambda _msg: None)

    def note_error(text: str) -> None:
        if len(res.error_samples) < 20:
            res.error_samples.append(text)

    async def post(body: bytes, headers: dict) -> tuple[int, bytes]:
        """One request on a pooled keep-alive connection (the load generator must be cheap on a
        machine it shares with the server: bench.serve.HttpConnection). A pooled connection the
        server closed while it was idle fails before any answer: that request never reached the
        server, and it is sent again on a new connection (as any HTTP client does), counted."""
        conn = idle.pop() if idle else None
        if conn is not None:
            try:
                out = await asyncio.wait_for(conn.post(path, body, headers), plan.timeout_s)
                idle.append(conn)
                return out
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                if not isinstance(exc, asyncio.IncompleteReadError) or exc.partial:
                    raise
                res.stale_retries += 1
            except BaseException:
                conn.close()
                raise
        conn = HttpConnection(host, port)
        try:
            out = await asyncio.wait_for(conn.post(path, body, headers), plan.timeout_s)
        except BaseException:
            conn.close()
            raise
        idle.append(conn)
        return out

    async def one(i: int) -> None:
        body, headers = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        try:
            status, data = await post(body, headers)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:  # lost
            note_error(f"request {i} at {t0 - start:.1f}s: no answer ({type(exc).__name__}: {exc})")
            return
        t1 = time.perf_counter()
        res.answered += 1
        records.append((t0 - start, t1 - t0, status))
        if status == 200:
            res.ok += 1
            model = json.loads(data).get("model")
            if model != last_model[0]:
                last_model[0] = model
                res.models.append((round(t1 - start, 2), model))
        elif status >= 500:
            res.server_errors += 1
            note_error(f"request {i} at {t0 - start:.1f}s: {status} {data[:300]!r}")
        else:
            res.other_errors += 1
            note_error(f"request {i} at {t0 - start:.1f}s: {status} {data[:300]!r}")

    async def run_event(ev: SoakEvent) -> None:
        await asyncio.sleep(max(0.0, start + ev.at_s - time.perf_counter()))
        t0 = time.perf_counter()
        say(f"[{t0 - start:6.1f}s] event {ev.name} ...")
        entry = {"name": ev.name, "at_s": round(t0 - start, 2)}
        try:
            entry.update(details=await asyncio.to_thread(ev.action), ok=True)
        except Exception as exc:  # noqa: BLE001 - recorded; the caller asserts on it
            entry.update(details={"error": f"{type(exc).__name__}: {exc}"}, ok=False)
        entry["took_s"] = round(time.perf_counter() - t0, 2)
        res.events.append(entry)
        say(f"[{time.perf_counter() - start:6.1f}s] event {ev.name}: {'ok' if entry['ok'] else 'FAILED'} "
            f"{json.dumps(entry['details'], default=str)[:300]}")

    async def sample_rss() -> None:
        while True:
            await asyncio.sleep(rss_every_s)
            res.rss.append((round(time.perf_counter() - start, 1), await asyncio.to_thread(ray_processes_rss)))

    res.rss.append((0.0, ray_processes_rss()))
    sampler = asyncio.create_task(sample_rss()) if rss_every_s else None
    event_tasks = [asyncio.create_task(run_event(ev)) for ev in events]
    tasks, t, i = [], 0.0, 0
    next_log = plan.window_s
    while True:
        t += rng.exponential(1.0 / plan.rate)
        if t >= plan.duration_s:
            break
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        res.sent = i
        if t >= next_log:
            done = [r for r in records if next_log - plan.window_s <= r[0] < next_log and r[2] == 200]
            say(f"[{t:6.1f}s] sent {res.sent}, answered {res.answered}, 5xx {res.server_errors}, "
                f"p50 {pct([r[1] for r in done], 50) * 1e3:.0f} ms, p99 {pct([r[1] for r in done], 99) * 1e3:.0f} ms")
            next_log += plan.window_s
    await asyncio.gather(*tasks)
    await asyncio.gather(*event_tasks)
    if sampler is not None:
        sampler.cancel()
    res.rss.append((round(time.perf_counter() - start, 1), ray_processes_rss()))
    for conn in idle:
        conn.close()
    res.elapsed_s = round(time.perf_counter() - start, 2)
    res.lost = res.sent - res.answered
    n_windows = max(1, int(np.ceil(plan.duration_s / plan.window_s)))
    for w in range(n_windows):
        lo, hi = w * plan.window_s, min((w + 1) * plan.window_s, plan.duration_s)
        rows = [r for r in records if lo <= r[0] < hi]
        lat = [r[1] for r in rows if r[2] == 200]
        res.windows.append({"window": f"{lo:.0f}-{hi:.0f} s", "answered": len(rows), "200": len(lat),
                            "5xx": sum(r[2] >= 500 for r in rows),
                            "p50_ms": round(pct(lat, 50) * 1e3, 1), "p99_ms": round(pct(lat, 99) * 1e3, 1)})
    return res


# ---------------------------------------------------------------------------- memory
def ray_processes_rss(root_pid: int | None = None) -> dict[str, int]:
    """RSS (bytes) of every Ray process started from this process: Serve controller, proxy,
    replicas (named by their process title, e.g. ``ray::ServeReplica:tlpipe:Ingress``), raylet,
    GCS. Keyed ``title [pid]``. Empty when Ray runs elsewhere (a cluster joined by address)."""
    import psutil

    out = {}
    try:
        children = psutil.Process(root_pid or os.getpid()).children(recursive=True)
    except psutil.Error:
        return out
    for p in children:
        try:
            cmd = p.cmdline()
            title = cmd[0] if cmd else p.name()
            if title.startswith("ray::"):
                # "ray::ServeController.listen_for_change" while a method runs: keep the actor's name
                name = re.sub(r"\.[a-z_][a-z0-9_]*$", "", title.split()[0])
            elif any(k in " ".join(cmd[:2]) for k in ("raylet", "gcs_server")):
                name = Path(cmd[0]).name
            else:
                continue
            if name in ("ray::IDLE",):
                continue
            out[f"{name} [{p.pid}]"] = p.memory_info().rss
        except psutil.Error:
            continue
    return out


def serve_rss(sample: dict[str, int]) -> dict[str, int]:
    """The Serve processes of a `ray_processes_rss` sample (controller, proxy, replicas)."""
    return {k: v for k, v in sample.items() if k.startswith("ray::Serve") or k.startswith("ray::ProxyActor")}


def rss_growth(start: dict[str, int], end: dict[str, int]) -> list[dict]:
    """Per process present at both ends: start / end RSS (MB) and growth."""
    rows = []
    for key in sorted(set(start) & set(end)):
        a, b = start[key], end[key]
        rows.append({"process": key, "start_mb": round(a / MB, 1), "end_mb": round(b / MB, 1),
                     "growth_mb": round((b - a) / MB, 1), "growth_pct": round(100.0 * (b - a) / a, 1) if a else 0.0})
    return rows


# ---------------------------------------------------------------------------- events
def _admin(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def add_class_event(base_url: str, token: str, name: str, examples: list[tuple[str, bytes]],
                    queries: list[tuple[str, bytes]], *, min_matched: float = 1.0) -> Callable[[], dict]:
    """POST the `examples` as class `name`, then predict each query photo (expected to be answered
    `name` by the fallback): raises unless at least `min_matched` of them are."""
    import httpx

    from deploy.multipart import encode_multipart

    def action() -> dict:
        body, ctype = encode_multipart([("file", fn, data, "image/jpeg") for fn, data in examples])
        with httpx.Client(base_url=base_url, timeout=120) as c:
            r = c.post(f"/v1/classes/{name}/examples", content=body,
                       headers={"Content-Type": ctype, **_admin(token)})
            if r.status_code != 200:
                raise AssertionError(f"adding class {name!r} answered {r.status_code}: {r.text[:300]}")
            added = r.json()["added"]
            answers = []
            for fn, data in queries:
                qb, qt = encode_multipart([("file", fn, data, "image/jpeg")])
                p = c.post("/v1/predict", content=qb, headers={"Content-Type": qt})
                if p.status_code != 200:
                    raise AssertionError(f"predicting {fn} answered {p.status_code}: {p.text[:300]}")
                (pred,) = p.json()["predictions"]
                answers.append((fn, pred["decision"], pred["label"]))
        matched = sum(1 for _, d, label in answers if (d, label) == ("fallback", name))
        details = {"class": name, "added": len(added), "queries": len(queries), "matched": matched,
                   "answers": answers[:10]}
        if not queries or matched < min_matched * len(queries):
            raise AssertionError(f"only {matched}/{len(queries)} photos of the new class came back as "
                                 f"({name!r}, fallback): {answers[:10]}")
        return details

    return action


def hot_reload_event(base_url: str, register: Callable[[], str], *, timeout_s: float = 120.0) -> Callable[[], dict]:
    """`register()` registers a new version under alias champion (returns the version); waits until
    /v1/model serves it (the ingress polls the registry)."""
    import httpx

    def action() -> dict:
        with httpx.Client(base_url=base_url, timeout=60) as c:
            before = c.get("/v1/model").json()["model"]
            t0 = time.perf_counter()
            version = register()
            deadline = time.perf_counter() + timeout_s
            while time.perf_counter() < deadline:
                info = c.get("/v1/model").json()
                if info["version"] == version:
                    return {"from": before, "to": info["model"], "registered_s": round(time.perf_counter() - t0, 2)}
                time.sleep(0.25)
        raise AssertionError(f"the server still serves {info['model']} {timeout_s:.0f}s after version {version} "
                             "became champion")

    return action


def copy_predictor_version(src: Path, dst: Path, **info) -> Path:
    """A copy of a saved predictor with extra `info`: a new version of the same model."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "predictor.json").read_text())
    cfg.setdefault("info", {}).update(info)
    (dst / "predictor.json").write_text(json.dumps(cfg, indent=2))
    return dst


def expected_fallback(predictor, X_new: np.ndarray, new_label: str, X_queries: np.ndarray,
                      margin: float = 0.03) -> list[int]:
    """Indices of the queries that `predictor` with the `X_new` examples added answers `new_label` by
    the fallback, clear of both thresholds by `margin` (numbers differ slightly across batches)."""
    import copy

    from pipeline.calibration import knn_vote

    p = copy.copy(predictor)
    p.support = predictor.support.with_added(X_new, [new_label] * len(X_new))
    preds = p.predict_embeddings(X_queries)
    scores, labels, _ = p.support.search(X_queries, p.knn_k)
    vote, agreement = knn_vote(scores, labels)
    return [i for i, pr in enumerate(preds)
            if (pr.decision, pr.label) == ("fallback", new_label) and pr.top_k[0]["score"] <= p.threshold - margin
            and agreement[i] >= p.knn_threshold + margin]


# ---------------------------------------------------------------------------- the app
def start_app(model: str, *, state_root: str, tracking_uri: str | None, port: int, admin_token: str,
              poll_interval_s: float, app_name: str = "soak", **build_kwargs) -> str:
    """Serve + the app on 127.0.0.1:`port` (Ray must be initialised); returns the URL once ready."""
    from ray import serve

    from bench.serve import wait_http
    from deploy.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(model, state_root=state_root, tracking_uri=tracking_uri, admin_token=admin_token,
                    poll_interval_s=poll_interval_s, **build_kwargs)
    serve.run(app, name=app_name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", 600)
    return url


def _held_out_view(root: Path, held_out: str, dest: Path) -> Path:
    """`root` without class `held_out`: symlinks to the other class folders of every split."""
    for split in (p for p in root.iterdir() if p.is_dir()):
        (dest / split.name).mkdir(parents=True, exist_ok=True)
        for cls in split.iterdir():
            if cls.is_dir() and cls.name != held_out:
                (dest / split.name / cls.name).symlink_to(cls.resolve(), target_is_directory=True)
    return dest


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rate", type=float, default=None, help="requests/s (default: --fraction of the peak)")
    group.add_argument("--fraction", type=float, default=0.8, help="of the measured closed-loop peak")
    parser.add_argument("--peak-seconds", type=float, default=20.0, help="closed-loop peak measurement")
    parser.add_argument("--peak-clients", type=int, default=16)
    parser.add_argument("--data", default=None, help="clothing-small dir or archive (default: shared data)")
    parser.add_argument("--per-class", type=int, default=60, help="train photos per class for the head")
    parser.add_argument("--new-class", default="shoes", help="class held out of the head, added during the run")
    parser.add_argument("--new-examples", type=int, default=30, help="its photos added through the admin API")
    parser.add_argument("--topology", choices=["default", "colocated", "deployment"], default="default",
                        help="backbone in the ingress replica or a separate deployment (default: deploy.app.run's)")
    parser.add_argument("--proxy", action="store_true", help="through Serve's proxy (default: direct ingress)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="registry alias poll period (s)")
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    parser.add_argument("--overhead", action="store_true", help="measure monitoring + capture cost instead")
    parser.add_argument("--rounds", type=int, default=2, help="--overhead: off/on rounds")
    args = parser.parse_args()
    if args.overhead:
        return monitoring_overhead(args)

    import mlflow
    import ray
    from ray import serve

    from bench.report import write_section
    from bench.serve import (MODEL_NAME, free_port, build_champion, closed_loop, clothing_root,
                             multipart_bodies, split_files, wait_http)
    from deploy.app import run
    from jobs.registry import register_predictor
    from pipeline.preprocess import load_pixels

    def log(msg: str) -> None:
        print(msg, flush=True)

    root = clothing_root(args.data)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if args.new_class not in classes:
        raise SystemExit(f"--new-class {args.new_class!r} is not a class of {root} ({', '.join(classes)})")
    work = Path(tempfile.mkdtemp(prefix="tlpipe-bench-soak-"))
    view = _held_out_view(root, args.new_class, work / "data")
    state = work / "state"
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the temporary registry under `state`
    version, pdir, predictor, _X_test = build_champion(view, state, args.per_class)
    tracking_uri = mlflow.get_tracking_uri()

    # the held-out class: examples added at 1/3, and the photos the fallback must then answer
    spec = predictor.spec
    new_train = sorted((root / "train" / args.new_class).glob("*.jpg"))[: args.new_examples]
    new_test = sorted((root / "test" / args.new_class).glob("*.jpg"))
    from pipeline.backbones import load_backbone

    backbone = load_backbone(spec, engine="auto")
    X_new = backbone.embed(np.stack([load_pixels(p, spec) for p in new_train]))
    X_q = backbone.embed(np.stack([load_pixels(p, spec) for p in new_test]))
    expect = expected_fallback(predictor, X_new, args.new_class, X_q)
    queries = [(new_test[i].name, new_test[i].read_bytes()) for i in expect][:10]
    log(f"new class {args.new_class!r}: {len(expect)}/{len(new_test)} test photos expected back by the fallback")
    del backbone

    token = "soak-" + os.urandom(8).hex()
    port = free_port()
    # what `tlpipe serve` runs: deploy.app.run starts its own local Ray with the single-node
    # defaults (direct ingress, backbone colocated on a CPU-only machine) unless told otherwise
    url = f"http://127.0.0.1:{port}"
    photos = [p for p, _ in split_files(view, "test")]
    bodies = multipart_bodies(photos)
    try:
        run(f"{MODEL_NAME}@champion", host="127.0.0.1", port=port, name="soak", blocking=False,
            direct_ingress=False if args.proxy else None,
            colocate_backbone={"colocated": True, "deployment": False}.get(args.topology),
            state_root=str(state), tracking_uri=tracking_uri, engine="auto", admin_token=token,
            poll_interval_s=args.poll_interval, intra_op_num_threads=args.threads, max_batch_size=16,
            batch_wait_timeout_s=0.01, decode_threads=2)
        wait_http(url + "/readyz", 600)
        topology = sorted(serve.status().applications["soak"].deployments)
        peak = None
        if args.rate is None:
            r = asyncio.run(closed_loop(url + "/v1/predict", bodies, args.peak_clients, args.peak_seconds, 3.0))
            peak = r["req_s"]
            log(f"closed-loop peak with {args.peak_clients} clients: {peak:.1f} req/s (p99 {r['p99_ms']:.0f} ms)")
        rate = args.rate or args.fraction * peak
        duration = args.minutes * 60.0

        def register() -> str:
            v2 = copy_predictor_version(pdir, work / "v2" / "predictor", variant="soak-v2")
            return register_predictor(v2, MODEL_NAME, alias="champion")

        events = [SoakEvent(duration / 3, "add class", add_class_event(
                      url, token, args.new_class, [(p.name, p.read_bytes()) for p in new_train], queries)),
                  SoakEvent(2 * duration / 3, "hot reload", hot_reload_event(url, register))]
        log(f"open loop at {rate:.1f} req/s for {duration:.0f}s")
        res = asyncio.run(drive(url + "/v1/predict", bodies, SoakPlan(rate=rate, duration_s=duration), events,
                                rss_every_s=60.0, log=log))
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    text = report(res, peak=peak, fraction=None if args.rate else args.fraction, version=version,
                  peak_clients=args.peak_clients, n_photos=len(photos), new_class=args.new_class,
                  topology=topology, proxy=args.proxy, threads=args.threads)
    print(text)
    if args.write:
        write_section("soak", "Serving soak — sustained open-loop load with a class add and a hot reload",
                      "python -m bench.soak " + " ".join(sys.argv[1:]), text)
    if res.server_errors or res.lost or not res.events_ok:
        raise SystemExit(1)


def monitoring_overhead(args) -> None:
    """Closed-loop peak with monitoring + capture off vs on, alternating, same Ray and topology."""
    import mlflow
    import ray
    from ray import serve

    from bench.report import markdown_table, write_section
    from bench.serve import build_champion, closed_loop, clothing_root, free_port, multipart_bodies, split_files
    from jobs.ray_runtime import ensure_ray
    from pipeline.predictor import Predictor

    root = clothing_root(args.data)
    work = Path(tempfile.mkdtemp(prefix="tlpipe-bench-monitor-"))
    view = _held_out_view(root, args.new_class, work / "data")
    state = work / "state"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    _, pdir, predictor, _ = build_champion(view, state, args.per_class)
    predictor = Predictor.load(pdir)
    predictor.fit_reference(predictor.support.vectors, predictor.support.labels)  # the training embeddings
    monitored = work / "monitored"
    predictor.save(monitored)
    photos = [p for p, _ in split_files(root, "test")]  # includes the class the head never saw
    bodies = multipart_bodies(photos)
    configs = {"off": {"monitor": False}, "on": {"monitor": True, "capture": str(work / "capture")}}
    rows, captured = [], {}
    port = free_port()
    try:
        ensure_ray("local")
        for rnd in range(args.rounds):
            for name, extra in configs.items():
                url = start_app(str(monitored), state_root=str(state), tracking_uri=mlflow.get_tracking_uri(),
                                port=port, admin_token="x" * 16, poll_interval_s=0, app_name="monitor",
                                engine="auto", intra_op_num_threads=args.threads, max_batch_size=16,
                                batch_wait_timeout_s=0.01, decode_threads=2, colocate_backbone=True, **extra)
                r = asyncio.run(closed_loop(url + "/v1/predict", bodies, args.peak_clients, args.peak_seconds, 3.0))
                if name == "on":
                    import httpx

                    captured = httpx.get(url + "/v1/monitor", timeout=30).json()
                rows.append({"round": rnd + 1, "monitoring + capture": name, "req/s": round(r["req_s"], 1),
                             "p50 ms": round(r["p50_ms"], 1), "p99 ms": round(r["p99_ms"], 1),
                             "errors": r["errors"]})
                print(rows[-1], flush=True)
                serve.delete("monitor")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    mean = {n: float(np.mean([r["req/s"] for r in rows if r["monitoring + capture"] == n])) for n in configs}
    cost = 1.0 - mean["on"] / mean["off"]
    cap = captured.get("capture") or {}
    (model,) = [m for m in captured.get("models", {}).values() if m.get("serving")] or [{}]
    win = (model.get("windows") or [{}])[0]
    text = "\n".join([
        markdown_table(rows, ["round", "monitoring + capture", "req/s", "p50 ms", "p99 ms", "errors"]), "",
        f"Mean closed-loop peak ({args.peak_clients} clients, {args.peak_seconds:.0f} s per measurement): "
        f"off {mean['off']:.1f} req/s, on {mean['on']:.1f} req/s: **monitoring + capture cost {cost:+.1%} of "
        f"peak throughput** (negative: faster with it on, i.e. within noise).", "",
        f"With it on (last round): {cap.get('written', 0)} images captured (every fallback/abstain answer; "
        f"{cap.get('dropped_queue_full', 0)} dropped by a full queue, {cap.get('dropped_write_error', 0)} by "
        f"write errors), decision rates in the {win.get('window', '?')} window {win.get('rates')}, drift "
        f"{(win.get('drift') or {}).get('score')} vs threshold {(win.get('drift') or {}).get('threshold')}.", "",
        f"Server: `deploy.app.build_app` on a local Ray through Serve's proxy, backbone colocated in the ingress, "
        f"EfficientNet-Lite0 @224 (engine auto, {args.threads} threads) + LinearProbe on clothing-small without "
        f"`{args.new_class}`; requests: all {len(photos)} clothing-small test photos (with `{args.new_class}`), "
        "one JPEG per multipart request over loopback."])
    print(text)
    if args.write:
        write_section("soak-monitoring", "Serving — cost of production monitoring and capture",
                      "python -m bench.soak " + " ".join(sys.argv[1:]), text)


def report(res: SoakResult, *, peak: float | None, fraction: float | None, version: str, peak_clients: int,
           n_photos: int, new_class: str, topology: list[str], proxy: bool, threads: int) -> str:
    from bench.report import markdown_table

    start, end = res.rss[0][1], res.rss[-1][1]
    growth = rss_growth(start, end)
    total = lambda d: sum(d.values()) / MB  # noqa: E731
    load = (f"{res.plan.rate:.1f} req/s" + (f" = {fraction:.0%} of the closed-loop peak {peak:.1f} req/s "
                                             f"({peak_clients} clients)" if peak else " (fixed)"))
    lines = [
        f"Open loop (Poisson arrivals) at **{load}** for {res.plan.duration_s / 60:.1f} min "
        f"({res.elapsed_s:.0f} s incl. draining): **{res.sent} sent, {res.answered} answered, "
        f"{res.server_errors} 5xx, {res.other_errors} other errors, {res.lost} lost** "
        f"({res.stale_retries} requests re-sent because the server had closed their idle keep-alive "
        "connection before they were sent).", "",
        markdown_table([{**w, "p50 ms": w["p50_ms"], "p99 ms": w["p99_ms"]} for w in res.windows],
                       ["window", "answered", "200", "5xx", "p50 ms", "p99 ms"]), "",
        "Events during the run:", "",
    ]
    for e in res.events:
        d = e["details"]
        if e["name"] == "add class" and e["ok"]:
            what = (f"{d['added']} examples of the held-out class `{d['class']}` added; {d['matched']}/{d['queries']} "
                    "of its test photos (those the champion + examples answer by the fallback, computed offline) "
                    "came back as that label, decision fallback")
        elif e["name"] == "hot reload" and e["ok"]:
            what = (f"alias `champion` moved to a new version: served model {d['from']} -> {d['to']} "
                    f"{d['registered_s']} s after the registration started (registry poll)")
        else:
            what = f"**FAILED**: {d}"
        lines.append(f"- {e['at_s']:.0f} s, {e['name']} ({e['took_s']} s): {what}")
    models = " -> ".join(f"{m} (from {t:.0f} s)" for t, m in res.models)
    lines += ["", f"Models seen in the answers: {models}.", "",
              f"RSS of the Ray / Serve processes (start = after the peak measurement, end = after the run): "
              f"total {total(start):.0f} MB -> {total(end):.0f} MB.", "",
              markdown_table(growth, ["process", "start_mb", "end_mb", "growth_mb", "growth_pct"])]
    worst = max(growth, key=lambda r: r["growth_mb"], default=None)
    verdict = (f"Verdict: {res.server_errors} 5xx, {res.lost} lost, events "
               f"{'passed' if res.events_ok else 'FAILED'}; largest RSS growth "
               + (f"{worst['growth_mb']:+.1f} MB ({worst['growth_pct']:+.1f} %, {worst['process']})." if worst else "n/a."))
    lines += ["", f"**{verdict}**"]
    if len(res.rss) > 2:
        lines += ["", "Serve processes' total RSS over the run: " + ", ".join(
            f"{t:.0f} s {sum(serve_rss(s).values()) / MB:.0f} MB" for t, s in res.rss) + "."]
    if res.error_samples:
        lines += ["", "First errors:", "", *[f"- `{e[:200]}`" for e in res.error_samples[:5]]]
    lines += ["", f"Server: `deploy.app.run` (what `tlpipe serve` runs) on a local Ray, deployments "
              f"{' + '.join(topology)}, {'through the Serve proxy' if proxy else 'direct ingress'}. "
              f"Model: EfficientNet-Lite0 @224 (ONNX Runtime, {threads} threads) + LinearProbe on clothing-small "
              f"without `{new_class}` (champion version {version}); requests: {n_photos} test photos, one JPEG per "
              "multipart request over loopback HTTP; load generator (asyncio streams, bench.serve.HttpConnection "
              "keep-alive pool) on the same machine."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
