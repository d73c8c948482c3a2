import io
import json
import re
import time

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from pipeline.evaluate import EvalReport, evaluate, hardest_examples
from pipeline.latency import count_params, measure_latency
from pipeline.charts import (UNREADABLE_TILE, confusion_matrix_png, evaluation_pngs,
                             hardest_captions, hardest_examples_png, reliability_png)
from pipeline.plots import pareto_figure, per_class_csv, png_bytes, report_html, save_png
from pipeline.select import Candidate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _random_problem(n, classes, seed, signal=1.0):
    rng = np.random.default_rng(seed)
    c = len(classes)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += signal
    return np.asarray(classes, dtype=object)[y], _softmax(logits)


# Deliberately unsorted string labels: proba columns follow this order, not alphabetical.
CLASSES = ["zebra", "cat", "dog", "bird", "ant", "yak", "moose"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed):
    y, p = _random_problem(600, CLASSES, seed, signal=0.8)
    r = evaluate(y, p, CLASSES, n_bootstrap=50, seed=seed)
    pred = np.asarray(CLASSES, dtype=object)[p.argmax(axis=1)]
    assert r.n_samples == 600
    assert r.accuracy == pytest.approx(skm.accuracy_score(y, pred))
    assert r.balanced_accuracy == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert r.macro_f1 == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert r.confusion_matrix == skm.confusion_matrix(y, pred, labels=CLASSES).tolist()
    # sklearn's top_k needs sorted labels: reorder our columns alphabetically for the reference.
    order = np.argsort(CLASSES)
    assert r.top_k == 5
    assert r.top5 == pytest.approx(skm.top_k_accuracy_score(
        y, p[:, order], k=5, labels=np.asarray(CLASSES)[order]))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=CLASSES,
                                                             zero_division=0)
    assert [row["class"] for row in r.per_class] == CLASSES
    np.testing.assert_allclose([row["precision"] for row in r.per_class], prec)
    np.testing.assert_allclose([row["recall"] for row in r.per_class], rec)
    np.testing.assert_allclose([row["f1"] for row in r.per_class], f1)
    assert [row["support"] for row in r.per_class] == sup.tolist()
    assert r.metric_value == r.balanced_accuracy


def test_absent_class_follows_sklearn_defaults():
    # "moose" never occurs in y_true; a few samples are predicted as it.
    rng = np.random.default_rng(5)
    classes = ["a", "b", "c", "moose"]
    y = np.array(["a", "b", "c"] * 40, dtype=object)
    p = _softmax(rng.normal(size=(120, 4)) * 2)
    r = evaluate(y, p, classes, n_bootstrap=0)
    pred = np.asarray(classes, dtype=object)[p.argmax(axis=1)]
    assert (pred == "moose").any()
    assert r.balanced_accuracy == pytest.approx(
        np.mean(skm.recall_score(y, pred, labels=["a", "b", "c"], average=None)))
    assert r.macro_f1 == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert r.ci_low is None and r.ci_high is None


def test_topk_uses_min_5_n_classes_and_top1_equals_accuracy():
    y, p = _random_problem(300, ["x", "y", "z"], 3)
    r = evaluate(y, p, ["x", "y", "z"], n_bootstrap=0)
    assert r.top_k == 3 and r.top5 == 1.0
    # With ties everywhere, argmax picks the first column: top-1 must agree with accuracy.
    flat = np.full((4, 3), 1 / 3)
    r1 = evaluate(["x", "y", "z", "x"], flat, ["x", "y", "z"], n_bootstrap=0)
    assert r1.accuracy == 0.5
    # Same tie rule for top-k: with 6 tied columns, the top-5 are the first 5 columns.
    six = list("abcdef")
    r6 = evaluate(["a", "f", "e", "f"], np.full((4, 6), 1 / 6), six, n_bootstrap=0)
    assert r6.top_k == 5 and r6.top5 == 0.5


