"""Fine-tuning on a real local Ray Train (2 CPUs) and real MLflow (sqlite under tmp_path).

* a tiny random CNN on 2 DDP workers whose rank-0 worker is killed after epoch 1: Ray Train
  restarts the group and training resumes from the epoch-1 checkpoint, then saves artifacts
  whose adapter and merged model predict the same;
* the sweep with `--heads linear,lora` on real EfficientNet-Lite0 weights and real CIFAR-10
  photos: the LoRA fine-tune is a row of the same leaderboard, evaluated on the same test split,
  beats its own linear probe, logs its curves in its child run, and `build_predictor` serves it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from feature_store import FeatureStore
from pipeline.backbones import BackboneSpec
from pipeline.backbones.spec import HALF_MEAN, HALF_STD

CLASSES = ["blue", "green", "red"]
LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"


@pytest.fixture(autouse=True)
def _one_thread():
    # the driver's torch work (probe, predictor) on one thread: this runner's 2 cores are shared
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An ImageFolder of coloured tiles (train/val/test) and timm's test_efficientnet, random."""
    import timm
    from safetensors.torch import save_file

    from pipeline.data import load_dataset

    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    base = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 200)}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(base[c]) + rng.normal(0, 35, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    torch.manual_seed(0)
    wdir = tmp_path_factory.mktemp("tiny-weights")
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    save_file(model.state_dict(), str(wdir / "model.safetensors"))
    spec = BackboneSpec(name="test/tiny_effnet.rand", family="test", source="timm",
                        arch="test_efficientnet", weights=str(wdir / "model.safetensors"),
                        input_size=32, mean=HALF_MEAN, std=HALF_STD, crop_pct=1.0)
    return load_dataset(root), spec


def _probe(ds, spec):
    from pipeline.backbones import load_backbone
    from pipeline.heads import LinearProbe
    from pipeline.preprocess import load_pixels

    bb = load_backbone(spec)

    def emb(split):
        recs = ds.split(split)
        return bb.embed(np.stack([load_pixels(r.path, spec) for r in recs])), [r.label for r in recs]

    (xt, yt), (xv, yv) = emb("train"), emb("val")
    return LinearProbe(weight_decays=[1e-3, 1e-1], max_iter=100, n_threads=1).fit(xt, yt, xv, yv)


def test_killed_worker_resumes_from_the_last_checkpoint(ray_local, tiny, tmp_path):
    from jobs.finetune import finetune
    from pipeline.finetune import FinetuneConfig, load_finetuned
    from pipeline.preprocess import load_pixels

    ds, spec = tiny
    marker = tmp_path / "killed-once"
    cfg = FinetuneConfig(epochs=3, batch_size=6, lr=5e-3, patience=10, num_threads=1)
    res = finetune(ds, spec, _probe(ds, spec), root=tmp_path / "state", config=cfg, num_workers=2,
                   cpus_per_worker=1, use_gpu=False, max_failures=1, run_name="resume-test",
                   fault={"after_epoch": 1, "marker": str(marker)})
    assert marker.is_file(), "the fault was never injected"
    # attempt 0 ran epochs 0-1 and died after epoch 1's checkpoint; attempt 1 resumed at epoch 2
    assert [a["start_epoch"] for a in res.attempts] == [0, 2] and res.resumed
    assert all(a["world_size"] == 2 for a in res.attempts)
    assert [h["epoch"] for h in res.history] == [0, 1, 2]  # each epoch trained once
    assert all(h["train_images"] == len(ds.split("train")) for h in res.history)  # both shards
    assert res.info["strategy"] == "lora_conv" and res.info["adapter"] == "peft_lora"
    ray_dir = tmp_path / "state" / "ray_results" / "resume-test"
    assert 1 <= len([p for p in ray_dir.glob("checkpoint_*") if p.is_dir()]) <= 2  # num_to_keep=2

    paths = [r.path for r in ds.split("test")]
    probas = []
    for use in ("merged", "adapter"):
        backbone, head = load_finetuned(res.artifacts_dir, use=use)
        x = backbone.embed(np.stack([load_pixels(p, backbone.spec) for p in paths]))
        probas.append(head.predict_proba(x))
    np.testing.assert_allclose(probas[0], probas[1], rtol=1e-4, atol=2e-5)


def test_without_failures_allowed_the_kill_fails_the_run(ray_local, tiny, tmp_path):
    from jobs.finetune import finetune
    from pipeline.finetune import FinetuneConfig

    ds, spec = tiny
    cfg = FinetuneConfig(epochs=2, batch_size=6, num_threads=1)
    with pytest.raises(RuntimeError, match="fine-tuning test/tiny_effnet.rand failed"):
        finetune(ds, spec, _probe(ds, spec), root=tmp_path / "state", config=cfg, num_workers=1,
                 cpus_per_worker=1, use_gpu=False, max_failures=0,
                 fault={"after_epoch": 0, "marker": str(tmp_path / "marker")})


def test_split_finetune_heads():
    from pipeline.sweep.plan import split_finetune_heads
    from pipeline.sweep.plan import HeadConfig

    probes, ft = split_finetune_heads(["linear", "knn", "lora", HeadConfig("full", {"epochs": 2}, "ft2")],
                                      {"lora": {"epochs": 3}})
    assert [h.label for h in probes] == ["linear", "knn"]
    assert [(h.head, h.label, dict(h.params)) for h in ft] == [("lora", "lora", {"epochs": 3}),
                                                               ("full", "ft2", {"epochs": 2})]


# ----------------------------------------------------------------------------- the real one

@pytest.fixture(scope="module")
def cifar_small(cifar10_dir, tmp_path_factory) -> Path:
    """Real CIFAR-10: 40 train + 10 val photos a class (from its train split), 20 test a class."""
    root = tmp_path_factory.mktemp("cifar-ft")
    for cls_dir in sorted((cifar10_dir / "train").iterdir()):
        files = sorted(cls_dir.glob("*.jpg"))
        for split, part in (("train", files[:40]), ("val", files[40:50])):
            (root / split / cls_dir.name).mkdir(parents=True)
            for p in part:
                shutil.copy(p, root / split / cls_dir.name / p.name)
        (root / "test" / cls_dir.name).mkdir(parents=True)
        for p in sorted((cifar10_dir / "test" / cls_dir.name).glob("*.jpg"))[:20]:
            shutil.copy(p, root / "test" / cls_dir.name / p.name)
    return root


def test_lora_on_lite0_beats_its_linear_probe_on_the_same_leaderboard(ray_local, cifar_small, tmp_path):
    from jobs.extract import extract_features
    from jobs.run import build_predictor
    from jobs.sweep import FeatureSetRef, run_sweep
    from jobs.tracking import client
    from pipeline.backbones import get_spec, weights_available
    from pipeline.data import load_dataset
    from pipeline.finetune import read_merged_spec
    from pipeline.predictor import Predictor

    # CIFAR photos are 32 px: 112 px keeps the ImageNet features useful and the test quick
    spec = dataclasses.replace(get_spec(LITE0), input_size=112, crop_pct=1.0)
    ok, why = weights_available(spec)
    if not ok:
        pytest.skip(why)
    ds = load_dataset(cifar_small)
    root = tmp_path / "state"
    store = FeatureStore(root / "features")
    (stats,) = extract_features([(r.sha256, r.path) for r in ds.records], [spec], store=store)
    ref = FeatureSetRef.from_spec(spec, engine=stats.engine, fingerprint=stats.fingerprint)
    lora = {"epochs": 5, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 0.5, "patience": 5,
            "num_workers": 1, "cpus_per_worker": 1}
    sweep = run_sweep(ds, [ref], ["linear", "lora"], root=root, store=store, experiment="ft",
                      run_name="ft-sweep", head_params={"lora": lora}, n_bootstrap=200,
                      hardest_k=4, latency_repeats=2)

    rows = {r["head"]: r for r in sweep.rows}
    assert set(rows) == {"linear", "lora"}, sweep.rows
    lin, ft = rows["linear"], rows["lora"]
    assert lin["status"] == ft["status"] == "FINISHED", ft["error"]
    assert ft["n_test"] == lin["n_test"] == len(ds.split("test")) == 200  # the same test split
    print(f"\nCIFAR-10 subset, Lite0 @112 px, {len(ds.split('test'))} test photos: linear probe accuracy "
          f"{lin['accuracy']:.3f} (balanced {lin['balanced_accuracy']:.3f}), LoRA fine-tune "
          f"{ft['accuracy']:.3f} (balanced {ft['balanced_accuracy']:.3f}), fit {ft['fit_seconds']:.0f} s")
    assert ft["accuracy"] > lin["accuracy"], (ft["accuracy"], lin["accuracy"])
    assert ft["balanced_accuracy"] > lin["balanced_accuracy"]
    # selection: the probe out of fold on train+val, the fine-tune on the validation split
    assert lin["selection_on"].startswith("5-fold CV") and ft["n_selection"] == len(ds.split("val"))
    assert ft["latency_ms_b1"] is not None and ft["params_m"] == pytest.approx(3.37 + 0.0128, abs=0.05)
    # (the winner may still be the probe: a cheaper candidate within the tolerance wins)

    # the child run holds the fine-tune's curves (one step per epoch), plan and artifacts
    c = client()
    run = c.get_run(ft["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == sweep.parent_run_id
    assert run.data.params["finetune.strategy"] == "lora_conv"
    epochs = int(run.data.metrics["epochs_trained"])
    assert epochs >= 2
    assert [m.step for m in c.get_metric_history(ft["run_id"], "val_accuracy")] == list(range(epochs))
    assert [m.step for m in c.get_metric_history(ft["run_id"], "train_loss")] == list(range(epochs))
    arts = {f.path for f in c.list_artifacts(ft["run_id"], "finetune")}
    assert {"finetune/adapter", "finetune/head", "finetune/merged"} <= arts

    # a fine-tuned winner is served through its merged backbone, whose features were re-extracted
    head_dir = Path(sweep.head_dirs[ft["name"]])
    merged = read_merged_spec(json.loads((head_dir.parent / "candidate.json").read_text())["finetune_dir"])
    predictor = build_predictor(ds, store, ft, str(head_dir))
    assert predictor.spec == merged and predictor.spec.input_size == 112
    predictor.save(tmp_path / "predictor")
    served = Predictor.load(tmp_path / "predictor")
    test = ds.split("test")[:12]
    labels = [p.top_k[0]["label"] for p in served.predict_images([r.path for r in test])]
    x = store.get(predictor.info["fingerprint"], [r.sha256 for r in test])
    assert labels == list(predictor.head.predict(x))

    # ... and the serving app loads the fine-tuned champion like any other: registered, served
    # by alias over real HTTP, answering what the in-process predictor answers
    _serve_champion_and_compare(tmp_path / "predictor", served, [r.path for r in test], tmp_path)


def _serve_champion_and_compare(predictor_dir, in_process, paths, tmp_path):
    import httpx
    import mlflow
    from ray import serve

    from deploy.app import build_app
    from jobs.registry import register_predictor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
    from serving_helpers import free_port

    version = register_predictor(predictor_dir, "cifar-ft", alias="champion")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        small = {"ray_actor_options": {"num_cpus": 0.1}}
        serve.run(build_app("cifar-ft@champion", tracking_uri=mlflow.get_tracking_uri(),
                            state_root=str(tmp_path / "serve-state"), poll_interval_s=0,
                            ingress_options=small, backbone_options=small),
                  name="ft", route_prefix="/", blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120.0) as http:
            assert http.get("/readyz").json()["status"] == "ready"
            info = http.get("/v1/model").json()
            assert info["version"] == str(version)
            assert info["input_size"] == 112 and info["backbone"] == in_process.spec.name  # merged spec
            files = [("files", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in paths]
            r = http.post("/v1/predict", files=files)
            assert r.status_code == 200, r.text
            got = [(p["label"], p["decision"]) for p in r.json()["predictions"]]
        want = [(p.label, p.decision) for p in in_process.predict_images(list(paths))]
        assert got == want
    finally:
        serve.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_worker_trains_in_bf16(ray_local, tiny, tmp_path):
    if not ray_local.cluster_resources().get("GPU"):
        pytest.skip("the local Ray sees no GPU")
    from jobs.finetune import finetune
    from pipeline.finetune import FinetuneConfig, load_finetuned
    from pipeline.preprocess import load_pixels

    ds, spec = tiny
    res = finetune(ds, spec, _probe(ds, spec), root=tmp_path / "state", use_gpu=True, num_workers=1,
                   config=FinetuneConfig(epochs=2, batch_size=6, lr=5e-3))
    assert res.use_gpu and res.info["metrics"]["device"].startswith("cuda")
    assert res.info["metrics"]["dtype"] == "bfloat16"
    assert all(h["images_per_s"] > 0 for h in res.history)
    paths = [r.path for r in ds.split("test")]
    probas = []
    for use in ("merged", "adapter"):
        backbone, head = load_finetuned(res.artifacts_dir, use=use)  # back on CPU, float32
        probas.append(head.predict_proba(backbone.embed(np.stack([load_pixels(p, backbone.spec) for p in paths]))))
    np.testing.assert_allclose(probas[0], probas[1], rtol=1e-4, atol=2e-5)
