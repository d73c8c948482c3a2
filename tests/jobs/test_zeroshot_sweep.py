"""Zero-shot and Tip-Adapter end to end from a CLIP folder you already have.

A tiny CLIP (transformers `save_pretrained`: model, tokenizer, image processor) is registered
with `tlpipe backbones add`, then `tlpipe run --backbones NAME --heads zeroshot,tip,linear` runs
on real CIFAR-10 photos (3 classes) with a real embedded Ray and a real MLflow store. The
zero-shot candidate's test accuracy is recomputed independently: the library's own CLIPModel
embeds the test photos and the class prompts, and the prompt-ensemble argmax is scored by hand.
The registered winner then classifies a photo through `tlpipe predict`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models  # noqa: E402
from cifar_subsets import copy_cifar_subset  # noqa: E402

CLASSES = ("airplane", "cat", "ship")
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]


def _dataset(cifar10_dir: Path, base: Path) -> Path:
    full = copy_cifar_subset(cifar10_dir, base / "cifar-all", {"train": 10, "test": 6})
    data = base / "byoclip"
    for split in ("train", "test"):
        for cls in CLASSES:
            (data / split).mkdir(parents=True, exist_ok=True)
            (full / split / cls).rename(data / split / cls)
    return data


def _independent_zero_shot(folder: Path, data: Path, spec) -> tuple[dict[str, str], np.ndarray]:
    """CLIPModel's own image / text features, prompt ensemble, cosine argmax, by hand:
    ({photo sha256: predicted class}, class text embeddings)."""
    import hashlib

    import torch
    import transformers as tf

    from pipeline.preprocess import load_pixels

    model = tf.CLIPModel.from_pretrained(folder).eval()
    tok = tf.AutoTokenizer.from_pretrained(folder)
    paths, labels = [], []
    for i, cls in enumerate(CLASSES):
        for p in sorted((data / "test" / cls).glob("*.jpg")):
            paths.append(p)
            labels.append(i)
    pixels = np.stack([load_pixels(p, spec) for p in paths])
    x = torch.from_numpy(pixels).double() / 255.0
    x = (x - torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=x.float())
        img = getattr(img, "pooler_output", img).double().numpy()
        prompts = [t.format(c) for c in CLASSES for t in TEMPLATES]
        txt = model.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
        txt = getattr(txt, "pooler_output", txt).double().numpy()
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    cls_emb = txt.reshape(len(CLASSES), len(TEMPLATES), -1).mean(axis=1)
    cls_emb /= np.linalg.norm(cls_emb, axis=1, keepdims=True)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    pred = (img @ cls_emb.T).argmax(axis=1)
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert len(set(labels)) == len(CLASSES)
    return {s: CLASSES[k] for s, k in zip(shas, pred)}, cls_emb


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_run_zeroshot_tip_linear_from_a_registered_clip_folder(tmp_path, cifar10_dir, ray_local, monkeypatch):
    from cli.app import app
    from jobs.leaderboard import compare
    from pipeline.backbones import get_spec
    from pipeline.backbones.named import use_state_root
    from pipeline.heads import load_head

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TLPIPE_HOME", raising=False)
    data = _dataset(cifar10_dir, tmp_path)
    folder = tmp_path / "weights" / "tiny-clip"
    tiny_models.save_hf_clip(folder, seed=11, image_size=32, resize=32)
    runner = CliRunner()
    try:
        res = runner.invoke(app, ["backbones", "add", "tinyclip", str(folder), "--root", "state"])
        assert res.exit_code == 0, res.output
        said = " ".join(res.output.split())
        assert "registered clip/tinyclip" in said and "text tower (zero-shot)" in said
        res = runner.invoke(app, ["run", str(data), "--backbones", "tinyclip", "--heads", "zeroshot,tip,linear",
                                  "--set", f"zeroshot.templates={json.dumps(TEMPLATES)}", "--no-ensembles",
                                  "--root", "state"])
        assert res.exit_code == 0, res.output + repr(res.exception)
        spec = get_spec("clip/tinyclip")
    finally:
        use_state_root(None)
    rows = {r["head"]: r for r in compare(tmp_path / "state")}
    assert set(rows) == {"zeroshot", "tip", "linear"}, rows
    for head in ("zeroshot", "tip", "linear"):  # scored on the same selection data
        assert rows[head]["status"] == "FINISHED" and rows[head]["selection_score"] is not None, rows[head]
        assert rows[head]["backbone"] == "clip/tinyclip"
    by_hand, class_emb = _independent_zero_shot(folder, data, spec)
    truth = {s: p.parent.name for p in (data / "test").rglob("*.jpg") for s in [_sha(p)]}
    expected = float(np.mean([by_hand[s] == truth[s] for s in by_hand]))
    assert rows["zeroshot"]["accuracy"] == pytest.approx(expected, abs=1e-9), (rows["zeroshot"], expected)
    (cand,) = (tmp_path / "state" / "sweeps").glob("*/candidates/*_zeroshot")
    preds = json.loads((cand / "test_predictions.json").read_text())
    assert dict(zip(preds["ids"], preds["y_pred"])) == by_hand  # photo by photo
    head = load_head(cand / "head")  # the saved head needs no text tower: the prompts travel as arrays
    np.testing.assert_allclose(head.text_embeddings_, class_emb, rtol=1e-4, atol=1e-5)
    assert list(head.templates) == TEMPLATES and head.text_embedder is None

    # the registered winner serves: an in-process prediction through the CLI
    photo = next((data / "test" / "cat").glob("*.jpg"))
    res = runner.invoke(app, ["predict", str(photo), "--model", "byoclip@challenger", "--root", "state"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert any(c in res.output for c in CLASSES), res.output