def test_ece_calibrated_vs_overconfident():
    rng = np.random.default_rng(0)
    n, c = 20000, 4
    classes = ["a", "b", "c", "d"]
    conf = rng.uniform(0.3, 1.0, n)
    pred = rng.integers(0, c, n)
    p = np.empty((n, c))
    p[:] = ((1 - conf) / (c - 1))[:, None]
    p[np.arange(n), pred] = conf
    # Calibrated: the predicted class is right with probability exactly `conf`.
    right = rng.uniform(size=n) < conf
    other = (pred + rng.integers(1, c, n)) % c
    y_cal = np.where(right, pred, other)
    r_cal = evaluate(np.asarray(classes)[y_cal], p, classes, n_bootstrap=0)
    assert r_cal.ece < 0.02
    # Over-confident: same confidences, but only right 40 % of the time.
    right_over = rng.uniform(size=n) < 0.4
    y_over = np.where(right_over, pred, other)
    r_over = evaluate(np.asarray(classes)[y_over], p, classes, n_bootstrap=0)
    assert r_over.ece > 0.2
    assert len(r_cal.reliability) == 15
    assert sum(b["count"] for b in r_cal.reliability) == n
    filled = [b for b in r_over.reliability if b["count"]]
    assert all(b["lower"] < b["mean_confidence"] <= b["upper"] for b in filled)
    ece = sum(b["count"] / n * abs(b["accuracy"] - b["mean_confidence"]) for b in filled)
    assert r_over.ece == pytest.approx(ece)


def test_bootstrap_ci_contains_estimate_narrows_and_is_seeded():
    small_y, small_p = _random_problem(200, CLASSES, 7)
    big_y, big_p = _random_problem(5000, CLASSES, 7)
    for metric in ("balanced_accuracy", "accuracy", "macro_f1", "top5"):
        s = evaluate(small_y, small_p, CLASSES, selection_metric=metric, n_bootstrap=400)
        b = evaluate(big_y, big_p, CLASSES, selection_metric=metric, n_bootstrap=400)
        for r in (s, b):
            assert r.metric_value == r.metric(metric)
            assert r.ci_low <= r.metric_value <= r.ci_high
        assert (b.ci_high - b.ci_low) < 0.5 * (s.ci_high - s.ci_low)
    again = evaluate(small_y, small_p, CLASSES, n_bootstrap=400, seed=0)
    first = evaluate(small_y, small_p, CLASSES, n_bootstrap=400, seed=0)
    other = evaluate(small_y, small_p, CLASSES, n_bootstrap=400, seed=1)
    assert (again.ci_low, again.ci_high) == (first.ci_low, first.ci_high)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)


def test_bootstrap_is_fast():
    y, p = _random_problem(10_000, [f"c{i}" for i in range(10)], 1)
    evaluate(y[:100], p[:100], [f"c{i}" for i in range(10)], n_bootstrap=10)  # warm caches
    t0 = time.perf_counter()
    r = evaluate(y, p, [f"c{i}" for i in range(10)], n_bootstrap=1000)
    elapsed = time.perf_counter() - t0
    assert r.ci_low < r.ci_high
    # a generous bound (a loaded 2-core CI machine must not trip it): a vectorised bootstrap
    # takes well under a second; a per-resample Python loop would take tens of seconds
    assert elapsed < 10.0, f"1000 bootstrap resamples on 10k samples took {elapsed:.2f}s"


def test_report_json_round_trip_has_no_numpy():
    y, p = _random_problem(300, CLASSES, 2)
    r = evaluate(list(y), p.astype(np.float32), CLASSES, n_bootstrap=100)
    d = r.to_dict()
    text = json.dumps(d)  # raises on numpy scalars
    back = EvalReport.from_dict(json.loads(text))
    assert back == r
    assert back.to_dict() == d

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        else:
            assert x is None or type(x) in (int, float, str, bool), type(x)
    walk(d)
    with pytest.raises(ValueError, match="missing keys"):
        EvalReport.from_dict({"classes": ["a"]})


