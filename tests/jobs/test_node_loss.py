"""Node loss (issue #6 item 3): a worker node removed from a multi-node local Ray cluster
(`ray.cluster_utils.Cluster`, 1 CPU a node) mid-extraction and mid-sweep; each job completes with
the same results as a run that lost nothing.

Real CIFAR-10 photos, real EfficientNet-Lite0 weights (96 px, ONNX Runtime), a real sqlite MLflow
store. Slow on 2 shared cores (every node is a raylet with its own workers), hence `slow`.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from feature_store import FeatureStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

N_PER_CLASS = 16
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cifar_subsets import copy_cifar_subset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ray_nodes import NODE, add_node, cpu_used  # noqa: E402

HEADS = ["linear", "knn", "centroid", "mlp"]
HEAD_PARAMS = {"linear": {"weight_decays": [1e-3, 1e-1], "max_iter": 200}}


@pytest.fixture(scope="module")
def cluster():
    """Head + one worker node, 1 CPU each; this process is the driver. A Ray already running in
    this process (the session's `ray_local`) is shut down for the module and restarted after."""
    import ray
    from ray.cluster_utils import Cluster

    from jobs.ray_runtime import ensure_ray

    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args=dict(NODE, include_dashboard=False))
    try:
        add_node(c)
        ensure_ray(address=c.address)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if was_running:
            ensure_ray(num_cpus=2)


def _alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def _worker_node(cluster):
    (node,) = list(cluster.worker_nodes)
    return node


@pytest.fixture(scope="module")
def dataset(cifar10_dir, tmp_path_factory):
    from pipeline.data import load_dataset

    root = copy_cifar_subset(cifar10_dir, tmp_path_factory.mktemp("cifar-node-loss"), {"train": N_PER_CLASS})
    return load_dataset(root)  # stratified train / val / test


@pytest.fixture(scope="module")
def reference(dataset, small_spec):
    """The same embeddings computed in this process, no Ray at all."""
    from pipeline.backbones import load_backbone
    from pipeline.extraction import ChunkEmbedder

    emb = ChunkEmbedder(load_backbone(small_spec, engine="auto"), micro_batch=16)
    try:
        res = emb([r.path for r in dataset.records])
    finally:
        emb.close()
    assert res.ok.all()
    return {r.sha256: e for r, e in zip(dataset.records, res.embeddings)}


def _remove_when(cluster, node, ready, stop: threading.Event, log: dict) -> threading.Thread:
    def run():
        while not stop.is_set():
            if ready():
                log["removed_at"] = time.monotonic()
                cluster.remove_node(node)
                return
            time.sleep(0.02)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def extracted(cluster, dataset, small_spec, tmp_path_factory):
    """Extraction across both nodes; the worker node is removed once the first shard is stored."""
    from jobs.extract import extract_features

    assert _alive_nodes() == 2
    features = tmp_path_factory.mktemp("node-loss") / "features"
    store = FeatureStore(features)
    node = _worker_node(cluster)
    stop, log = threading.Event(), {}
    # the worker node's actor is up and working, and the first results are stored
    t = _remove_when(cluster, node, lambda: any(features.glob("*/shard-*.parquet"))
                     and cpu_used(node.node_id) > 0, stop, log)
    try:
        (s,) = extract_features([(r.sha256, r.path) for r in dataset.records], [small_spec],
                                store=store, chunk_size=8, micro_batch=8, shard_rows=8)
    finally:
        stop.set()
        t.join(timeout=60)
    done_at = time.monotonic()
    return {"stats": s, "store": store, "root": features.parent, "log": log, "done_at": done_at}


def test_extraction_completes_after_losing_a_node(extracted, dataset, reference):
    s, store = extracted["stats"], extracted["store"]
    assert "removed_at" in extracted["log"], "the worker node was never removed"
    assert extracted["log"]["removed_at"] < extracted["done_at"]
    assert _alive_nodes() == 1
    assert s.executor == "ray-data"  # two nodes: Ray Data spreads the work
    assert (s.requested, s.extracted, s.failed) == (len(dataset.records), len(dataset.records), [])
    rep = store.verify(s.fingerprint)
    assert not rep.corrupt and rep.rows == len(dataset.records)
    keys = [r.sha256 for r in dataset.records]
    np.testing.assert_allclose(store.get(s.fingerprint, keys), np.stack([reference[k] for k in keys]),
                               rtol=1e-5, atol=1e-5)


def _metrics(result) -> dict[str, tuple]:
    return {r["name"]: (r["status"], r["accuracy"], r["balanced_accuracy"], r["macro_f1"],
                        r["ece"], r["n_train"], r["n_test"]) for r in result.rows}


def test_sweep_completes_after_losing_a_node(cluster, extracted, dataset, small_spec):
    from jobs.sweep import FeatureSetRef, run_sweep

    s = extracted["stats"]
    ref = FeatureSetRef.from_spec(small_spec, engine=s.engine, fingerprint=s.fingerprint)
    kw = dict(root=extracted["root"], store=extracted["store"], head_params=HEAD_PARAMS,
              backbone_latency={small_spec.name: {"latency_ms_b1": 5.0, "latency_ms_b32": 1.0}},
              n_bootstrap=100, hardest_k=4, latency_repeats=2, ensembles=False)

    # reference: the head node alone (the worker node went in the extraction)
    assert _alive_nodes() == 1
    single = run_sweep(dataset, [ref], HEADS, run_name="single-node", **kw)

    node = add_node(cluster)
    assert _alive_nodes() == 2
    assert cpu_used(node.node_id) == 0

    stop, log = threading.Event(), {}
    # a head task (the only thing the sweep schedules) is running on the worker node
    t = _remove_when(cluster, node, lambda: cpu_used(node.node_id) > 0, stop, log)
    try:
        lost = run_sweep(dataset, [ref], HEADS, run_name="node-lost", **kw)
    finally:
        stop.set()
        t.join(timeout=60)
    assert "removed_at" in log, "no head task ever ran on the worker node"
    assert _alive_nodes() == 1
    got, want = _metrics(lost), _metrics(single)
    assert set(got) == set(want) and len(got) == len(HEADS)
    assert all(v[0] == "FINISHED" for v in got.values()), got
    assert got == want
    assert lost.winner["name"] == single.winner["name"]
