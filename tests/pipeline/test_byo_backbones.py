"""Bring your own foundation model: a weights folder is a backbone.

Tiny randomly initialised CLIP / SigLIP (transformers), OpenCLIP and timm models are written by
their own libraries' save functions; the spec is derived from the files (model type,
preprocessing, text tower), the backbone loads through the real adapter, and its image and text
embeddings equal the library's own forward pass. Also: names registered in the state root, the
HF hub cache as the environment names it, and the errors for folders that match no format.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.backbones import WeightsUnavailableError, get_spec, list_specs, load_backbone, weights_available
from pipeline.backbones import named
from pipeline.backbones.folders import SIDECAR, FolderFormatError, spec_from_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models  # noqa: E402


def _pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def _normalised(x: np.ndarray, spec):
    import torch

    t = torch.from_numpy(x).float() / 255.0
    return (t - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


def _features(out):
    return getattr(out, "pooler_output", out).numpy()  # transformers 5 may return a model output


@pytest.fixture(autouse=True)
def _own_state_root(tmp_path, monkeypatch):
    """Registered names live in a state root of this test only."""
    monkeypatch.setenv("TLPIPE_HOME", str(tmp_path / "state"))
    named.use_state_root(None)


def test_transformers_clip_folder_spec_embeddings_text_and_fingerprint(tmp_path):
    import torch

    folder = tmp_path / "my-clip"
    model, tok = tiny_models.save_hf_clip(folder, image_size=32, resize=36)
    spec = get_spec(str(folder))
    # derived from config.json (model type) and preprocessor_config.json (size, crop, mean, std)
    assert (spec.name, spec.family, spec.source, spec.arch) == ("clip/my-clip", "clip", "transformers", "clip")
    assert spec.input_size == 32 and spec.crop_pct == pytest.approx(32 / 36) and spec.crop_mode == "center"
    assert spec.mean == tiny_models.CLIP_MEAN and spec.interpolation == "bicubic" and spec.text
    assert get_spec(spec.name) == spec  # the reported name resolves again (sweeps look it up)
    bb = load_backbone(str(folder))
    x = _pixels(6, 32)
    prompts = ["a photo of a cat.", "a photo of a ship."]
    with torch.no_grad():
        ref = _features(model.get_image_features(pixel_values=_normalised(x, spec)))
        ref_t = _features(model.get_text_features(**tok(prompts, padding=True, return_tensors="pt")))
    np.testing.assert_allclose(bb.embed(x), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bb.text_embed(prompts), ref_t, rtol=1e-4, atol=1e-5)
    # the fingerprint covers the weight files' content: same bytes elsewhere -> same key,
    # other weights -> another key
    moved = tmp_path / "copy"
    shutil.copytree(folder, moved)
    assert spec_from_folder(moved).fingerprint == spec.fingerprint
    tiny_models.save_hf_clip(moved, seed=99, image_size=32, resize=36)
    assert spec_from_folder(moved).fingerprint != spec.fingerprint
    # a CLIP folder without tokenizer files: image features only, and the spec says why
    for f in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (moved / f).unlink(missing_ok=True)
    no_text = spec_from_folder(moved)
    assert not no_text.text and "no tokenizer" in no_text.description


def test_transformers_siglip_folder(tmp_path):
    import torch

    folder = tmp_path / "sig"
    model, tok = tiny_models.save_hf_siglip(folder, image_size=32)
    spec = get_spec(str(folder))
    assert (spec.source, spec.arch, spec.family, spec.crop_mode, spec.crop_pct) == \
        ("transformers", "siglip", "siglip", "squash", 1.0)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.text and spec.pooling == "pooler"
    bb = load_backbone(spec)
    x = _pixels(4, 32, seed=1)
    prompts = ["a cat", "a photo of a dog"]
    with torch.no_grad():
        ref = model.vision_model(pixel_values=_normalised(x, spec)).pooler_output.numpy()
        ids = tok(prompts, padding="max_length", max_length=16, return_tensors="pt")
        ref_t = model.text_model(input_ids=ids["input_ids"]).pooler_output.numpy()
    np.testing.assert_allclose(bb.embed(x), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bb.text_embed(prompts), ref_t, rtol=1e-4, atol=1e-5)


def test_open_clip_folder_and_bare_checkpoint_with_sidecar_or_set(tmp_path):
    import open_clip
    import torch

    folder = tmp_path / "oc"
    model = tiny_models.save_open_clip(folder)
    spec = get_spec(str(folder))
    assert (spec.source, spec.family, spec.input_size, spec.text) == ("open_clip", "clip", 32, True)
    x = _pixels(4, 32, seed=2)
    with torch.no_grad():
        ref = model.encode_image(_normalised(x, spec)).numpy()
        ref_t = model.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(["a dog"])).numpy()
    bb = load_backbone(spec)
    np.testing.assert_allclose(bb.embed(x), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bb.text_embed(["a dog"]), ref_t, rtol=1e-4, atol=1e-5)

    # a bare checkpoint: the open_clip model name must come from somewhere
    cfg_dir = tmp_path / "cfgs"
    cfg_dir.mkdir()
    (cfg_dir / "ByoTiny-16.json").write_text(json.dumps(tiny_models.open_clip_cfg()))
    open_clip.add_model_config(cfg_dir)
    bare = tmp_path / "bare"
    bare_model = tiny_models.save_open_clip(bare, seed=5, with_config=False)
    with pytest.raises(FolderFormatError, match=r"not its model name.*--set arch=ViT-B-32"):
        get_spec(str(bare))
    by_set = spec_from_folder(bare, overrides={"arch": "ByoTiny-16"})
    (bare / SIDECAR).write_text(json.dumps({"source": "open_clip", "arch": "ByoTiny-16"}))
    by_sidecar = get_spec(str(bare))
    assert by_set.arch == by_sidecar.arch == "ByoTiny-16" and by_sidecar.source == "open_clip"
    with torch.no_grad():
        ref_bare = bare_model.encode_image(_normalised(x, by_sidecar)).numpy()
    np.testing.assert_allclose(load_backbone(by_sidecar).embed(x), ref_bare, rtol=1e-4, atol=1e-5)


def test_timm_folder_from_save_for_hf(tmp_path):
    import torch

    folder = tmp_path / "vit-t"
    model = tiny_models.save_timm(folder)
    spec = get_spec(str(folder))
    assert (spec.source, spec.arch, spec.family, spec.input_size) == ("timm", "vit_tiny_patch16_224", "vit", 32)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.crop_pct == 1.0 and not spec.text
    x = _pixels(3, 32, seed=3)
    with torch.no_grad():
        ref = model(_normalised(x, spec)).numpy()
    np.testing.assert_allclose(load_backbone(str(folder)).embed(x), ref, rtol=1e-4, atol=1e-5)


def test_folder_matching_no_format_says_what_was_found_and_what_each_needs(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hi")
    (junk / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FolderFormatError) as ei:
        get_spec(str(junk))
    msg = str(ei.value)
    assert "matches no backbone format" in msg and "notes.txt, weights.safetensors" in msg
    assert "save_pretrained(DIR)" in msg and "open_clip_config.json" in msg and "save_for_hf" in msg
    assert "\n" not in msg
    (junk / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FolderFormatError, match="'bert' model, which tlpipe does not embed"):
        get_spec(str(junk))
    with pytest.raises(WeightsUnavailableError, match="does not exist on this machine"):
        get_spec(str(tmp_path / "absent"))
    with pytest.raises(FolderFormatError, match=r"unknown backbone spec field\(s\) \['archh'\]"):
        spec_from_folder(junk, overrides={"archh": "x"})


def test_registered_names_resolve_everywhere_and_say_when_the_folder_is_gone(tmp_path):
    folder = tmp_path / "weights" / "dino-tiny"
    import transformers as tf

    tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(folder)
    spec = named.add("mydino", folder, family="ssl", overrides={"input_size": 32})
    assert spec.name == "ssl/mydino" and spec.input_size == 32 and spec.family == "ssl"
    registry = json.loads((tmp_path / "state" / "backbones.json").read_text())
    assert registry["backbones"]["ssl/mydino"]["path"] == str(folder.resolve())
    assert get_spec("mydino") == get_spec("ssl/mydino") == spec
    assert "ssl/mydino" in [s.name for s in list_specs()]
    assert weights_available("mydino") == (True, "")
    assert load_backbone("mydino").embed(_pixels(2, 32)).shape == (2, 32)
    with pytest.raises(KeyError, match="already registered"):
        named.add("ssl/mydino", folder)
    with pytest.raises(KeyError, match="built-in"):
        named.add("efficientnet/tf_efficientnet_lite0.in1k", folder,
                  reserved=frozenset({"efficientnet/tf_efficientnet_lite0.in1k"}))
    # another machine (or a node without the mount): the name still resolves, the check says why
    shutil.move(str(folder), str(tmp_path / "elsewhere"))
    gone = get_spec("mydino")
    ok, why = weights_available(gone)
    assert not ok and "does not exist on this machine" in why and "tlpipe backbones add NAME DIR" in why
    with pytest.raises(WeightsUnavailableError, match="does not exist on this machine"):
        load_backbone("mydino")
    assert named.remove("mydino") == "ssl/mydino"
    with pytest.raises(KeyError, match="unknown backbone 'mydino'.*tlpipe backbones add NAME DIR"):
        get_spec("mydino")

    # a folder passed by path whose default name is registered for another folder gets its own name
    a, b = tmp_path / "a" / "d2", tmp_path / "b" / "d2"
    for d in (a, b):
        shutil.copytree(tmp_path / "elsewhere", d)
    assert named.add("d2", a).name == "dinov2/d2"
    by_path = get_spec(str(b))
    assert by_path.name.startswith("dinov2/d2.p") and get_spec(by_path.name).weights == str(b.resolve())
    assert get_spec("d2").weights == str(a.resolve())
    # a registered folder that stops reading as a backbone: listed (with why), refused when used
    (a / "config.json").write_text("{not json")
    listed = {s.name: s for s in list_specs()}
    assert "no longer reads as a backbone" in listed["dinov2/d2"].description
    with pytest.raises(FolderFormatError, match="cannot read"):
        get_spec("d2")


def _hub_layout(cache: Path, repo_id: str, src: Path, commit: str = "c0ffee" * 6 + "abcd") -> None:
    """`src`'s files laid out as huggingface_hub lays out its cache (blobs, refs, snapshots)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)


@pytest.mark.parametrize("variable", ["HF_HOME", "HF_HUB_CACHE"])
def test_hub_cache_named_by_the_environment_and_offline_mode(tmp_path, monkeypatch, variable):
    import transformers as tf

    src = tmp_path / "src"
    tf.ConvNextModel(tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)).save_pretrained(src)
    home = tmp_path / "hf"
    _hub_layout(home / "hub" if variable == "HF_HOME" else home, "facebook/convnext-tiny-224", src)
    name = "convnext/convnext_tiny_224.hf_in1k"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    ok, why = weights_available(name)
    assert not ok and "hf download facebook/convnext-tiny-224" in why and "tlpipe backbones add NAME DIR" in why
    monkeypatch.setenv(variable, str(home))  # set after import: read at call time
    assert weights_available(name) == (True, "")
    spec = get_spec(name).replace(input_size=32)
    assert "c0ffee" in spec.fingerprint_payload()["weights"]  # the snapshot commit keys the features
    assert load_backbone(spec).embed(_pixels(2, 32)).shape == (2, 16)
    # offline mode: a download the caller allows is still never attempted
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="not on this machine"):
        load_backbone("dinov2/vit_small_patch14.lvd142m", allow_download=True)
