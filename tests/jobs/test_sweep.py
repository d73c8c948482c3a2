"""The sweep end to end on synthetic "backbone" features: real FeatureStore, real local Ray, real
MLflow (sqlite under tmp_path). Backbones are fake: Gaussian blobs per class stand in for
embeddings, and their latencies are given, so no model is loaded."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feature_store import FeatureStore
from pipeline.data import Dataset, DatasetCard, ImageRecord
from pipeline.data.card import dataset_hash

CLASSES = ["cat", "dog", "frog"]
PER_CLASS = {"train": 30, "val": 10, "test": 20}
DIM = 16


def _key(*parts) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _fingerprint(name: str) -> str:
    return hashlib.sha256(f"fake-backbone:{name}".encode()).hexdigest()


def make_dataset(folder) -> Dataset:
    """Records for 3 classes x (train, val, test); test images are real tiny PNGs (for the
    hardest-examples grid), the others only need keys."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"cat": (200, 40, 40), "dog": (40, 200, 40), "frog": (40, 40, 200)}
    records = []
    for split, n in PER_CLASS.items():
        for c in CLASSES:
            for i in range(n):
                path = folder / f"{split}_{c}_{i}.png"
                if split == "test":
                    Image.new("RGB", (12, 12), colours[c]).save(path)
                records.append(ImageRecord(path=str(path), label=c, split=split,
                                           sha256=_key(split, c, i), width=12, height=12))
    counts = {s: {c: n for c in CLASSES} for s, n in PER_CLASS.items()}
    card = DatasetCard(
        name="blobs", source=str(folder), source_kind="synthetic", classes=list(CLASSES),
        counts=counts, imbalance_ratio=1.0, excluded=[], duplicates=[], label_conflicts=[],
        dataset_hash=dataset_hash((r.sha256, r.label, r.split) for r in records),
        split_strategy="source", seed=0, fractions={"val": 0.1, "test": 0.1})
    return Dataset(records=records, card=card)


