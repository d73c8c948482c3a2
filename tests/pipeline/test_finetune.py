"""pipeline.finetune on tiny randomly initialised models saved in their library's own format and
loaded back through `pipeline.backbones` (no Ray, no downloads): target plans per family, the head
folded from a linear probe, augmentations, checkpoints that resume bit-for-bit, early stopping,
and the artifact round trip (adapter + head, merged + head) giving identical predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.backbones import BackboneSpec, load_backbone
from pipeline.backbones.spec import CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD
from pipeline.finetune import (
    BatchMixer,
    FinetuneConfig,
    Finetuner,
    ImageFileDataset,
    TrainTransform,
    build_model,
    eval_loader,
    find_stages,
    fit_local,
    head_init_from_probe,
    load_checkpoint,
    load_finetuned,
    plan_targets,
    predict_logits,
    probe_from_linear,
    read_finetune_info,
    read_merged_spec,
    save_artifacts,
    save_checkpoint,
    steps_per_epoch,
    train_decode_spec,
    train_loader,
)
from pipeline.heads import LinearProbe, load_head
from pipeline.preprocess import load_pixels

CLASSES = ["blue", "green", "red"]
SIZE = 32


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: one intra-op thread is fastest, and this runner's 2 cores are shared
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiny_effnet(folder: Path) -> BackboneSpec:
    """timm's test_efficientnet (the EfficientNet graph: stages of depthwise-separable / inverted
    residual blocks + conv_head, 0.1 M params), random weights, as a state-dict file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    return BackboneSpec(name="test/tiny_effnet.rand", family="test", source="timm",
                        arch="test_efficientnet", weights=str(folder / "model.safetensors"),
                        input_size=SIZE, mean=HALF_MEAN, std=HALF_STD, crop_pct=1.0)


def _tiny_vit(folder: Path) -> BackboneSpec:
    import timm
    from safetensors.torch import save_file

    kw = {"img_size": SIZE, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kw).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(folder / "vit.safetensors"))
    return BackboneSpec(name="test/tiny_vit.rand", family="test", source="timm",
                        arch="vit_tiny_patch16_224", weights=str(folder / "vit.safetensors"),
                        input_size=SIZE, crop_pct=1.0, model_kwargs=kw)


def _tiny_dinov2(folder: Path) -> BackboneSpec:
    import transformers as tf

    torch.manual_seed(2)
    cfg = tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, image_size=SIZE, patch_size=8)
    tf.Dinov2Model(cfg).eval().save_pretrained(folder)
    return BackboneSpec(name="dinov2/tiny.rand", family="dinov2", source="transformers", arch="dinov2",
                        weights=str(folder), input_size=SIZE, crop_pct=1.0, pooling="cls")


def _tiny_open_clip(folder: Path) -> BackboneSpec:
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(3)
    model = CLIP(**cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg, "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}))
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return BackboneSpec(name="clip/tiny.rand", family="clip", source="open_clip", arch="ViT-B-32",
                        weights=str(folder), input_size=SIZE, mean=CLIP_MEAN, std=CLIP_STD,
                        crop_pct=1.0, text=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[tuple[str, int]]]:
    """Tiny PNGs per split: the class is the dominant colour, with noise and a random square."""
    root = tmp_path_factory.mktemp("ft-images")
    rng = np.random.default_rng(0)
    base = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 200)}
    out: dict[str, list[tuple[str, int]]] = {}
    for split, n in (("train", 16), ("val", 6), ("test", 6)):
        out[split] = []
        for ci, c in enumerate(CLASSES):
            for i in range(n):
                arr = np.clip(np.array(base[c]) + rng.normal(0, 35, (40, 44, 3)), 0, 255).astype(np.uint8)
                y, x = rng.integers(0, 28, 2)
                arr[y:y + 12, x:x + 12] = rng.integers(0, 256, 3)
                p = root / f"{split}_{c}_{i}.png"
                Image.fromarray(arr).save(p)
                out[split].append((str(p), ci))
    return out


@pytest.fixture(scope="module")
def cnn_spec(tmp_path_factory) -> BackboneSpec:
    return _tiny_effnet(tmp_path_factory.mktemp("effnet"))


def _embed(spec, paths):
    bb = load_backbone(spec, engine="torch")
    return bb.embed(np.stack([load_pixels(p, spec) for p in paths]))


def _probe(spec, images) -> LinearProbe:
    tr, va = images["train"], images["val"]
    return LinearProbe(weight_decays=[1e-3, 1e-2], max_iter=100, n_threads=1).fit(
        _embed(spec, [p for p, _ in tr]), [CLASSES[c] for _, c in tr],
        _embed(spec, [p for p, _ in va]), [CLASSES[c] for _, c in va])


