"""The real EfficientNet-Lite0 linear probe on a CIFAR-10 subset, well above its own k-NN."""

from __future__ import annotations

import numpy as np


def test_real_lite0_linear_probe_beats_knn(cifar10_dir):
    from pipeline.backbones import get_spec, load_backbone
    from pipeline.extraction import ChunkEmbedder
    from pipeline.heads import KNN, LinearProbe

    spec = get_spec("efficientnet/tf_efficientnet_lite0.in1k").replace(input_size=96, crop_pct=1.0)
    embed = ChunkEmbedder(load_backbone(spec, engine="onnx"))
    data = {}
    for split, n in (("train", 100), ("test", 50)):
        paths, labels = [], []
        for cls_dir in sorted((cifar10_dir / split).iterdir()):
            files = sorted(cls_dir.glob("*.jpg"))[:n]
            paths += [str(p) for p in files]
            labels += [cls_dir.name] * len(files)
        res = embed(paths)
        assert res.ok.all()
        data[split] = (res.embeddings, np.array(labels))
    (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
    probe = float(np.mean(LinearProbe(seed=0).fit(x_tr, y_tr).predict(x_te) == y_te))
    knn = max(float(np.mean(KNN(k=k).fit(x_tr, y_tr).predict(x_te) == y_te)) for k in (5, 10, 20))
    assert probe >= 0.6, f"linear probe accuracy {probe:.3f} is far below what Lite0 reaches"
    assert probe >= knn + 0.03, f"linear probe {probe:.3f} is not well above the best k-NN {knn:.3f}"