def put_blobs(store: FeatureStore, ds: Dataset, name: str, *, separation: float,
              noise: float, seed: int) -> str:
    """Class-centred Gaussian blobs as this fake backbone's embeddings; returns its fingerprint."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(CLASSES), DIM)) * separation
    idx = {c: i for i, c in enumerate(CLASSES)}
    emb = np.stack([centres[idx[r.label]] + rng.normal(size=DIM) * noise for r in ds.records])
    fp = _fingerprint(name)
    store.put(fp, [r.sha256 for r in ds.records], emb.astype(np.float32),
              meta={"backbone": name})
    return fp


def ref(name: str, fp: str, family: str, params_m: float):
    from jobs.sweep import FeatureSetRef

    return FeatureSetRef(backbone=name, fingerprint=fp, family=family, params_m=params_m)


SHARP = "fakenet/sharp.v1"   # well separated blobs, slow (5 ms)
NOISY = "tinynet/noisy.v1"   # overlapping blobs, fast (1 ms)
LATENCY = {SHARP: {"latency_ms_b1": 5.0, "latency_ms_b32": 2.0, "params_m": 20.0},
           NOISY: {"latency_ms_b1": 1.0, "latency_ms_b32": 0.5, "params_m": 5.0}}
BUDGET_MS = 4.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    ds = make_dataset(tmp_path_factory.mktemp("images"))
    store = FeatureStore(root / "features")
    fps = {SHARP: put_blobs(store, ds, SHARP, separation=10.0, noise=1.0, seed=1),
           NOISY: put_blobs(store, ds, NOISY, separation=0.6, noise=1.0, seed=2)}
    return {"root": root, "ds": ds, "store": store, "fps": fps}


@pytest.fixture(scope="module")
def main_sweep(world, ray_local):
    from jobs.sweep import run_sweep

    refs = [ref(SHARP, world["fps"][SHARP], "fakenet", 20.0),
            ref(NOISY, world["fps"][NOISY], "tinynet", 5.0)]
    return run_sweep(world["ds"], refs, ["linear", "knn", "centroid"], root=world["root"],
                     store=world["store"], experiment="main", run_name="main-sweep",
                     head_params={"linear": {"weight_decays": [1e-4, 1e-2], "max_iter": 100}},
                     max_latency_ms=BUDGET_MS, backbone_latency=LATENCY, n_bootstrap=200,
                     hardest_k=6, latency_repeats=3, ensembles=False)


def _client():
    from jobs.tracking import client

    return client()


def _artifacts(run_id: str, path: str | None = None) -> set[str]:
    c = _client()
    out = set()
    for f in c.list_artifacts(run_id, path):
        if f.is_dir:
            out |= _artifacts(run_id, f.path)
        else:
            out.add(f.path)
    return out


def test_parent_and_child_runs_with_metrics_and_artifacts(main_sweep, world):
    c = _client()
    parent = c.get_run(main_sweep.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["dataset_hash"] == world["ds"].card.dataset_hash
    assert json.loads(parent.data.params["backbones"]) == [SHARP, NOISY]
    assert parent.data.params["max_latency_ms"] == str(BUDGET_MS)
    assert {"leaderboard.json", "leaderboard.csv", "leaderboard.md", "selection.json",
            "report.html", "pareto.png", "dataset/dataset_card.json",
            "skipped.json"} <= _artifacts(parent.info.run_id)

    children = c.search_runs([parent.info.experiment_id],
                             f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 6
    assert {(r.data.params["backbone"], r.data.params["head_label"]) for r in children} == {
        (b, h) for b in (SHARP, NOISY) for h in ("linear", "knn", "centroid")}
    for run in children:
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "metric_value", "ci_low",
                    "ci_high", "latency_ms_b1", "latency_ms_b32", "head_latency_ms_b1",
                    "params_m", "fit_seconds", "class/cat/f1", "selection_score",
                    "selection_std", "n_selection"):
            assert key in m, (run.info.run_name, key)
        b = run.data.params["backbone"]
        assert m["backbone_latency_ms_b1"] == LATENCY[b]["latency_ms_b1"]
        assert m["latency_ms_b1"] == pytest.approx(LATENCY[b]["latency_ms_b1"]
                                                   + m["head_latency_ms_b1"])
        assert m["params_m"] >= LATENCY[b]["params_m"]
        assert m["ci_low"] <= m["metric_value"] <= m["ci_high"]
        assert int(run.data.params["n_test"]) == 60
        # selection: 5-fold CV on all 120 train+val images, never the test split
        assert m["n_selection"] == 120 and run.data.params["selection_on"].startswith("5-fold CV")
        arts = _artifacts(run.info.run_id)
        assert {"eval/confusion_matrix.png", "eval/per_class.csv", "eval/reliability.png",
                "eval/hardest_examples.png", "eval/report.json", "dataset/dataset_card.json",
                "head/config.json", "candidate.json", "selection.json"} <= arts
    sharp = [r for r in children if r.data.params["backbone"] == SHARP]
    assert all(r.data.metrics["accuracy"] == 1.0 for r in sharp)
    noisy = [r for r in children if r.data.params["backbone"] == NOISY]
    assert all(0.34 < r.data.metrics["accuracy"] < 0.99 for r in noisy)


def test_report_html_contains_the_leaderboard(main_sweep):
    html = open(main_sweep.report_path, encoding="utf-8").read()
    assert "Leaderboard (6)" in html
    for row in main_sweep.rows:
        assert row["name"] in html
        assert row["run_id"] in html
    assert html.count("data:image/png;base64,") >= 2      # Pareto plot + winner's figures
    assert "never used for choosing" in html and "<div class='scroll'>" in html
    assert main_sweep.selection["why"].split(".")[0] in html


def test_selection_respects_the_latency_budget(main_sweep):
    from pipeline.select import select_winner
    from pipeline.sweep.leaderboard import candidates_from_rows

    sel = main_sweep.selection
    assert sel is not None and main_sweep.selection_error is None
    assert sel["winner"]["backbone"] == NOISY
    assert sel["winner"]["latency_ms_b1"] <= BUDGET_MS
    excluded = {e["candidate"]["backbone"] for e in sel["excluded"]}
    assert excluded == {SHARP}
    assert all("budget" in e["reason"] for e in sel["excluded"])
    # without the budget the (better, untied) sharp backbone would have won
    unconstrained = select_winner(candidates_from_rows(main_sweep.rows))
    assert unconstrained.winner.backbone == SHARP
    # the winner is tagged on the parent and flagged in exactly one row
    parent = _client().get_run(main_sweep.parent_run_id)
    assert parent.data.tags["tlpipe.winner_run_id"] == main_sweep.winner_run_id
    assert parent.data.tags["tlpipe.selection_why"] == sel["why"]
    assert [r["run_id"] for r in main_sweep.rows if r["winner"]] == [main_sweep.winner_run_id]


def test_compare_reads_back_the_same_rows(main_sweep, world):
    from jobs.leaderboard import compare
    from pipeline.sweep.leaderboard import ROW_KEYS

    rows = compare(world["root"], experiment="main")
    assert rows == main_sweep.rows
    assert compare(world["root"], main_sweep.parent_run_id) == main_sweep.rows
    assert all(tuple(r) == ROW_KEYS for r in rows)
    ranked = [r["selection_score"] for r in rows]
    assert ranked == sorted(ranked, reverse=True)
    assert [r["rank"] for r in rows] == list(range(1, 7))


def test_saved_heads_load_and_predict(main_sweep, world):
    from pipeline.heads import load_head

    assert set(main_sweep.head_dirs) == {r["name"] for r in main_sweep.rows}
    name = f"{SHARP}+linear"
    head = load_head(main_sweep.head_dirs[name])
    test = world["ds"].split("test")
    X = world["store"].get(world["fps"][SHARP], [r.sha256 for r in test])
    assert np.mean(head.predict(X) == np.array([r.label for r in test])) == 1.0
    meta = json.loads((Path(main_sweep.head_dirs[name]).parent / "candidate.json").read_text())
    assert meta["fingerprint"] == world["fps"][SHARP] and meta["classes"] == CLASSES


def test_failed_head_is_a_failed_child_and_equivalent_goes_to_the_cheaper(world, ray_local):
    from jobs.leaderboard import compare
    from jobs.sweep import HeadConfig, run_sweep

    # two perfectly separable backbones: a paired test shows them equivalent, so the faster wins
    slow, fast = "fakenet/sharp.slow", "tinynet/sharp.fast"
    fps = {slow: put_blobs(world["store"], world["ds"], slow, separation=10.0, noise=1.0, seed=3),
           fast: put_blobs(world["store"], world["ds"], fast, separation=10.0, noise=1.0, seed=4)}
    lat = {slow: {"latency_ms_b1": 8.0, "latency_ms_b32": 3.0},
           fast: {"latency_ms_b1": 2.0, "latency_ms_b32": 1.0}}
    heads = [HeadConfig("centroid"),
             HeadConfig("LinearProbe", {"scoring": "no-such-scoring"}, name="linear-bad"),
             HeadConfig("zeroshot")]
    result = run_sweep(world["ds"], [ref(slow, fps[slow], "fakenet", 20.0),
                                     ref(fast, fps[fast], "tinynet", 5.0)],
                       heads, root=world["root"], store=world["store"], experiment="ties",
                       backbone_latency=lat, n_bootstrap=100, hardest_k=4, latency_repeats=2,
                       ensembles=False)
    c = _client()
    assert c.get_run(result.parent_run_id).info.status == "FINISHED"
    by_status = {}
    for r in result.rows:
        by_status.setdefault(r["status"], []).append(r)
    assert len(by_status["FINISHED"]) == 2 and len(by_status["FAILED"]) == 2
    for r in by_status["FAILED"]:
        assert r["head"] == "linear-bad" and r["selection_score"] is None and r["rank"] is None
        assert r["error"].startswith("ValueError: ") and "no-such-scoring" in r["error"]
        run = c.get_run(r["run_id"])
        assert run.info.status == "FAILED"
        assert run.data.tags["tlpipe.error_type"] == "ValueError"
        assert "error.txt" in _artifacts(r["run_id"])
        tb = Path(c.download_artifacts(r["run_id"], "error.txt")).read_text()
        assert "ValueError" in tb and "no-such-scoring" in tb and "fit_evaluate" in tb
    assert result.rows[-2:] == by_status["FAILED"]         # failed rows sort last
    # zero-shot cannot apply to backbones without a text tower: skipped with the reason
    assert {(s["backbone"], s["head"]) for s in result.skipped} == {(slow, "zeroshot"),
                                                                  (fast, "zeroshot")}
    assert all("text tower" in s["reason"] for s in result.skipped)
    # the equivalent, cheaper backbone wins, with the paired comparison recorded
    assert result.selection["winner"]["backbone"] == fast
    comp = {c["name"]: c for c in result.selection["comparisons"]}
    assert comp[f"{fast}+centroid"]["equivalent"] and comp[f"{fast}+centroid"]["n_images"] == 120
    assert math.isclose(result.selection["winner"]["metric"], 1.0)
    assert compare(world["root"], experiment="ties") == result.rows


def test_unknown_head_fails_before_anything_runs(world):
    from jobs.sweep import run_sweep

    with pytest.raises(ValueError, match="unknown head 'nope'"):
        run_sweep(world["ds"], [ref(SHARP, world["fps"][SHARP], "fakenet", 1.0)], ["nope"],
                  root=world["root"], store=world["store"], experiment="never")


def test_missing_features_skip_the_backbone(world, ray_local):
    from jobs.sweep import run_sweep

    ghost = ref("ghostnet/none.v1", _fingerprint("never-extracted"), "ghostnet", 1.0)
    result = run_sweep(world["ds"], [ghost, ref(NOISY, world["fps"][NOISY], "tinynet", 5.0)],
                       ["centroid"], root=world["root"], store=world["store"],
                       experiment="ghost", backbone_latency=LATENCY, n_bootstrap=0,
                       hardest_k=2, latency_repeats=1)
    assert [r["backbone"] for r in result.rows] == [NOISY]
    assert result.skipped[0]["backbone"] == "ghostnet/none.v1"
    assert "tlpipe extract" in result.skipped[0]["reason"]


def _relabel_test(ds: Dataset, seed: int) -> Dataset:
    """The same dataset with the test split's labels shuffled (train and val untouched)."""
    from dataclasses import replace

    rng = np.random.default_rng(seed)
    test = [i for i, r in enumerate(ds.records) if r.split == "test"]
    labels = [ds.records[i].label for i in test]
    rng.shuffle(labels)
    records = list(ds.records)
    for i, lab in zip(test, labels):
        records[i] = replace(records[i], label=lab)
    return Dataset(records=records, card=ds.card)


