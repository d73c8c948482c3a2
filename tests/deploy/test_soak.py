"""Sustained load, CI size (issue #6 item 4): the `bench.soak` driver for ~35 s at 5 req/s.

The real app (Ray Serve, local Ray, the conftest's EfficientNet-Lite0 @64 predictor from an MLflow
registry, separate Backbone deployment) gets Poisson traffic of real photos while, inside the run,
a new class is added through the admin API (its photo must then come back by the fallback) and
the registry alias moves to a new version (the served version must change, no request failing).

Asserted: 0 5xx, 0 lost, 0 other errors, both events passed, the version switch is one-way, and
the RSS of every Serve process (controller, proxy, replicas) grew by at most
max(25 %, 150 MB) between the start of the run (after a warm-up) and its end. Why that bound:
within the run the ingress legitimately loads a second predictor version and the backbone pool may
build the same backbone once more for the new version's spec (~20 MB of weights + runtime state
at 64 px), the added examples add an index, and glibc / Python allocators keep freed pages. A leak
that keeps each request's decoded pixels, bodies or results (~10-100 kB each, x ~200 requests),
or one more model copy per reload, stays under it; what the bound catches in CI is growth
proportional to the load (e.g. an unbounded queue or cache). The 10-minute run of
`python -m bench.soak` reports the per-minute RSS trend for the finer check.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import NEW_CLASS, free_port, register_in_tmp_store  # noqa: E402

NAME = "soaked"
TOKEN = "soak-token-9c2f"
APP = "tlpipe-soak"
RATE, DURATION = 5.0, 35.0
MB = 1024 * 1024


@pytest.fixture(scope="module")
def soak_app(ray_serve, serving_model, tmp_path_factory):
    from ray import serve

    from bench.soak import start_app

    root = tmp_path_factory.mktemp("soak-state")
    tracking_uri, experiment, v1 = register_in_tmp_store(root, "serve-soak", serving_model.predictor_dir, NAME)
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    try:
        url = start_app(f"{NAME}@champion", state_root=str(root), tracking_uri=tracking_uri, port=free_port(),
                        admin_token=TOKEN, poll_interval_s=0.5, app_name=APP, engine="torch", decode_threads=2,
                        max_batch_size=8, batch_wait_timeout_s=0.005, ingress_options=small,
                        backbone_options=small)
        yield {"url": url, "tracking_uri": tracking_uri, "experiment": experiment, "v1": v1, "root": root}
    finally:
        serve.shutdown()


def test_soak_with_class_add_and_hot_reload(soak_app, serving_model, tmp_path):
    import httpx
    import mlflow

    from bench.soak import (SoakEvent, SoakPlan, add_class_event, copy_predictor_version, drive,
                            hot_reload_event, rss_growth, serve_rss)
    from deploy.multipart import encode_multipart
    from jobs.registry import register_predictor

    url, m = soak_app["url"], serving_model
    photos = m.classifier[:4] + m.fallback[:2] + m.abstain[:2]
    bodies = []
    for p in photos:
        body, ctype = encode_multipart([("file", p.path.name, p.data, "image/jpeg")])
        bodies.append((body, {"Content-Type": ctype}))
    with httpx.Client(timeout=60) as c:  # warm-up: every code path has run once before RSS is taken
        for body, headers in bodies * 3:
            assert c.post(url + "/v1/predict", content=body, headers=headers).status_code == 200

    def register() -> str:
        v2_dir = copy_predictor_version(m.predictor_dir, tmp_path / "v2", variant="soak-v2")
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(soak_app["tracking_uri"])
        try:
            mlflow.set_experiment(experiment_id=soak_app["experiment"])
            return register_predictor(v2_dir, NAME, alias="champion")
        finally:
            mlflow.set_tracking_uri(previous)

    query = m.new_class_query
    events = [
        SoakEvent(8.0, "add class", add_class_event(
            url, TOKEN, NEW_CLASS, [(p.name, p.read_bytes()) for p in m.new_class_examples],
            [(query.path.name, query.data)])),
        SoakEvent(18.0, "hot reload", hot_reload_event(url, register, timeout_s=60)),
    ]
    plan = SoakPlan(rate=RATE, duration_s=DURATION, window_s=10.0, timeout_s=60.0)
    res = asyncio.run(drive(url + "/v1/predict", bodies, plan, events, log=print))

    assert res.sent >= 0.6 * RATE * DURATION, res.to_dict()  # the generator kept its rate
    assert (res.server_errors, res.lost, res.other_errors) == (0, 0, 0), res.error_samples
    assert res.answered == res.sent == res.ok
    assert res.events_ok and [e["name"] for e in res.events] == ["add class", "hot reload"], res.events
    add, reload = res.events
    assert add["details"]["matched"] == 1
    v1 = soak_app["v1"]
    assert reload["details"]["from"] == f"{NAME}@{v1}" and reload["details"]["to"] != reload["details"]["from"]
    # answers switched from v1 to v2 once, for good
    assert [label for _, label in res.models] == [f"{NAME}@{v1}", reload["details"]["to"]], res.models
    assert all(w["answered"] > 0 for w in res.windows), res.windows

    # the added class still answers after the swap (the new version re-embedded its examples)
    body, ctype = encode_multipart([("file", query.path.name, query.data, "image/jpeg")])
    (pred,) = httpx.post(url + "/v1/predict", content=body, headers={"Content-Type": ctype},
                         timeout=60).json()["predictions"]
    assert (pred["decision"], pred["label"], pred["model"]) == ("fallback", NEW_CLASS, reload["details"]["to"])

    start, end = serve_rss(res.rss[0][1]), serve_rss(res.rss[-1][1])
    rows = rss_growth(start, end)
    for row in rows:
        print(row)
    names = " ".join(r["process"] for r in rows)
    assert "ServeController" in names and "ProxyActor" in names and "Ingress" in names and "Backbone" in names, rows
    too_much = [r for r in rows if r["growth_mb"] > max(0.25 * r["start_mb"], 150.0)]
    assert not too_much, too_much