def test_input_validation_messages():
    with pytest.raises(ValueError, match="not in classes"):
        evaluate(["a", "q"], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        evaluate(["a", "b"], [[1.0, 0.0, 0.0]] * 2, ["a", "b"])
    with pytest.raises(ValueError, match="softmax"):
        evaluate(["a", "b"], [[2.0, 1.0], [0.0, 3.0]], ["a", "b"])
    with pytest.raises(ValueError, match="selection_metric"):
        evaluate(["a", "b"], [[1.0, 0.0], [0.0, 1.0]], ["a", "b"], selection_metric="auc")
    with pytest.raises(ValueError, match="empty"):
        evaluate([], np.zeros((0, 2)), ["a", "b"])


def test_hardest_examples_are_confident_mistakes():
    classes = ["a", "b", "c"]
    y = ["a", "b", "c", "a", "b"]
    p = np.array([[0.1, 0.9, 0.0],    # wrong, conf .9
                  [0.0, 1.0, 0.0],    # right
                  [0.6, 0.0, 0.4],    # wrong, conf .6
                  [0.2, 0.05, 0.75],  # wrong, conf .75
                  [0.3, 0.4, 0.3]])   # right
    ids = ["i0", "i1", "i2", "i3", "i4"]
    h = hardest_examples(y, p, classes, ids, k=2)
    assert [e["id"] for e in h] == ["i0", "i3"]
    assert h[0] == {"id": "i0", "true": "a", "predicted": "b", "confidence": 0.9,
                    "true_prob": 0.1}
    assert len(hardest_examples(y, p, classes, ids, k=16)) == 3
    json.dumps(h)


# ----------------------------------------------------------------------------- figures / report

def _is_png(data):
    return isinstance(data, bytes) and data[:8] == PNG_MAGIC and len(data) > 500


def test_figures_render_png(tmp_path):
    y, p = _random_problem(400, CLASSES, 4)
    r = evaluate(y, p, CLASSES, n_bootstrap=50)
    figs = evaluation_pngs(r)
    assert sorted(figs) == ["confusion_matrix.png", "reliability.png"]
    assert all(_is_png(b) for b in figs.values())

    ex = hardest_examples(y, p, CLASSES, [f"img{i}" for i in range(400)], k=5)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40 + 10 * i, 60, 3), dtype=np.uint8))
            for i in range(len(ex))]
    grid = hardest_examples_png(imgs, hardest_captions(ex), ncols=3)
    assert _is_png(grid)
    assert Image.open(io.BytesIO(grid)).size[0] >= 3 * 160  # three tiles a row
    assert _is_png(hardest_examples_png([], []))
    with pytest.raises(ValueError, match="captions"):
        hardest_examples_png(imgs, [])

    cands = [Candidate(f"m{i}", f"bb{i}", "logreg", fam, 0.6 + 0.05 * i, metric_std=0.02,
                       latency_ms_b1=1.5 * (i + 1), params_m=5.0 * (i + 1))
             for i, fam in enumerate(["efficientnet", "efficientnet", "clip", "dino"])]
    cands.append(Candidate("nolat", "x", "knn", "clip", 0.7))
    fig = pareto_figure(cands, winner="m2")
    assert _is_png(png_bytes(fig))
    assert "not shown" in fig.axes[0].get_title()
    out = save_png(fig, tmp_path / "sub" / "pareto.png")
    assert open(out, "rb").read(8) == PNG_MAGIC


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)