def test_the_test_split_never_chooses(world, ray_local):
    """Shuffling the test labels changes every test score and no selection score or winner."""
    from jobs.sweep import run_sweep

    refs = [ref(SHARP, world["fps"][SHARP], "fakenet", 20.0),
            ref(NOISY, world["fps"][NOISY], "tinynet", 5.0)]
    # backbone latencies with the spread a measured one has: heads on the noisy backbone may tie
    # on score, and their few-microsecond head timings (taken beside other tasks) must not then
    # decide between them by jitter; the median of 5 head timings, not 2, so that one preempted
    # timing on a busy machine cannot push a head over the latency budget in one run only
    noisy = {b: {**lat, "latency_noise_ms_b1": 0.1} for b, lat in LATENCY.items()}
    kw = dict(root=world["root"], store=world["store"], backbone_latency=noisy,
              n_bootstrap=0, hardest_k=2, latency_repeats=5, max_latency_ms=BUDGET_MS)
    a = run_sweep(world["ds"], refs, ["linear", "knn", "centroid"], experiment="shuffle-a", **kw)
    b = run_sweep(_relabel_test(world["ds"], 7), refs, ["linear", "knn", "centroid"],
                  experiment="shuffle-b", **kw)
    assert a.selection["winner"]["name"] == b.selection["winner"]["name"], (a.selection["why"], b.selection["why"])
    sa = {r["name"]: r["selection_score"] for r in a.rows}
    sb = {r["name"]: r["selection_score"] for r in b.rows}
    assert sa == pytest.approx(sb)
    ta = {r["name"]: r["test_score"] for r in a.rows}
    tb = {r["name"]: r["test_score"] for r in b.rows}
    assert ta[f"{SHARP}+linear"] == 1.0 and tb[f"{SHARP}+linear"] < 0.7


