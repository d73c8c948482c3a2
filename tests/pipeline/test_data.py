"""pipeline.data: intake from ImageFolder / manifests / HF datasets, exclusions, splits, card."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import (
    SPLITS,
    Dataset,
    DatasetCard,
    DatasetError,
    ExcludedFile,
    display_path,
    load_dataset,
)
from pipeline.data.sources import scan_imagefolder
from pipeline.data.split import allocate, plan_splits
from pipeline.data.validate import check_files
from pipeline.images import sha256_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from malformed_corpus import EXIF_SIZE, make_malformed_corpus  # noqa: E402


def _png(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _tree(root: Path, layout: dict[str, int], seed0: int = 0) -> dict[str, bytes]:
    """layout {"<dir>": n_images}; writes n distinct PNGs in each dir. Returns rel path -> bytes."""
    written = {}
    seed = seed0
    for d, n in layout.items():
        (root / d).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            data = _png(seed)
            seed += 1
            rel = f"{d}/img_{i:03d}.png"
            (root / rel).write_bytes(data)
            written[rel] = data
    return written


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str], Dataset]:
    root = tmp_path_factory.mktemp("corpus")
    expected = make_malformed_corpus(root)
    return root, expected, load_dataset(root, seed=0)


# ----------------------------------------------------------------------------- malformed corpus


def _outcomes(root: Path, ds: Dataset) -> dict[str, str]:
    card = ds.card
    got: dict[str, str] = {}
    for r in ds.records:
        got[display_path(os.path.relpath(r.path, root))] = "ok"
    for e in card.excluded:
        assert e.path not in got, f"{e.path} is both a record and excluded"
        got[e.path] = e.code
    for group in card.duplicates:
        assert group[0] in got and got[group[0]] == "ok"
        for p in group[1:]:
            got[p] = "duplicate"
    for p in card.empty_classes:
        got[p] = "empty_class"
    return got


def test_corpus_every_expected_outcome_exactly(corpus):
    root, expected, ds = corpus
    assert len(expected) >= 30
    kinds = Counter(expected.values())
    assert kinds["ok"] >= 12 and len(kinds) >= 12
    got = _outcomes(root, ds)
    for rel, outcome in expected.items():
        key = display_path(rel)
        if outcome == "ignored":
            assert key not in got, f"{rel} should be ignored, got {got.get(key)}"
        else:
            assert got.get(key) == outcome, f"{rel}: expected {outcome}, got {got.get(key)}"
    # nothing unexpected either: every record / exclusion is one the corpus asked for
    shown_expected = {display_path(k) for k in expected}
    assert set(got) <= shown_expected, set(got) - shown_expected
    # non-image extensions are listed, hidden files are not
    assert ds.card.ignored == ["cat/notes.txt"]
    assert ds.card.label_conflicts == [["cat/conflict.png", "dog/conflict.png"]]
    assert ds.card.duplicates == [["dog/dup_a.png", "dog/dup_b.png"]]
    assert ds.card.empty_classes == ["empty_class"]
    assert any("empty_class" in w for w in ds.card.warnings)
    assert ds.classes == ["cat", "dog"]


def test_corpus_records_are_real_and_reasons_are_given(corpus):
    root, expected, ds = corpus
    for r in ds.records:
        data = Path(r.path).read_bytes()
        assert sha256_bytes(data) == r.sha256
        assert os.path.isabs(r.path) and r.split in SPLITS and r.label in ("cat", "dog")
    by_name = {os.path.basename(r.path): r for r in ds.records}
    rotated = by_name["exif_rotated.jpg"]
    assert (rotated.width, rotated.height) == (EXIF_SIZE[1], EXIF_SIZE[0])
    assert (by_name["cmyk.jpg"].width, by_name["cmyk.jpg"].height) == (32, 24)
    for e in ds.card.excluded:
        assert e.reason and len(e.reason) > 10
    bomb = next(e for e in ds.card.excluded if e.path == "cat/bomb.png")
    assert "max_pixels" in bomb.reason
    long_name = [r for r in ds.records if len(os.path.basename(r.path)) > 150]
    assert len(long_name) == 1
    non_utf8 = [k for k in expected if "latin1" in k]
    if non_utf8:  # filesystem accepted the name
        rec = [r for r in ds.records if "latin1" in r.path]
        assert len(rec) == 1 and Path(rec[0].path).is_file()
        assert "\\xe9" in display_path(non_utf8[0])


def test_corpus_split_is_stratified_and_seeded(corpus):
    root, _, ds = corpus
    card = ds.card
    assert card.split_strategy == "stratified" and card.seed == 0
    assert card.fractions == {"train": 0.8, "val": 0.1, "test": 0.1}
    for cls in ds.classes:
        n = card.class_total(cls)
        assert n >= 3
        for s in SPLITS:
            assert card.counts[s][cls] >= 1, (cls, s)
    again = load_dataset(root, seed=0)
    assert again.records == ds.records and again.card.dataset_hash == card.dataset_hash
    other = load_dataset(root, seed=1)
    assert other.card.dataset_hash != card.dataset_hash  # splits changed
    assert sorted(r.sha256 for r in other.records) == sorted(r.sha256 for r in ds.records)


def test_card_round_trip_and_render(corpus):
    from rich.console import Console

    _, _, ds = corpus
    card = ds.card
    text = json.dumps(card.to_dict())
    back = DatasetCard.from_dict(json.loads(text))
    assert back == card
    assert DatasetCard.from_json(card.to_json()) == card
    assert isinstance(back.excluded[0], ExcludedFile)
    buf = io.StringIO()
    Console(file=buf, width=140, color_system=None).print(card.render())
    out = buf.getvalue()
    for needle in ("cat", "dog", "label_conflict", "too_many_pixels", "stratified", "train", "val", "test"):
        assert needle in out, needle
    assert f"{card.n_images}" in out


# ----------------------------------------------------------------------------- determinism & hash


def test_split_does_not_depend_on_file_names_or_listing_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    written = _tree(a, {"x": 15, "y": 9, "z": 3})
    for i, (rel, data) in enumerate(sorted(written.items(), reverse=True)):
        cls = rel.split("/")[0]
        (b / cls).mkdir(parents=True, exist_ok=True)
        (b / cls / f"renamed_{i:03d}_{rel[-7:]}").write_bytes(data)
    da, db = load_dataset(a, seed=3), load_dataset(b, seed=3)
    assert {r.sha256: r.split for r in da.records} == {r.sha256: r.split for r in db.records}
    assert da.card.dataset_hash == db.card.dataset_hash
    assert da.card.counts == db.card.counts
    assert da.card.counts["val"]["z"] == 1 and da.card.counts["test"]["z"] == 1  # 3 images -> 1/1/1
    # relabelling one image changes the hash
    moved = next(r for r in da.records if r.label == "x")
    shutil.move(moved.path, a / "y" / "moved.png")
    assert load_dataset(a, seed=3).card.dataset_hash != da.card.dataset_hash


def test_allocate_gives_every_split_one_when_possible():
    f = {"val": 0.1, "test": 0.1}
    assert allocate(1, f) == {"val": 0, "test": 0}
    assert allocate(2, f) == {"val": 0, "test": 0}
    assert allocate(3, f) == {"val": 1, "test": 1}
    assert allocate(100, f) == {"val": 10, "test": 10}
    assert allocate(4, {"val": 0.45, "test": 0.45}) == {"val": 1, "test": 2}  # train keeps one
    for n in range(1, 60):
        c = allocate(n, {"val": 0.3, "test": 0.3})
        assert n - sum(c.values()) >= 1
        if n >= 3:
            assert min(c.values()) >= 1
    assert allocate(5, {"val": 0.2, "test": 0.0}) == {"val": 1}
    with pytest.raises(DatasetError):
        plan_splits([("a", "x", None)], seed=0, val_fraction=0.6, test_fraction=0.5)


# ----------------------------------------------------------------------------- split folders


def test_split_folders_are_normalised(tmp_path):
    _tree(tmp_path, {"training/a": 5, "training/b": 4, "validation/a": 2, "validation/b": 2,
                     "test/a": 2, "test/b": 1})
    ds = load_dataset(tmp_path)
    assert ds.card.split_strategy == "source" and ds.card.fractions == {}
    assert ds.card.counts == {"train": {"a": 5, "b": 4}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 1}}
    assert ds.card.imbalance_ratio == pytest.approx(5 / 4)
    assert len(ds.split("val")) == 4
    with pytest.raises(ValueError):
        ds.split("validation")


def test_train_and_test_only_carves_val_from_train(tmp_path):
    _tree(tmp_path, {"train/a": 20, "train/b": 10, "test/a": 3, "test/b": 3})
    ds = load_dataset(tmp_path, seed=7, val_fraction=0.2)
    card = ds.card
    assert card.split_strategy == "source+carved:val" and card.fractions == {"val": 0.2}
    assert card.counts["val"] == {"a": 4, "b": 2}
    assert card.counts["train"] == {"a": 16, "b": 8}
    assert card.counts["test"] == {"a": 3, "b": 3}  # test untouched
    test_paths = {os.path.relpath(r.path, tmp_path).split("/")[0] for r in ds.split("test")}
    assert test_paths == {"test"}
    assert any("carved" in w for w in card.warnings)


def test_duplicate_across_splits_keeps_train_copy(tmp_path):
    written = _tree(tmp_path, {"train/a": 4, "train/b": 4, "val/a": 1, "val/b": 1, "test/a": 1, "test/b": 1})
    (tmp_path / "test/a/leak.png").write_bytes(written["train/a/img_000.png"])
    ds = load_dataset(tmp_path)
    assert ds.card.duplicates == [["train/a/img_000.png", "test/a/leak.png"]]
    assert ds.card.counts["test"]["a"] == 1


def test_mixed_split_and_class_folders_is_fatal(tmp_path):
    _tree(tmp_path, {"train/a": 2, "train/b": 2, "cats": 2})
    with pytest.raises(DatasetError, match="mixes split folders"):
        load_dataset(tmp_path)


def test_symlinked_class_folder_outside_root_is_followed(tmp_path):
    _tree(tmp_path / "elsewhere", {"b": 3})
    _tree(tmp_path / "data", {"a": 3}, seed0=100)
    os.symlink(tmp_path / "elsewhere" / "b", tmp_path / "data" / "b")
    ds = load_dataset(tmp_path / "data")
    assert ds.card.classes == ["a", "b"] and ds.card.class_total("b") == 3


# ----------------------------------------------------------------------------- fatal errors


def test_fatal_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    _tree(tmp_path / "single", {"only": 4})
    with pytest.raises(DatasetError, match="only one class"):
        load_dataset(tmp_path / "single")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    (tmp_path / "empty" / "b" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match="no image files"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "b").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.jpg").write_bytes(b"")
    (tmp_path / "bad" / "b" / "y.jpg").write_text("text")
    with pytest.raises(DatasetError, match="empty: 1, not_image: 1"):
        load_dataset(tmp_path / "bad")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a manifest"):
        load_dataset(tmp_path / "file.bin")
    with pytest.raises(DatasetError):
        load_dataset(tmp_path / "single", val_fraction=0.5, test_fraction=0.5)


# ----------------------------------------------------------------------------- manifests


def _manifest_tree(tmp_path: Path) -> Path:
    root = tmp_path / "m"
    _tree(root, {"imgs/a": 6, "imgs/b": 6})
    (tmp_path / "outside.png").write_bytes(_png(999))
    os.symlink(tmp_path / "outside.png", root / "imgs" / "link_out.png")
    os.symlink(root / "imgs" / "a" / "img_000.png", root / "imgs" / "link_in.png")
    return root


def test_csv_manifest_paths_cannot_escape(tmp_path):
    root = _manifest_tree(tmp_path)
    rows = ["path,label,split"]
    for cls in "ab":
        for i in range(6):
            split = ["train", "train", "train", "train", "validation", "test"][i]
            rows.append(f"imgs/{cls}/img_{i:03d}.png,{cls},{split}")
    rows += [
        f"{tmp_path / 'outside.png'},a,train",  # absolute
        "../outside.png,a,train",  # .. escape
        "imgs/../../outside.png,b,train",  # normalises outside
        "imgs/link_out.png,a,train",  # symlink out of the root
        "imgs/link_in.png,b,test",  # symlink inside the root: allowed (but conflicts with a/img_000)
        "imgs/missing.png,a,train",
        "imgs/a/img_001.png,a,holdout",  # bad split
        "imgs/b/img_001.png,,train",  # empty label
        "imgs/a/img_002.png,a,train",  # listed twice, same label -> duplicate
    ]
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(root / "data.csv")
    card = ds.card
    assert card.source_kind == "manifest" and card.split_strategy == "source"
    codes = {(e.path, e.code) for e in card.excluded}
    assert (display_path(str(tmp_path / "outside.png")), "outside_root") in codes
    assert ("../outside.png", "outside_root") in codes
    assert ("imgs/../../outside.png", "outside_root") in codes
    assert ("imgs/link_out.png", "outside_root") in codes
    assert ("imgs/missing.png", "missing") in codes
    assert ("imgs/a/img_001.png", "bad_split") in codes
    assert ("imgs/b/img_001.png", "bad_row") in codes
    assert ("imgs/link_in.png", "label_conflict") in codes and ("imgs/a/img_000.png", "label_conflict") in codes
    assert card.duplicates == [["imgs/a/img_002.png", "imgs/a/img_002.png"]]
    assert all(str(root) in r.path for r in ds.records)
    assert card.counts["val"] == {"a": 1, "b": 1} and card.counts["test"] == {"a": 1, "b": 1}
    assert card.counts["train"] == {"a": 3, "b": 4}


def test_jsonl_manifest_without_split_column_is_split(tmp_path):
    root = _manifest_tree(tmp_path)
    lines = [json.dumps({"path": f"imgs/{c}/img_{i:03d}.png", "label": c}) for c in "ab" for i in range(6)]
    lines.insert(3, "{not json")
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_dataset(root / "data.jsonl", seed=5)
    assert ds.card.split_strategy == "stratified"
    assert [e.code for e in ds.card.excluded] == ["bad_row"]
    assert {s: sum(v.values()) for s, v in ds.card.counts.items()} == {"train": 8, "val": 2, "test": 2}


def test_manifest_without_required_columns_is_fatal(tmp_path):
    (tmp_path / "m.csv").write_text("file_name,category_id\nx.png,1\n")
    with pytest.raises(DatasetError, match="path column"):
        load_dataset(tmp_path / "m.csv")


# ----------------------------------------------------------------------------- Hugging Face


def _hf_saved(tmp_path: Path, splits: dict[str, int] | None) -> tuple[Path, list[str]]:
    datasets = pytest.importorskip("datasets")
    names = ["apple", "banana", "cherry"]

    def make(n: int, seed0: int):
        images = [_png(seed0 + i) for i in range(n)]
        labels = [i % 3 for i in range(n)]
        ds = datasets.Dataset.from_dict({"image": images, "label": labels})
        ds = ds.cast_column("image", datasets.Image())
        return ds.cast_column("label", datasets.ClassLabel(names=names))

    out = tmp_path / "hf"
    if splits is None:
        make(15, 0).save_to_disk(str(out))
    else:
        dd = datasets.DatasetDict({k: make(n, 100 * i) for i, (k, n) in enumerate(splits.items())})
        dd.save_to_disk(str(out))
    return out, names


def test_hf_save_to_disk_dataset_dict(tmp_path):
    folder, names = _hf_saved(tmp_path, {"train": 9, "validation": 3, "test": 3})
    cache = tmp_path / "cache"
    ds = load_dataset(folder, cache_dir=cache)
    card = ds.card
    assert card.source_kind == "hf_disk" and card.classes == names
    assert card.split_strategy == "source"
    assert card.counts == {"train": {n: 3 for n in names}, "val": {n: 1 for n in names},
                           "test": {n: 1 for n in names}}
    for r in ds.records:
        p = Path(r.path)
        assert p.is_file() and cache in p.parents and p.name.startswith(r.sha256)
        assert sha256_bytes(p.read_bytes()) == r.sha256 and p.suffix == ".png"
    again = load_dataset(folder, cache_dir=cache)  # cache reuse, same result
    assert again.records == ds.records


def test_hf_single_dataset_is_split_and_bad_rows_excluded(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [_png(i) for i in range(12)] + [b"not an image at all", _png(0, (40, 30))[:-60]]
    labels = ["x", "y"] * 7
    hf = datasets.Dataset.from_dict({"image": images, "label": labels}).cast_column("image", datasets.Image())
    hf.save_to_disk(str(tmp_path / "hf"))
    ds = load_dataset(tmp_path / "hf", cache_dir=tmp_path / "cache", seed=1)
    assert ds.card.classes == ["x", "y"] and ds.card.split_strategy == "stratified"
    codes = sorted(e.code for e in ds.card.excluded)
    assert codes == ["not_image", "truncated"]
    assert all(e.path.startswith("data[") or e.path.startswith("train[") for e in ds.card.excluded)
    assert len(ds.records) == 12
    # an in-memory datasets object works too
    assert load_dataset(hf, cache_dir=tmp_path / "cache", seed=1).card.dataset_hash == ds.card.dataset_hash


def test_hf_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_dataset("someone/some-image-dataset", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "someone/some-image-dataset" in msg and "save_to_disk" in msg and "folder" in msg
    with pytest.raises(DatasetError, match="save_to_disk"):
        load_dataset("hf://someone/other", cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- validation


def test_threaded_validation_matches_serial_and_reports_progress(corpus):
    root, _, _ = corpus
    listing = scan_imagefolder(root)
    seen = []
    threaded = check_files(listing.candidates, workers=4, progress=lambda d, t: seen.append((d, t)))
    serial = check_files(listing.candidates, workers=1)
    assert threaded == serial
    assert seen[-1] == (len(listing.candidates), len(listing.candidates))


# ----------------------------------------------------------------------------- real data


def test_clothing_small_card(clothing_small_dir):
    ds = load_dataset(clothing_small_dir)
    card = ds.card
    assert len(card.classes) == 10 and "t-shirt" in card.classes and "skirt" in card.classes
    assert card.split_strategy == "source"
    lost = Counter()
    for e in card.excluded:
        lost[e.path.split("/")[0]] += 1
    for group in card.duplicates:
        for p in group[1:]:
            lost[p.split("/")[0]] += 1
    assert card.split_total("train") == 3068 - lost["train"]
    assert card.split_total("val") == 341 - lost["validation"]
    assert card.split_total("test") == 372 - lost["test"]
    assert card.imbalance_ratio == pytest.approx(795 / 112, rel=0.05)
    assert all(r.width > 0 and r.height > 0 for r in ds.records)


def test_a_folder_of_netpbm_heic_avif_and_jpeg2000_files_is_read_whole(tmp_path):
    """Datasets ship .ppm / .pgm (GTSRB, face sets), phones .heic, newer sets .avif / .jp2: every
    one is a record, none is skipped as a non-image file."""
    import pillow_heif

    pillow_heif.register_heif_opener()  # to write the .heic files
    formats = {".ppm": ("PPM", "RGB"), ".pgm": ("PPM", "L"), ".heic": ("HEIF", "RGB"),
               ".avif": ("AVIF", "RGB"), ".jp2": ("JPEG2000", "RGB"), ".png": ("PNG", "RGB")}
    for cls, tint in (("left", 0), ("right", 1)):
        (tmp_path / cls).mkdir()
        for i, (ext, (fmt, mode)) in enumerate(formats.items()):
            arr = np.random.default_rng(10 * tint + i).integers(0, 256, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(tmp_path / cls / f"img{i}{ext.upper() if i % 2 else ext}", fmt)
    ds = load_dataset(tmp_path, seed=0)
    assert len(ds.records) == 12 and not ds.card.excluded and not ds.card.ignored
    assert sorted({os.path.splitext(r.path)[1].lower() for r in ds.records}) == sorted(formats)


def test_a_macos_zip_of_a_nas_folder_is_the_dataset_inside_it(tmp_path):
    """`zip -r pets.zip pets` on a Mac adds `__MACOSX/pets/<class>/._<file>` (AppleDouble files
    with image extensions) and `.DS_Store`; a Synology share adds `@eaDir/<file>/*.jpg` thumbnails
    of every photo. The archive's root is still `pets/`, and none of those files is data."""
    import zipfile

    from pipeline.archives import unpack

    images = _tree(tmp_path / "src", {"cat": 5, "dog": 4})
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel, data in images.items():
            cls, name = rel.split("/")
            zf.writestr(f"pets/{rel}", data)
            zf.writestr(f"__MACOSX/pets/{cls}/._{name}", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
            zf.writestr(f"pets/{cls}/@eaDir/{name}/SYNOPHOTO_THUMB_S.jpg", _png(99))
        zf.writestr("pets/cat/.DS_Store", b"\x00\x00\x00\x01Bud1")
    root = unpack(archive, tmp_path / "cache")
    assert root.name == "pets"
    ds = load_dataset(root, seed=0)
    assert sorted(Counter(r.label for r in ds.records).items()) == [("cat", 5), ("dog", 4)]
    assert not ds.card.excluded and not ds.card.ignored
