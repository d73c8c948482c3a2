"""Multi-label intake on real photos (CIFAR-10 mosaics): CSV / JSONL / Hugging Face sources,
the card's label statistics, iterative stratification, and the metrics against scikit-learn."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from pipeline.data import DatasetCard, DatasetError, load_dataset
from tests.multilabel_mosaics import build_mosaics, read_manifest


@pytest.fixture(scope="module")
def mosaics(cifar10_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mosaics")
    manifest = build_mosaics(cifar10_dir, root, 120, seed=0)
    return manifest, read_manifest(manifest)


def _by_path(ds):
    return {r.path: r for r in ds.records}


def test_csv_labels_column_is_detected_with_card_statistics(mosaics, tmp_path):
    manifest, rows = mosaics
    # two images without any label (an empty labels cell is a negative for every label)
    extra = tmp_path / "m"
    shutil.copytree(manifest.parent, extra)
    for i, name in enumerate(("blank0.jpg", "blank1.jpg")):
        Image.new("RGB", (64, 64), (20 + 100 * i, 90, 200)).save(extra / "images" / name)
    (extra / "manifest.csv").write_text(manifest.read_text() + "images/blank0.jpg,\nimages/blank1.jpg,\n")

    ds = load_dataset(extra / "manifest.csv", seed=0, cache_dir=tmp_path / "cache")
    assert ds.multi_label and ds.card.multi_label
    assert ds.classes == sorted({lab for _, labs in rows for lab in labs})
    got = {r.path.replace(str(extra), str(manifest.parent)): r for r in ds.records}
    for path, labs in rows:
        r = got[path]
        assert r.labels == tuple(sorted(labs)) and r.label == "|".join(sorted(labs))
    card = ds.card
    assert card.n_images == 122 and sum(card.image_counts.values()) == 122
    assert sum(card.unlabelled.values()) == 2
    sets = [labs for _, labs in rows] + [(), ()]
    assert card.label_cardinality == pytest.approx(sum(map(len, sets)) / 122)
    pairs = Counter(p for labs in sets for p in combinations(sorted(labs), 2))
    top = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert card.cooccurrence == [[a, b, k] for (a, b), k in top]
    per_label = Counter(lab for labs in sets for lab in labs)
    assert {c: card.class_total(c) for c in card.classes} == dict(per_label)
    # the indicator matrix matches the records, and the card survives JSON
    M = ds.label_matrix()
    assert M.shape == (122, 10) and M.sum() == sum(per_label.values())
    back = DatasetCard.from_json(card.to_json())
    assert back.to_dict() == card.to_dict() and back.to_dict()["card_version"] == 2
    from rich.console import Console
    Console(width=120, file=open("/dev/null", "w")).print(card.render())


def test_jsonl_lists_and_forced_separator_give_the_same_sets(cifar10_dir, tmp_path):
    jl = build_mosaics(cifar10_dir, tmp_path / "j", 40, seed=3, fmt="jsonl")
    ds = load_dataset(jl, seed=0)
    assert ds.multi_label
    want = {p: tuple(sorted(labs)) for p, labs in read_manifest(jl)}
    assert {r.path: r.labels for r in ds.records} == want

    # `label` column, ';' separator: single-label unless forced (then split on the separator)
    cs = build_mosaics(cifar10_dir, tmp_path / "c", 40, seed=3, separator=";")
    cs.write_text(cs.read_text().replace("path,labels", "path,label", 1))
    single = load_dataset(cs, seed=0)
    assert not single.multi_label and any(";" in c for c in single.classes)
    forced = load_dataset(cs, seed=0, multi_label=True, label_separator=";")
    assert forced.multi_label
    assert sorted(r.labels for r in forced.records) == sorted(want.values())

    # multi_label=False refuses label lists, saying how to fix it
    with pytest.raises(DatasetError, match="multi_label=True"):
        load_dataset(jl, multi_label=False)


def test_hf_sequence_of_classlabel(cifar10_dir, tmp_path):
    import datasets

    manifest = build_mosaics(cifar10_dir, tmp_path / "src", 30, seed=5)
    rows = read_manifest(manifest)
    names = sorted({lab for _, labs in rows for lab in labs})
    features = datasets.Features({"image": datasets.Image(),
                                  "labels": datasets.Sequence(datasets.ClassLabel(names=names))})
    hf = datasets.Dataset.from_dict(
        {"image": [p for p, _ in rows], "labels": [[names.index(lab) for lab in labs] for _, labs in rows]},
        features=features)
    hf.save_to_disk(str(tmp_path / "hf"))
    ds = load_dataset(tmp_path / "hf", seed=0, cache_dir=tmp_path / "cache")
    assert ds.multi_label and ds.card.source_kind == "hf_disk"
    assert sorted(r.labels for r in ds.records) == sorted(tuple(sorted(labs)) for _, labs in rows)
    with pytest.raises(DatasetError, match="multi_label=True"):
        load_dataset(tmp_path / "hf", multi_label=False, cache_dir=tmp_path / "cache")


def test_iterative_split_keeps_every_label_in_every_split_and_ignores_order(mosaics, tmp_path):
    manifest, _ = mosaics
    ds = load_dataset(manifest, seed=7, val_fraction=0.15, test_fraction=0.15)
    assert ds.card.split_strategy == "iterative-stratified"
    for split in ("train", "val", "test"):
        assert all(ds.card.counts[split][c] > 0 for c in ds.classes), (split, ds.card.counts[split])
        share = ds.card.image_counts[split] / len(ds)
        assert share == pytest.approx({"train": 0.7, "val": 0.15, "test": 0.15}[split], abs=0.05)
    # the same files listed in another order get the same split
    lines = manifest.read_text().splitlines()
    body = lines[1:]
    random.Random(1).shuffle(body)
    shuffled = manifest.parent / "shuffled.csv"
    shuffled.write_text("\n".join([lines[0], *body]) + "\n")
    again = load_dataset(shuffled, seed=7, val_fraction=0.15, test_fraction=0.15)
    assert {r.sha256: r.split for r in again.records} == {r.sha256: r.split for r in ds.records}
    assert again.card.dataset_hash == ds.card.dataset_hash


def test_rare_labels_reach_every_split():
    from pipeline.multilabel.stratify import iterative_folds, iterative_stratify

    rng = np.random.default_rng(0)
    Y = (rng.random((400, 12)) < 0.25).astype(np.uint8)
    Y[:, 10] = 0
    Y[[3, 50, 97, 200], 10] = 1          # 4 images: one per held-out split at least
    Y[:, 11] = 0
    Y[[5, 6], 11] = 1                    # 2 images: cannot be in all three splits
    a = iterative_stratify(Y, [0.7, 0.15, 0.15], seed=0)
    for j in range(3):
        assert (Y[a == j, :11].sum(0) > 0).all()
    assert np.bincount(a, minlength=3).tolist() == pytest.approx([280, 60, 60], abs=6)
    folds = iterative_folds(Y, 5, seed=0)
    for f in range(5):
        assert (Y[folds == f, :10].sum(0) > 0).all()


def test_single_label_unchanged_and_forced_imagefolder(cifar10_dir, tmp_path):
    from tests.cifar_subsets import copy_cifar_subset

    root = copy_cifar_subset(cifar10_dir, tmp_path / "c", {"train": 6})
    ds = load_dataset(root / "train", seed=0)
    assert not ds.multi_label and ds.card.split_strategy == "stratified"
    assert all(r.labels == (r.label,) for r in ds.records)
    assert "multi_label" not in ds.card.to_dict() and ds.card.to_dict()["card_version"] == 1
    forced = load_dataset(root / "train", seed=0, multi_label=True)
    assert forced.multi_label and forced.classes == ds.classes
    assert all(r.labels == (r.label,) for r in forced.records)


def test_identical_images_with_different_sets_are_merged(cifar10_dir, tmp_path):
    manifest = build_mosaics(cifar10_dir, tmp_path / "d", 12, seed=2, fmt="jsonl")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    shutil.copy(manifest.parent / rows[0]["path"], manifest.parent / "images" / "copy.jpg")
    rows.append({"path": "images/copy.jpg", "labels": ["zebra"]})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(manifest, seed=0)
    assert len(ds) == 12 and "zebra" in ds.classes
    merged = [r for r in ds.records if "zebra" in r.labels]
    assert len(merged) == 1 and set(merged[0].labels) == {"zebra", *rows[0]["labels"]}
    assert any("union" in w for w in ds.card.warnings)


def test_metrics_match_scikit_learn_and_bootstrap_is_paired():
    from sklearn.metrics import average_precision_score, f1_score

    from pipeline.multilabel.metrics import (apply_thresholds, evaluate_multilabel, paired_map_bootstrap,
                                             per_label_ap, tune_thresholds)

    rng = np.random.default_rng(0)
    Y = (rng.random((300, 5)) < 0.3).astype(np.uint8)
    S = np.round(0.35 * Y + rng.random(Y.shape), 2)  # ties included
    ap = per_label_ap(Y, S)
    assert ap == pytest.approx([average_precision_score(Y[:, j], S[:, j]) for j in range(5)])
    t = tune_thresholds(Y, S)
    P = apply_thresholds(S, t)
    for j in range(5):  # no other cut of label j's scores has a higher F1
        cuts = S[:, j][None, :] >= np.unique(S[:, j])[:, None]  # (cuts, images)
        tp = (cuts & (Y[:, j] == 1)).sum(1)
        best = float(np.max(2 * tp / (cuts.sum(1) + Y[:, j].sum())))
        assert f1_score(Y[:, j], P[:, j]) == pytest.approx(best)
    rep = evaluate_multilabel(Y, S, t, list("abcde"))
    assert rep.micro_f1 == pytest.approx(f1_score(Y, P, average="micro"))
    assert rep.macro_f1 == pytest.approx(f1_score(Y, P, average="macro"))
    assert rep.map == pytest.approx(float(np.mean(ap)))
    worse = 0.5 * S + 0.5 * rng.random(S.shape)
    d = paired_map_bootstrap(Y, S, worse, n_bootstrap=500, seed=0)
    assert d.metric_name == "map" and d.low > 0 and d.low <= d.diff <= d.high
    same = paired_map_bootstrap(Y, S, S, n_bootstrap=200)
    assert same.diff == 0 and same.low == same.high == 0