def test_ensembles_across_backbones_are_candidates(tmp_path_factory, ray_local, monkeypatch):
    """Two noisy, independent views of the classes: the concatenation and the Caruana ensemble
    beat either backbone alone out of fold, and both are registered-ready candidates. The
    concatenation starts from each backbone's linear-probe preparation, fetched from Ray's
    object store."""
    import jobs.sweep
    from jobs.sweep import run_sweep
    from pipeline.heads import Ensemble, load_head

    fetched = []
    real_fetch = jobs.sweep.fetch_or_none
    monkeypatch.setattr(jobs.sweep, "fetch_or_none", lambda r: fetched.append(real_fetch(r)) or fetched[-1])

    root = tmp_path_factory.mktemp("ens")
    ds = make_dataset(tmp_path_factory.mktemp("ens-images"))
    store = FeatureStore(root / "features")
    a, b = "viewnet/a.v1", "viewnet/b.v1"
    fps = {a: put_blobs(store, ds, a, separation=0.9, noise=1.0, seed=11),
           b: put_blobs(store, ds, b, separation=0.9, noise=1.0, seed=12)}
    lat = {a: {"latency_ms_b1": 2.0, "latency_ms_b32": 1.0, "params_m": 3.0},
           b: {"latency_ms_b1": 3.0, "latency_ms_b32": 1.5, "params_m": 4.0}}
    res = run_sweep(ds, [ref(a, fps[a], "viewnet", 3.0), ref(b, fps[b], "viewnet", 4.0)],
                    ["linear", "centroid"], root=root, store=store, experiment="ens",
                    head_params={"linear": {"weight_decays": [1e-3, 1e-1, 1.0]}},
                    backbone_latency=lat, n_bootstrap=0, hardest_k=2, latency_repeats=2)
    rows = {r["name"]: r for r in res.rows}
    concat = [r for r in res.rows if r["kind"] == "concat"]
    ensemble = [r for r in res.rows if r["kind"] == "ensemble"]
    assert len(concat) == 1 and concat[0]["status"] == "FINISHED"
    singles = [r["selection_score"] for r in res.rows if r["kind"] == "probe"]
    assert concat[0]["selection_score"] > max(singles)
    # its cost is both backbones' plus its head
    assert concat[0]["latency_ms_b1"] >= 5.0 and concat[0]["params_m"] >= 7.0
    if ensemble:  # Caruana may keep one member only; then it is skipped with the reason
        e = ensemble[0]
        assert e["status"] == "FINISHED" and e["latency_ms_b1"] >= 5.0
        head = load_head(res.head_dirs[e["name"]])
        assert isinstance(head, Ensemble) and len(head.heads) >= 2
    else:
        assert any(s["head"] == "ensemble" for s in res.skipped)
    assert set(res.head_dirs) == {n for n, r in rows.items() if r["status"] == "FINISHED"}
    meta = json.loads((Path(res.head_dirs[concat[0]["name"]]).parent / "candidate.json").read_text())
    assert meta["backbones"] == [a, b] and meta["fingerprints"] == [fps[a], fps[b]]
    assert [np.shape(p["rotated"]) for p in fetched] == [(len(ds.split("train") + ds.split("val")), DIM)] * 2