def _sets(spec, images, cfg):
    s = spec.replace(input_size=cfg.input_size) if cfg.input_size else spec
    tr = ImageFileDataset([p for p, _ in images["train"]], [c for _, c in images["train"]],
                          train_decode_spec(s), transform=TrainTransform(s.input_size, scale=cfg.scale))
    va = ImageFileDataset([p for p, _ in images["val"]], [c for _, c in images["val"]], s)
    te = ImageFileDataset([p for p, _ in images["test"]], [c for _, c in images["test"]], s)
    return tr, va, te


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


# ----------------------------------------------------------------------------- target plans

def test_plans_per_family(tmp_path, cnn_spec):
    cfg = FinetuneConfig()
    cnn = load_backbone(cnn_spec).torch_module()
    plan = plan_targets(cnn, cfg)
    assert plan.strategy == "lora_conv"
    named = dict(cnn.named_modules())
    stages = find_stages(cnn)
    assert stages == [f"model.blocks.{i}" for i in range(len(cnn.model.blocks))]
    assert "model.conv_head" in plan.lora_modules
    assert all(n.startswith((*stages[-2:], "model.conv_head")) for n in plan.lora_modules)
    assert all(named[n].groups == 1 for n in plan.lora_modules)  # depthwise convs cannot merge
    assert any(n.endswith("conv_pwl") for n in plan.lora_modules)
    assert "model.classifier" not in plan.lora_modules

    fallback = plan_targets(cnn, cfg.replace(cnn_lora=False))
    assert fallback.strategy == "unfreeze_last_stages" and not fallback.lora_modules
    assert fallback.unfrozen[:2] == tuple(stages[-2:]) and "cnn_lora=False" in fallback.note
    assert plan_targets(cnn, cfg.replace(method="full")).strategy == "full"

    vit = load_backbone(_tiny_vit(tmp_path / "vit")).torch_module()
    p = plan_targets(vit, cfg)
    assert p.strategy == "lora_attention" and p.lora_modules == ("model.blocks.0.attn.qkv", "model.blocks.1.attn.qkv")
    dino = load_backbone(_tiny_dinov2(tmp_path / "dino")).torch_module()
    p = plan_targets(dino, cfg)
    assert p.strategy == "lora_attention"
    # transformers 5 names them q_proj / k_proj / v_proj (4.x: query / key / value)
    assert sorted({n.rsplit(".", 1)[-1] for n in p.lora_modules}) in (["k_proj", "q_proj", "v_proj"],
                                                                       ["key", "query", "value"])
    assert len(p.lora_modules) == 6
    with pytest.raises(ValueError, match="target_modules"):
        plan_targets(dino, cfg.replace(target_modules=("no_such_layer",)))
    assert plan_targets(dino, cfg.replace(target_modules=("fc1",))).strategy == "lora_explicit"


# ----------------------------------------------------------------------------- head from the probe

def test_head_folds_the_probe_standardisation():
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 5.0, (60, 8)).astype(np.float32)
    y = np.array(CLASSES)[rng.integers(0, 3, 60)]
    probe = LinearProbe(weight_decays=[1e-2], n_threads=1).fit(X, y)
    init = head_init_from_probe(probe)
    assert init.classes == CLASSES
    lin = init.to_linear()
    with torch.no_grad():
        logits = lin(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(logits, probe.decision_function(X), rtol=1e-4, atol=1e-4)
    head = probe_from_linear(init.weight, init.bias, init.classes)
    np.testing.assert_allclose(head.predict_proba(X), probe.predict_proba(X), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="LinearProbe"):
        head_init_from_probe(object())


def test_config_round_trip_and_validation():
    cfg = FinetuneConfig(method="full", mixup_alpha=0.2, target_modules=["qkv"], input_size=64)
    assert FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.norm_frozen is False and FinetuneConfig().norm_frozen is True and cfg.mixing
    for bad in ({"method": "adapter"}, {"monitor": "f1"}, {"scale": (0.0, 1.0)}, {"epochs": 0}):
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)


# ----------------------------------------------------------------------------- augmentations

