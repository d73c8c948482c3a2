"""ONNX fast path: export with normalisation fused (uint8 in), cache by fingerprint, ORT agrees with torch."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from pipeline.backbones import get_spec, load_backbone  # noqa: E402
from pipeline.backbones.onnx_runtime import OnnxBackbone, load_onnx_backbone, onnx_path  # noqa: E402

LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _photos(spec, n: int) -> np.ndarray:
    """Real-looking inputs: crops of scikit-image sample photos through `prepare` (random noise if absent)."""
    from PIL import Image

    from pipeline.preprocess import prepare

    try:
        from skimage import data

        sources = [data.coffee(), data.astronaut(), data.chelsea(), data.rocket()]
    except ImportError:  # pragma: no cover
        rng = np.random.default_rng(0)
        sources = [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for _ in range(4)]
    out = []
    for i in range(n):
        arr = sources[i % len(sources)]
        h, w = arr.shape[:2]
        k = i // len(sources)
        crop = arr[k * 7: h - k * 5, k * 11: w - k * 3]
        out.append(prepare(Image.fromarray(crop), spec))
    return np.stack(out)


@pytest.fixture(scope="module")
def lite0_torch():
    return load_backbone(LITE0, engine="torch")


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


def test_lite0_onnx_matches_torch_and_is_cached(lite0_torch, onnx_cache, monkeypatch):
    tmp_path = onnx_cache
    spec = lite0_torch.spec
    ob = load_onnx_backbone(spec, cache_dir=tmp_path, torch_backbone=lite0_torch, intra_op_num_threads=2)
    assert isinstance(ob, OnnxBackbone) and ob.engine == "onnx"
    assert ob.path == onnx_path(spec, tmp_path) and ob.path.is_file()
    assert ob.path.name.startswith(spec.fingerprint_for("onnx", "float32"))
    assert ob.fingerprint == spec.fingerprint_for("onnx", "float32") != lite0_torch.fingerprint
    assert ob.intra_op_num_threads == 2 and ob.embed_dim == 1280

    # the graph takes uint8 pixels with a dynamic batch axis; normalisation is inside
    import onnx

    model = onnx.load(str(ob.path))
    inp = model.graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    meta = json.loads(ob.path.with_suffix(".json").read_text())
    assert meta["fingerprint"] == ob.fingerprint and meta["spec"]["embed_dim"] == 1280

    x = _photos(spec, 6)
    a, b = lite0_torch.embed(x), ob.embed(x)
    assert b.shape == (6, 1280) and b.dtype == np.float32
    assert _cos_rows(a, b).min() >= 0.999
    for n in (1, 5):  # dynamic batch
        assert _cos_rows(lite0_torch.embed(x[:n]), ob.embed(x[:n])).min() >= 0.999

    # a second load reuses the cached file without touching torch
    import pipeline.backbones.loader as loader

    def boom(*a, **k):
        raise AssertionError("torch backbone loaded although the ONNX file is cached")

    monkeypatch.setattr(loader, "load_torch_backbone", boom)
    again = load_backbone(LITE0, engine="onnx", cache_dir=tmp_path, intra_op_num_threads=1)
    assert isinstance(again, OnnxBackbone) and again.path == ob.path and again.spec.embed_dim == 1280
    np.testing.assert_array_equal(again.embed(x[:2]), ob.embed(x[:2]))


def test_changed_spec_gets_a_new_onnx_file(lite0_torch, tmp_path):
    spec = lite0_torch.spec
    assert onnx_path(spec.replace(mean=(0.4, 0.5, 0.5)), tmp_path) != onnx_path(spec, tmp_path)
    assert onnx_path(spec.replace(input_size=192), tmp_path) != onnx_path(spec, tmp_path)


def test_auto_engine_on_cpu_runs_the_exported_graph(onnx_cache):
    from pipeline.backbones.onnx_runtime import ExportedGraphBackbone
    from pipeline.backbones.registry import default_cpu_engine

    bb = load_backbone(LITE0, engine="auto", cache_dir=onnx_cache)  # reuses the export above
    assert isinstance(bb, ExportedGraphBackbone) and bb.engine == default_cpu_engine() != "torch"
    # classify is delegated to torch (lazily) for models with a head
    from PIL import Image

    from pipeline.preprocess import prepare

    skimage_data = pytest.importorskip("skimage.data")
    x = prepare(Image.fromarray(skimage_data.coffee()), bb.spec)
    assert int(bb.classify(x).argmax()) == 967
    with pytest.raises(ValueError, match="engine"):
        load_backbone(LITE0, engine="tensorrt")


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_tiny_vit_graph_engines_match_torch(tmp_path, engine):
    if engine == "openvino":
        pytest.importorskip("openvino")
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8)
    tf.Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    spec = get_spec("dinov2/vit_small_patch14.lvd142m").replace(weights=str(tmp_path / "dino"), input_size=32)
    tb = load_backbone(spec, engine="torch")
    ob = load_backbone(spec, engine=engine, cache_dir=tmp_path / "cache")
    assert ob.engine == engine
    x = np.random.default_rng(1).integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    a, b = tb.embed(x), ob.embed(x)
    assert b.shape == a.shape == (7, 32)
    assert _cos_rows(a, b).min() >= 0.999
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    # editing the local weights changes the fingerprint, hence the cache file
    (tmp_path / "dino" / "config.json").write_text((tmp_path / "dino" / "config.json").read_text() + "\n")
    assert onnx_path(spec, tmp_path / "cache") != ob.path


def test_tiny_clip_onnx_keeps_text_in_torch(tmp_path):
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    from pipeline.backbones.spec import CLIP_MEAN, CLIP_STD

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(1)
    d = tmp_path / "oc"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(CLIP(**cfg).state_dict(), d / "open_clip_model.safetensors")
    spec = get_spec("clip/vit_base_patch32.laion2b_s34b_b79k").replace(weights=str(d), input_size=32)
    assert spec.mean == CLIP_MEAN and spec.std == CLIP_STD
    tb = load_backbone(spec, engine="torch")
    ob = load_backbone(spec, engine="onnx", cache_dir=tmp_path / "cache")
    x = np.random.default_rng(2).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    assert _cos_rows(tb.embed(x), ob.embed(x)).min() >= 0.999
    # nn.MultiheadAttention's fast path is switched off for export, so the quick exporter handles it
    assert json.loads(ob.path.with_suffix(".json").read_text())["exporter"] == "torchscript"
    assert ob.supports_text
    np.testing.assert_allclose(ob.text_embed(["a cat"]), tb.text_embed(["a cat"]), rtol=1e-5, atol=1e-6)


def test_auto_falls_back_to_torch_when_export_fails(tmp_path, monkeypatch, caplog):
    import pipeline.backbones.onnx_runtime as ort_mod
    from pipeline.backbones.torch_base import TorchBackbone

    def broken_export(*a, **k):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(ort_mod, "export_onnx", broken_export)
    with caplog.at_level("WARNING"):
        bb = load_backbone(LITE0, engine="auto", cache_dir=tmp_path / "fresh")
    assert isinstance(bb, TorchBackbone)
    assert "export failed" in caplog.text and "using eager torch" in caplog.text
    with pytest.raises(RuntimeError, match="unsupported op"):
        load_backbone(LITE0, engine="onnx", cache_dir=tmp_path / "fresh")  # explicit onnx: no silent fallback
    with pytest.raises(ValueError, match="float32"):
        load_backbone(LITE0, engine="onnx", dtype="bfloat16")


def test_export_is_verified_before_it_is_published(tmp_path):
    """A graph that traces fine but bakes the batch size in must not land in the cache."""
    import torch
    from torch import nn

    from pipeline.backbones import BackboneSpec
    from pipeline.backbones.onnx_runtime import export_onnx
    from pipeline.backbones.torch_base import TorchBackbone

    class BakesBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 4)

        def forward(self, x):
            n = float(x.shape[0])  # a Python number: the tracer records it as a constant (2)
            sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
            return self.proj(x.mean(dim=(2, 3))) + (n - 2.5) * 10.0 * sign

    spec = BackboneSpec(name="test/bakes_batch.x", family="test", source="timm", arch="bakes_batch",
                        weights=str(tmp_path / "none"), input_size=16)
    bb = TorchBackbone(spec, BakesBatch())
    target = tmp_path / "out" / "m.onnx"
    with pytest.raises(RuntimeError, match="disagrees with torch"):
        export_onnx(bb, target)
    assert not target.exists() and not list(target.parent.glob("*.tmp*"))