def test_an_ensemble_of_heads_on_one_backbone(world, ray_local):
    """Caruana members may share a backbone: the ensemble then runs that backbone once."""
    from jobs.sweep import run_sweep
    from pipeline.heads import Ensemble, load_head

    res = run_sweep(world["ds"], [ref(NOISY, world["fps"][NOISY], "tinynet", 5.0)],
                    ["linear", "knn", "centroid"], root=world["root"], store=world["store"],
                    experiment="one-backbone-ensemble", backbone_latency=LATENCY, n_bootstrap=0,
                    hardest_k=2, latency_repeats=2)
    assert all(r["status"] == "FINISHED" for r in res.rows), [r["error"] for r in res.rows]
    assert not [r for r in res.rows if r["kind"] == "concat"]  # one backbone: nothing to concatenate
    ensemble = [r for r in res.rows if r["kind"] == "ensemble"]
    if ensemble:
        head = load_head(res.head_dirs[ensemble[0]["name"]])
        assert isinstance(head, Ensemble) and all(s == (0, 16) for s in head.feature_slices)
        assert ensemble[0]["latency_ms_b1"] >= LATENCY[NOISY]["latency_ms_b1"]
    else:
        assert any(s["head"] == "ensemble" for s in res.skipped)


def test_warm_workers_leave_the_modules_imported_in_the_workers(ray_local):
    """`warm_workers` starts one import task per CPU; the workers that run later tasks have the
    modules already (what the sweep's first head tasks then skip)."""
    import sys

    from jobs.ray_runtime import warm_workers

    refs = warm_workers(["colorsys", "pipeline.sweep.candidate"])
    assert len(refs) == int(ray_local.cluster_resources()["CPU"])
    pids = set(ray_local.get(refs))

    @ray_local.remote(num_cpus=1)
    def imported() -> tuple[int, bool]:
        import os

        return os.getpid(), "colorsys" in sys.modules

    seen = ray_local.get([imported.remote() for _ in range(4)])
    assert all(ok for pid, ok in seen if pid in pids) and any(pid in pids for pid, _ in seen)