def test_augmentations():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 40, 50), dtype=np.uint8))
    t = TrainTransform(24, scale=(0.3, 1.0))
    torch.manual_seed(0)
    a = t(img)
    assert a.dtype == torch.uint8 and a.shape == (3, 24, 24)
    torch.manual_seed(0)
    assert torch.equal(a, t(img))  # seeded -> reproducible
    with pytest.raises(TypeError, match="uint8"):
        t(img.float())

    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 3
    for kw in ({"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}):
        xm, target = BatchMixer(3, seed=1, **kw)(x, y)
        assert xm.shape == x.shape and target.shape == (8, 3)
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        assert (target.max(1).values < 1).any()  # labels really mixed
        xm2, target2 = BatchMixer(3, seed=1, **kw)(x, y)
        assert torch.equal(xm, xm2) and torch.equal(target, target2)
    _, off = BatchMixer(3, mixup_alpha=0.4, prob=0.0)(x, y)
    assert torch.equal(off, torch.nn.functional.one_hot(y, 3).float())


# ----------------------------------------------------------------------------- training

def test_epoch_zero_predicts_like_the_probe(cnn_spec, images):
    probe = _probe(cnn_spec, images)
    cfg = FinetuneConfig(epochs=1, batch_size=8)
    model, plan, tspec = build_model(cnn_spec, head_init_from_probe(probe), cfg)
    _, _, te = _sets(cnn_spec, images, cfg)
    logits = predict_logits(model, eval_loader(te, batch_size=8))
    X = _embed(cnn_spec, [p for p, _ in images["test"]])
    np.testing.assert_allclose(_softmax(logits), probe.predict_proba(X), atol=1e-4)
    assert tspec.embed_dim == probe.n_features_in_ and plan.strategy == "lora_conv"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(cnn_spec, images, tmp_path):
    probe = _probe(cnn_spec, images)
    cfg = FinetuneConfig(epochs=2, batch_size=8, lr=3e-3, mixup_alpha=0.2, patience=5)
    tr, va, _ = _sets(cnn_spec, images, cfg)

    def fresh():
        torch.manual_seed(cfg.seed)
        model, _, _ = build_model(cnn_spec, head_init_from_probe(probe), cfg)
        return model, Finetuner(model, cfg, steps_per_epoch=steps_per_epoch(len(tr), cfg.batch_size))

    def run_epoch(ft):
        from pipeline.finetune import epoch_seed

        torch.manual_seed(epoch_seed(cfg.seed, ft.epoch))
        tm = ft.train_epoch(train_loader(tr, batch_size=cfg.batch_size, epoch=ft.epoch, seed=cfg.seed))
        return ft.end_epoch(tm, ft.evaluate(eval_loader(va, batch_size=16)))

    m1, ft1 = fresh()
    run_epoch(ft1)
    run_epoch(ft1)

    m2, ft2 = fresh()
    run_epoch(ft2)
    save_checkpoint(tmp_path / "ckpt", ft2)
    assert (tmp_path / "ckpt" / "state.safetensors").is_file()
    m3, ft3 = fresh()  # a new process would start like this
    meta = load_checkpoint(tmp_path / "ckpt", ft3)
    assert meta["epoch"] == ft3.epoch == 1 and ft3.global_step == ft2.global_step
    run_epoch(ft3)
    for (k, a), b in zip(ft1.trainable_state().items(), ft3.trainable_state().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert [h["train_loss"] for h in ft1.history] == pytest.approx([h["train_loss"] for h in ft3.history],
                                                                  rel=1e-5)


def test_early_stopping_keeps_the_best_epoch(cnn_spec, images):
    probe = _probe(cnn_spec, images)
    # an absurd learning rate makes validation worse after the first epoch
    cfg = FinetuneConfig(epochs=8, batch_size=16, lr=0.5, warmup_epochs=0, patience=2, monitor="val_loss",
                         grad_clip=None)
    tr, va, _ = _sets(cnn_spec, images, cfg)
    model, _, _ = build_model(cnn_spec, head_init_from_probe(probe), cfg)
    ft = fit_local(model, cfg, tr, va)
    assert ft.stopped_early and len(ft.history) < cfg.epochs
    best = min(ft.history, key=lambda h: h["val_loss"])
    assert ft.best_epoch == best["epoch"] and ft.bad_epochs == cfg.patience
    assert ft.evaluate(eval_loader(va, batch_size=16))["val_loss"] == pytest.approx(best["val_loss"], rel=1e-4)


# ----------------------------------------------------------------------------- artifacts round trip

def _round_trip(spec, images, tmp_path, cfg, *, adapter: str | None):
    probe = _probe(spec, images)
    model, plan, tspec = build_model(spec, head_init_from_probe(probe), cfg)
    tr, va, te = _sets(spec, images, cfg)
    ft = fit_local(model, cfg, tr, va)
    logits = predict_logits(model, eval_loader(te, batch_size=8))
    expected = _softmax(logits.astype(np.float64))
    out = tmp_path / "ft"
    info = save_artifacts(out, model, plan=plan, cfg=cfg, base_spec=tspec, classes=CLASSES,
                          history=ft.history)
    assert info["adapter"] == adapter and read_finetune_info(out)["strategy"] == plan.strategy
    paths = [p for p, _ in images["test"]]

    mspec = read_merged_spec(out)
    assert mspec.fingerprint != tspec.fingerprint and mspec.weights == str((out / "merged" / "weights").resolve())
    for use in (("merged", "adapter") if adapter else ("merged",)):
        backbone, head = load_finetuned(out, use=use)
        assert list(head.classes_) == CLASSES  # the head comes back with the backbone
        X = backbone.embed(np.stack([load_pixels(p, backbone.spec) for p in paths]))
        np.testing.assert_allclose(head.predict_proba(X), expected, rtol=1e-4, atol=2e-5, err_msg=use)
    # the merged model is an ordinary backbone: load_backbone + the saved head, nothing else
    X = load_backbone(read_merged_spec(out)).embed(np.stack([load_pixels(p, mspec) for p in paths]))
    np.testing.assert_allclose(load_head(out / "head").predict_proba(X), expected, rtol=1e-4, atol=2e-5)
    # and it moves: the folder is self-contained
    moved = tmp_path / "moved"
    out.rename(moved)
    np.testing.assert_allclose(load_finetuned(moved)[1].predict_proba(X), expected, rtol=1e-4, atol=2e-5)
    return info, ft, moved


def test_lora_cnn_round_trip_adapter_and_merged(cnn_spec, images, tmp_path):
    cfg = FinetuneConfig(epochs=2, batch_size=8, lr=5e-3, cutmix_alpha=1.0, mix_prob=0.5)
    info, ft, out = _round_trip(cnn_spec, images, tmp_path, cfg, adapter="peft_lora")
    assert info["strategy"] == "lora_conv" and len(ft.history) == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert info["adapter_bytes"] * 4 < info["merged_bytes"]  # the adapter alone is small
    assert info["trainable_params"] < info["backbone_params"] / 5


def test_unfrozen_stage_fallback_round_trip(cnn_spec, images, tmp_path):
    cfg = FinetuneConfig(epochs=1, batch_size=8, lr=1e-3, cnn_lora=False, cnn_last_stages=1)
    info, _, out = _round_trip(cnn_spec, images, tmp_path, cfg, adapter="unfrozen_stages")
    assert info["strategy"] == "unfreeze_last_stages"
    assert (out / "adapter" / "unfrozen.safetensors").is_file()


def test_full_finetune_trains_batchnorm_and_has_no_adapter(cnn_spec, images, tmp_path):
    cfg = FinetuneConfig(method="full", epochs=1, batch_size=8, lr=1e-3)
    before = load_backbone(cnn_spec).torch_module().state_dict()["model.bn2.running_mean"].clone()
    info, _, out = _round_trip(cnn_spec, images, tmp_path, cfg, adapter=None)
    after = load_backbone(read_merged_spec(out)).torch_module().state_dict()["model.bn2.running_mean"]
    assert not torch.allclose(before, after)  # BatchNorm statistics trained and saved
    with pytest.raises(ValueError, match="use='merged'"):
        load_finetuned(out, use="adapter")


def test_vit_lora_round_trip_timm_and_transformers(images, tmp_path):
    cfg = FinetuneConfig(epochs=1, batch_size=8, lr=5e-3, lora_r=4)
    info, _, _ = _round_trip(_tiny_vit(tmp_path / "vit"), images, tmp_path / "a", cfg, adapter="peft_lora")
    assert info["strategy"] == "lora_attention"
    info, _, _ = _round_trip(_tiny_dinov2(tmp_path / "dino"), images, tmp_path / "b", cfg, adapter="peft_lora")
    assert info["merged_spec"]["source"] == "transformers"


def test_open_clip_lora_on_multihead_attention(images, tmp_path):
    cfg = FinetuneConfig(epochs=1, batch_size=8, lr=5e-3, lora_r=4)
    info, _, out = _round_trip(_tiny_open_clip(tmp_path / "oc"), images, tmp_path / "a", cfg,
                               adapter="peft_lora")
    assert info["strategy"] == "lora_attention"
    assert all(n.endswith(".attn") for n in info["plan"]["lora_modules"])
    spec = read_merged_spec(out)
    assert spec.source == "open_clip" and not spec.text and (Path(spec.weights) / "open_clip_config.json").is_file()
