"""bench/accuracy.py's pieces that need no model: the practitioner's preprocessing against the spec's,
the seeded subsets, the metrics, the lscpu parser and the BENCHMARKS.md section (a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench import accuracy as acc

LITES = acc.BACKBONES


@pytest.mark.parametrize("size", [(300, 200), (180, 260), (32, 32)])
def test_practitioner_preprocessing_matches_the_spec(tmp_path, size):
    """The script's hand-written resize + crop + normalise sees the pixels tlpipe's own
    preprocessing produces for each Lite spec (so the two arms differ by model runtime only)."""
    from pipeline.backbones import get_spec
    from pipeline.preprocess import prepare

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 64 * 4], -1).astype(np.uint8))
    path = tmp_path / "a.png"
    img.save(path)
    for name in LITES:
        spec = get_spec(name)
        mine = acc.practitioner_preprocess(path, spec.input_size, spec.crop_pct, spec.mean, spec.std)
        ref = (prepare(img, spec).astype(np.float32) / 255 - np.asarray(spec.mean, np.float32)[:, None, None]) \
            / np.asarray(spec.std, np.float32)[:, None, None]
        assert mine.shape == ref.shape == (3, spec.input_size, spec.input_size)
        assert np.abs(mine - ref).mean() * 255 * spec.std[0] < 0.5  # under half a grey level on average


def _folder(root, split, classes, n):
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{c}{i:03d}.jpg").write_bytes(f"{c}{i}".encode())


def test_subset_is_seeded_disjoint_and_cached(tmp_path):
    src = tmp_path / "src"
    _folder(src, "train", ["a", "b"], 20)
    _folder(src, "test", ["a", "b"], 8)
    plan = [("train", "train", 6), ("val", "train", 3), ("test", "test", 4)]
    one = acc.build_subset(src, tmp_path / "one", plan, seed=0)
    two = acc.build_subset(src, tmp_path / "two", plan, seed=0)
    other = acc.build_subset(src, tmp_path / "other", plan, seed=1)
    names = lambda root, s: sorted(p.name for p in (root / s).rglob("*.jpg"))  # noqa: E731
    for split, n in (("train", 12), ("val", 6), ("test", 8)):
        assert len(names(one, split)) == n
        assert names(one, split) == names(two, split)
    assert not set(names(one, "train")) & set(names(one, "val"))
    assert names(one, "train") != names(other, "train")
    paths, labels = acc.list_images(one, "val")
    assert labels == ["a"] * 3 + ["b"] * 3 and all(p.read_bytes().startswith(p.name[0].encode()) for p in paths)
    (one / "train" / "a").rename(one / "train" / "moved")  # the marker makes a second call reuse it
    assert acc.build_subset(src, tmp_path / "one", plan, seed=0) == one
    assert (one / "train" / "moved").is_dir()
    with pytest.raises(SystemExit, match="needed"):
        acc.build_subset(src, tmp_path / "big", [("train", "train", 30)])


def test_metrics_count_abstentions_wrong():
    y = ["a", "a", "b", "b", "b", "b"]
    assert acc.accuracy(y, ["a", None, "b", "b", "b", "a"]) == pytest.approx(4 / 6)
    assert acc.balanced_accuracy(y, ["a", None, "b", "b", "b", "a"]) == pytest.approx((0.5 + 0.75) / 2)


def test_lscpu_facts():
    text = ("Architecture:   x86_64\nCPU(s):   8\nModel name:   Intel(R) Xeon(R) Platinum 8480+\n"
            "Flags:   fpu sse avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n")
    c = acc.parse_lscpu(text)
    assert c == {"model": "Intel(R) Xeon(R) Platinum 8480+", "cpus": "8", "avx2": True,
                 "avx512_vnni": True, "amx": True}
    assert acc.parse_lscpu("Model name: AMD EPYC\nFlags: sse avx2\n")["amx"] is False
    assert "amx ✗" in acc.describe_cpu(acc.parse_lscpu("Model name: AMD EPYC\nFlags: sse avx2\n"))


def _results(tl_top1: float, tl_rerun: float):
    bb = {LITES[0]: dict(extract_s=50, cv_s=40, cv_score=0.80, C=0.01, test_acc=0.81, test_bal_acc=0.80),
          LITES[1]: dict(extract_s=70, cv_s=45, cv_score=0.84, C=0.0316, test_acc=0.83, test_bal_acc=0.82),
          LITES[2]: dict(extract_s=90, cv_s=50, cv_score=0.83, C=0.01, test_acc=0.85, test_bal_acc=0.84)}
    s = dict(backbones=bb, best_by_cv=LITES[1], best_on_test=LITES[2], n_trval=100, n_test=40,
             extract_s=210, cv_s=135, total_s=345, n_jobs=-1, max_iter=1000, torch_threads=2,
             sklearn="1.x", load_before="2.0/2.0/2.0", load_after="2.0/2.0/2.0")
    t = dict(winner="concat(lite0,lite1,lite2)+linear", winner_kind="concat", selection_score=0.86,
             selection_std=0.01, selection_on="5-fold CV on train+val", selection_metric="balanced_accuracy",
             reported_test_score=0.85, top1_acc=tl_top1, top1_bal_acc=tl_top1, deployed_acc=tl_top1 - 0.02,
             deployed_bal_acc=tl_top1 - 0.02, decisions={"classifier": 36, "abstain": 4}, extract_s=60,
             select_fit_s=300, total_s=360, rerun_s=tl_rerun, command="tlpipe run D --root /tmp/r", root="/tmp/r",
             rerun_load_before="1/1/1", rerun_load_after="1/1/1",
             exports_cached=[True, True, True], predict_s=3.0, n_test=40, load_before="1/1/1", load_after="1/1/1")
    return s, t


def test_section_marks_targets_and_writes(tmp_path, monkeypatch):
    data = acc.BenchData("cifar10-subset-1-1-1-s0", "CIFAR-10 subset 1/1/1 a class", "CIFAR test data", tmp_path,
                         {"train": "train", "val": "val", "test": "test"}, "--dataset cifar")
    cpu = acc.parse_lscpu("Model name: AMD EPYC\nCPU(s): 2\nFlags: avx2\n")
    s, t = _results(0.836, 120.0)  # best by CV is Lite1 at 83.0: 83.6 >= 83.5 met; 120 s < 135 s met
    title, body = acc.render(data, s, t, cpu, "python -m bench.accuracy --dataset cifar")
    assert "= 83.50 → classifier top-1 83.60 ✓" in body and "81.60 ✗" in body
    assert "cached 120.0 s vs the script's CV 135.0 s ✓" in body and "tlpipe 360.0 s" in body
    assert "features cached (whole run on the same features)" in body and "best on test (oracle)" in body and "avx2 ✓" in body
    s, t = _results(0.834, 200.0)
    _, body2 = acc.render(data, s, t, cpu, "cmd")
    assert "83.40 ✗" in body2 and "cached 200.0 s vs the script's CV 135.0 s ✗" in body2

    from bench import report
    from bench.report import write_section

    monkeypatch.setattr(report, "machine", lambda: "2 CPU cores (x86_64), no GPU")  # no torch import
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\n<!-- bench:other -->\nkeep\n<!-- /bench:other -->\n")
    write_section(f"accuracy-{data.key}", title, "python -m bench.accuracy --dataset cifar", body, path=md)
    write_section(f"accuracy-{data.key}", title, "python -m bench.accuracy --dataset cifar", body2, path=md)
    text = md.read_text()
    assert text.count(f"<!-- bench:accuracy-{data.key} -->") == 1 and "keep" in text and "83.40 ✗" in text