@pytest.mark.parametrize("c", [3, 10, 40])
def test_confusion_matrix_png_shows_the_matrix(c):
    """A perfect classifier: c fully dark diagonal cells (numbers aside) and nothing else dark;
    swapping every prediction to the next class moves the dark cells off the diagonal."""
    classes = [f"class-{i:02d}" for i in range(c)]
    y = np.repeat(classes, 20)
    perfect = evaluate(y, np.eye(c)[np.repeat(np.arange(c), 20)], classes, n_bootstrap=0)
    dark = np.array([8, 48, 107])
    px = _pixels(confusion_matrix_png(perfect))
    cell = min(48, max(8, 560 // c))
    n_dark = int((px == dark).all(axis=1).sum())
    assert 0.6 * c * cell * cell <= n_dark <= 1.05 * c * cell * cell + 2 * cell * 8 * c
    shifted = evaluate(y, np.eye(c)[(np.repeat(np.arange(c), 20) + 1) % c], classes, n_bootstrap=0)
    assert abs(int((_pixels(confusion_matrix_png(shifted)) == dark).all(axis=1).sum()) - n_dark) \
        < 0.1 * n_dark
    assert perfect.accuracy == 1.0 and shifted.accuracy == 0.0


def test_reliability_png_bars_follow_the_bins():
    """Accuracy bars are as tall as the bins' accuracy: a calibrated problem fills more bar
    pixels than one whose every prediction is wrong."""
    y, p = _random_problem(600, CLASSES, 3, signal=3.0)
    good = evaluate(y, p, CLASSES, n_bootstrap=0)
    wrong = evaluate(np.roll(y, 1) if len(set(y)) > 1 else y, p, CLASSES, n_bootstrap=0)
    bar = np.array([76, 114, 176])
    n_good = int((_pixels(reliability_png(good)) == bar).all(axis=1).sum())
    n_wrong = int((_pixels(reliability_png(wrong)) == bar).all(axis=1).sum())
    assert good.accuracy > wrong.accuracy + 0.2
    assert n_good > 1.5 * n_wrong > 0


def _sweep_candidates():
    """Mixed families and heads, a tied cheap winner off the frontier, a slow ensemble."""
    spec = [("efficientnet", "efficientnet/tf_efficientnet_lite0.in1k", 4.0),
            ("efficientnet", "efficientnet/tf_efficientnet_lite2.in1k", 8.0),
            ("clip", "clip/ViT-B-32.openai", 22.0),
            ("dinov2", "dinov2/vit_small_patch14_dinov2.lvd142m", 30.0)]
    rng = np.random.default_rng(3)
    out = []
    for fam, bb, lat in spec:
        for j, head in enumerate(["linear", "knn", "centroid", "mlp"]):
            out.append(Candidate(f"{bb}+{head}", bb, head, fam, float(0.7 + 0.2 * rng.random()),
                                 metric_std=float(0.03 * rng.random()),
                                 latency_ms_b1=lat + 0.3 * j, latency_noise_ms_b1=0.2,
                                 params_m=5.0, extra={"kind": "probe"}))
    ens = "+".join(bb for _, bb, _ in spec[:3]) + "+linear"
    out.append(Candidate(ens, ens.rsplit("+", 1)[0], "linear", "ensemble", 0.97, metric_std=0.01,
                         latency_ms_b1=34.0, params_m=40.0, extra={"kind": "ensemble"}))
    return out


def test_pareto_labels_only_the_frontier_and_the_winner():
    from pipeline.plots import short_label
    from pipeline.select import pareto_front

    cands = _sweep_candidates()
    winner = next(c for c in cands if c not in pareto_front(cands))  # labelled though dominated
    fig = pareto_figure(cands, metric_name="balanced_accuracy", latency_key="latency_ms_b1",
                        winner=winner.name)
    ax = fig.axes[0]
    expected = {short_label(c.name) for c in pareto_front(cands)} | {short_label(winner.name)}
    texts = [t.get_text() for t in ax.texts]
    assert sorted(texts) == sorted(expected)
    assert all(len(t) <= 28 and not t.startswith("efficientnet/") for t in texts)
    assert "lite0+lite2+ViT-B-32+linear" in texts  # the ensemble: fastest to its score
    assert ax.get_ylabel() == "balanced_accuracy (selection: cross-validation)"
    assert _is_png(png_bytes(fig))

    # The labels do not overlap one another and stay inside the axes.
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    inside = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert inside.x0 - 1 <= a.x0 and a.x1 <= inside.x1 + 1
        assert inside.y0 - 1 <= a.y0 and a.y1 <= inside.y1 + 1
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)

    # Families by colour and heads by marker in one legend, beside the axes.
    legend = ax.get_legend()
    entries = {t.get_text() for t in legend.get_texts()}
    assert {"efficientnet", "clip", "dinov2", "ensemble", "linear", "knn", "centroid", "mlp",
            "Pareto frontier", "winner"} <= entries
    assert legend.get_window_extent(renderer).x0 >= inside.x1

    # Error bars: the spread across folds (y) and the latency noise (x).
    assert ax.collections and any(len(c.get_segments()) for c in ax.collections
                                  if hasattr(c, "get_segments"))


def test_pareto_x_axis_is_plain_linear_milliseconds():
    fig = pareto_figure(_sweep_candidates(), winner=None, score_label="macro_f1 (validation)")
    ax = fig.axes[0]
    png_bytes(fig)
    assert ax.get_xscale() == "linear"
    assert ax.get_xlim()[0] == 0
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert len(ticks) >= 3
    assert all(re.fullmatch(r"[0-9][0-9,]*(\.[0-9]+)?", t) for t in ticks), ticks
    assert ax.xaxis.get_offset_text().get_text() == ""
    assert "ms" in ax.get_xlabel()
    assert ax.get_ylabel() == "macro_f1 (validation)"
    # no winner, no star: only the frontier is labelled
    assert 0 < len(ax.texts) < len(_sweep_candidates())


def test_pareto_handles_nothing_to_plot():
    fig = pareto_figure([Candidate("a", "b", "linear", "f", None)], winner="a")
    assert _is_png(png_bytes(fig))
    assert len(fig.axes[0].texts) == 0 and "1 without" in fig.axes[0].get_title()


def test_short_label():
    from pipeline.plots import short_label

    assert short_label("clip/ViT-B-32.openai+knn") == "ViT-B-32.openai+knn"
    assert short_label("efficientnet/tf_efficientnet_lite0.in1k+linear") == "lite0.in1k+linear"
    assert short_label("plain") == "plain"
    long = short_label("x" * 80)
    assert len(long) == 28 and "\u2026" in long


def test_no_pyplot_state_leaks():
    import sys

    y, p = _random_problem(100, CLASSES, 4)
    r = evaluate(y, p, CLASSES, n_bootstrap=0)
    png_bytes(pareto_figure([Candidate("m", "bb", "logreg", "fam", r.accuracy, latency_ms_b1=1.0)]))
    if "matplotlib.pyplot" in sys.modules:  # another test may have imported it; check no figures
        import matplotlib.pyplot as plt
        assert plt.get_fignums() == []


def test_per_class_csv():
    y, p = _random_problem(200, CLASSES, 5)
    r = evaluate(y, p, CLASSES, n_bootstrap=0)
    lines = per_class_csv(r).strip().split("\n")
    assert lines[0] == "class,precision,recall,f1,support"
    assert len(lines) == 1 + len(CLASSES)
    assert lines[1].startswith("zebra,")
    assert sum(int(line.rsplit(",", 1)[1]) for line in lines[1:]) == 200


def test_report_html_self_contained():
    y, p = _random_problem(200, CLASSES, 6)
    r = evaluate(y, p, CLASSES, n_bootstrap=50)
    figs = {"confusion matrix": confusion_matrix_png(r), "reliability": reliability_png(r)}
    rows = [{"rank": 1, "name": "effnet-lite0/logreg", "selection_score": 0.91234,
             "latency_ms_b1": 3.2},
            {"rank": 2, "name": "clip-b32/<knn>", "selection_score": 0.9, "latency_ms_b1": 9.0}]
    card = {"name": "clothing-small", "source": "/data/clothing", "classes": ["a", "b"],
            "counts": {"train": {"a": 80, "b": 20}, "val": {"a": 10, "b": 2},
                       "test": {"a": 10, "b": 3}},
            "imbalance_ratio": 4.0, "dataset_hash": "abc123",
            "excluded": [{"path": "a/broken.jpg", "code": "truncated", "reason": "cut short"}],
            "duplicates": [], "label_conflicts": [["x/1.jpg", "y/1.jpg"]]}
    page = report_html(rows, card, figs, notes="Winner: effnet-lite0/logreg")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<html") == 1
    assert page.count("data:image/png;base64,") == 2
    assert "effnet-lite0/logreg" in page and "0.912" in page
    assert "clip-b32/&lt;knn&gt;" in page  # escaped
    assert "a/broken.jpg" in page and "truncated" in page and "abc123" in page
    assert "<td>125</td>" in page  # grand total of the counts table
    # No external assets: nothing fetched over the network or from disk.
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:)""", page)
    assert "<link" not in page and "<script" not in page
    with pytest.raises(ValueError, match="PNG"):
        report_html(rows, card, {"bad": b"not a png"})


_NEW_ROW = {"rank": 1, "name": "efficientnet/tf_efficientnet_lite0.in1k+linear",
            "backbone": "efficientnet/tf_efficientnet_lite0.in1k", "head": "linear",
            "family": "efficientnet", "kind": "probe", "status": "FINISHED", "winner": True,
            "selection_metric": "balanced_accuracy",
            "selection_on": "5-fold CV on train+val (3 409 images)",
            "selection_score": 0.87312, "selection_std": 0.0121, "test_score": 0.86104,
            "test_ci_low": 0.8302, "test_ci_high": 0.8891, "accuracy": 0.8755,
            "balanced_accuracy": 0.86104, "macro_f1": 0.8601, "top5": 0.99, "ece": 0.0312,
            "latency_ms_b1": 4.234, "latency_ms_b32": 1.12, "latency_noise_ms_b1": 0.1,
            "params_m": 3.41, "fit_seconds": 2.0, "n_selection": 3409, "n_train": 3068,
            "n_test": 341, "run_id": "run-abc123", "head_dir": "/tmp/h", "error": None}


def test_report_leaderboard_fits_the_page():
    failed = {"rank": None, "name": "clip/ViT-B-32.openai+knn", "status": "FAILED",
              "error": "CUDA out of memory", "winner": False, "run_id": "run-def"}
    old = {"rank": 2, "name": "x+knn", "metric": 0.8, "ci_low": 0.7, "ci_high": 0.9,
           "status": "FINISHED"}  # a row of an older sweep: no new keys
    page = report_html([_NEW_ROW, old, failed], None, {})
    head = page.split("<thead>")[1].split("</thead>")[0]
    headers = re.findall(r"<th[^>]*>(.*?)</th>", head)
    assert headers == ["#", "name", "kind", "selection score ± std", "test score [95% CI]",
                       "accuracy", "macro-F1", "ECE", "latency ms", "params M", "winner",
                       "status"]
    assert "<div class='scroll'><table class='leaderboard'>" in page
    assert "overflow-x:auto" in page and "max-width:1200px" in page
    assert "overflow-wrap:anywhere" in page and "word-break:break-word" in page
    assert ("selection score = what chose the winner (cross-validation / validation); test "
            "score = reported once, never used for choosing") in page
    assert "5-fold CV on train+val (3 409 images)" in page
    winner_row = page.split("<tr class='winner'>")[1].split("</tr>")[0]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", winner_row)
    assert cells == ["1", "efficientnet/tf_efficientnet_lite0.in1k+linear", "probe",
                     "0.873 ± 0.012", "0.861 [0.830–0.889]", "0.875", "0.860", "0.031", "4.2",
                     "3.4", "★", "FINISHED"]
    assert "title='backbone: efficientnet/tf_efficientnet_lite0.in1k | head: linear | " \
           "run_id: run-abc123'" in page  # traceable without a run-id column
    assert "FAILED: CUDA out of memory" in page
    old_cells = re.findall(r"<td[^>]*>(.*?)</td>", page.split("<td class='name'>x+knn</td>")[1]
                           .split("</tr>")[0])
    assert old_cells[:2] == ["", "0.800"]  # older rows: blanks, their metric as the selection
    assert "None" not in page.split("</style>")[1]


def test_report_sections_and_notes():
    sections = [("Selection: paired differences",
                 "a − b = +0.012 [−0.004, 0.028] (5 folds)\n<tie> & cheaper wins"),
                ("Budgets", "max latency 20 ms")]
    page = report_html([_NEW_ROW], None, {}, notes="Winner: a", sections=sections)
    assert "<h2>Selection: paired differences</h2>" in page and "<h2>Budgets</h2>" in page
    assert "<pre class='section'>a − b = +0.012 [−0.004, 0.028] (5 folds)\n&lt;tie&gt; &amp; " \
           "cheaper wins</pre>" in page
    assert page.index("Leaderboard") < page.index("paired differences") < page.index("Dataset")
    assert "<div class='note'>Winner: a</div>" in page
    assert report_html([], None, {}).count("<h2>") == 2  # leaderboard + dataset, nothing else


# ----------------------------------------------------------------------------- latency

def test_measure_latency_and_count_params():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert count_params(model) == 8 * 4 + 4 + 4 * 2 + 2
    shared = torch.nn.Linear(3, 3)
    tied = torch.nn.Sequential(shared, shared)
    assert count_params(tied) == 12
    model[0].weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 4 + 4 * 2 + 2

    calls = []

    def fn(batch):
        calls.append(len(batch))
        time.sleep(0.002 * len(batch) / 4)

    res = measure_latency(fn, lambda bs: list(range(bs)), batch_sizes=(1, 8), warmup=1,
                          repeats=3)
    assert calls == [1] * 4 + [8] * 4
    assert set(res) >= {"latency_ms_b1", "latency_ms_b8", "batches", "machine"}
    # 8 images take ~4 ms per batch → ~0.5 ms per image; b1 ≥ 0.5 ms
    assert 0.4 < res["latency_ms_b8"] < 5.0
    assert res["latency_ms_b1"] >= 0.45
    assert res["batches"][1]["median_ms_per_batch"] == pytest.approx(res["latency_ms_b8"] * 8)
    json.dumps(res)
    with pytest.raises(ValueError):
        measure_latency(fn, lambda bs: [0] * bs, batch_sizes=(0,))


def test_hardest_grid_opens_paths_through_pipeline_images(tmp_path):
    pytest.importorskip("pipeline.images", reason="pipeline.images not available yet")
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((300, 200, 3), 120, dtype=np.uint8)).save(good, quality=90)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    png = hardest_examples_png([str(good), good.read_bytes(), str(bad)], ["a", "b", "c"])
    assert _is_png(png)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    grey = (pixels == 120).all(axis=1).sum()  # the readable photo, twice
    unreadable = (pixels == UNREADABLE_TILE).all(axis=1).sum()  # the bad file's tile
    assert grey >= 2 * 100 * 100 and unreadable >= 100 * 100


def test_latency_budget_stops_slow_batches_after_the_minimum_repeats():
    calls = {1: 0, 8: 0}

    def fn(batch):
        calls[len(batch)] += 1
        time.sleep(0.001 if len(batch) == 1 else 0.04)

    res = measure_latency(fn, lambda bs: [0] * bs, batch_sizes=(1, 8), warmup=1, repeats=9,
                          budget_s=0.05)
    by_bs = {b["batch_size"]: b["repeats"] for b in res["batches"]}
    assert by_bs[8] == 3 and calls[8] == 1 + 3          # 3 x 40 ms > 50 ms: stopped at the minimum
    assert by_bs[1] == 9                                # 1 ms calls fit the budget: all repeats
    assert res["latency_ms_b8"] >= 4.0
