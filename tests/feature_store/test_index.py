"""SupportIndex: FAISS cosine k-NN checked against brute-force numpy; persistence; copy-on-write."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.index import SupportIndex

DIM = 24


def data(n: int, seed: int = 0, dim: int = DIM):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    labels = [f"class{i % 5}" for i in range(n)]
    ids = np.arange(1000, 1000 + n) * 3  # arbitrary, non-contiguous ids
    return x, labels, ids


def brute_force(support: np.ndarray, queries: np.ndarray, k: int):
    s = support / np.linalg.norm(support, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ s.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def test_flat_search_matches_brute_force():
    x, labels, ids = data(300)
    index = SupportIndex(DIM)
    index.add(x, labels, ids)
    assert len(index) == 300 and index.kind == "flat"
    q = np.random.default_rng(1).standard_normal((12, DIM)).astype(np.float32)
    scores, got_labels, got_ids = index.search(q, k=7)
    want_scores, want_rows = brute_force(x, q, 7)
    assert scores.shape == got_labels.shape == got_ids.shape == (12, 7)
    np.testing.assert_array_equal(got_ids, ids[want_rows])
    np.testing.assert_array_equal(got_labels, np.asarray(labels)[want_rows])
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # cosine: the scale of a query does not matter
    np.testing.assert_array_equal(index.search(q * 17.0, k=7)[2], got_ids)


def test_hnsw_above_threshold_has_high_recall():
    x, labels, ids = data(400, seed=2)
    index = SupportIndex(DIM, hnsw_threshold=250)
    index.add(x[:200], labels[:200], ids[:200])
    assert index.kind == "flat"
    index.add(x[200:], labels[200:], ids[200:])  # crosses the threshold: rebuilt as HNSW
    assert index.kind == "hnsw" and len(index) == 400
    q = np.random.default_rng(3).standard_normal((30, DIM)).astype(np.float32)
    _, _, got = index.search(q, k=5)
    _, want_rows = brute_force(x, q, 5)
    recall = np.mean([len(set(g) & set(w)) / 5 for g, w in zip(got, ids[want_rows])])
    assert recall >= 0.9
    # each support vector finds itself first
    _, _, self_ids = index.search(x[:50], k=1)
    assert np.mean(self_ids[:, 0] == ids[:50]) >= 0.95


@pytest.mark.parametrize("threshold", [None, 100])
def test_save_load_gives_identical_results(tmp_path, threshold):
    x, labels, ids = data(150, seed=4)
    index = SupportIndex(DIM, hnsw_threshold=threshold)
    index.add(x, labels, ids)
    q = np.random.default_rng(5).standard_normal((9, DIM)).astype(np.float32)
    before = index.search(q, k=4)
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == \
        ["config.json", "ids.npy", "index.faiss", "labels.json"]
    loaded = SupportIndex.load(tmp_path / "idx")
    assert (loaded.kind, len(loaded), loaded.dim) == (index.kind, 150, DIM)
    after = loaded.search(q, k=4)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.ids, ids)
    assert loaded.labels.tolist() == labels


def test_with_added_and_without_leave_the_original_unchanged():
    x, labels, ids = data(60, seed=6)
    base = SupportIndex(DIM)
    base.add(x[:40], labels[:40], ids[:40])
    q = x[40:45]
    before = base.search(q, k=3)

    grown = base.with_added(x[40:], labels[40:], ids[40:])
    assert len(base) == 40 and len(grown) == 60
    for a, b in zip(before, base.search(q, k=3)):
        np.testing.assert_array_equal(a, b)
    scores, _, got = grown.search(q, k=1)  # the added vectors find themselves
    np.testing.assert_array_equal(got[:, 0], ids[40:45])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)

    shrunk = grown.without(ids[40:45])
    assert len(shrunk) == 55 and len(grown) == 60
    assert not np.isin(shrunk.search(q, k=10)[2], ids[40:45]).any()
    np.testing.assert_array_equal(grown.search(q, k=1)[2][:, 0], ids[40:45])


def test_remove_in_place_and_default_ids():
    x, labels, _ = data(20, seed=7)
    index = SupportIndex(DIM)
    index.add(x[:10], labels[:10])
    index.add(x[10:], labels[10:])
    np.testing.assert_array_equal(index.ids, np.arange(20))
    assert index.remove([3, 4, 99]) == 2
    assert len(index) == 18 and 3 not in index.ids and 4 not in index.ids
    _, got_labels, got_ids = index.search(x, k=1)
    keep = np.setdiff1d(np.arange(20), [3, 4])
    np.testing.assert_array_equal(got_ids[keep, 0], keep)
    assert got_labels[keep, 0].tolist() == [labels[i] for i in keep]
    np.testing.assert_allclose(np.linalg.norm(index.vectors, axis=1), 1.0, atol=1e-5)


def test_k_larger_than_index_and_empty_index():
    x, labels, ids = data(3)
    index = SupportIndex(DIM)
    scores, got_labels, got_ids = index.search(x[:2], k=5)
    assert scores.shape == got_labels.shape == got_ids.shape == (2, 0)
    index.add(x, labels, ids)
    scores, _, got_ids = index.search(x[:2], k=5)
    assert scores.shape == (2, 3) and set(got_ids[0]) == set(ids)


def test_input_validation():
    x, labels, ids = data(4)
    index = SupportIndex(DIM)
    with pytest.raises(ValueError, match=r"shape \(N, 24\)"):
        index.add(x[:, :5], labels, ids)
    with pytest.raises(ValueError, match="labels"):
        index.add(x, labels[:3], ids)
    with pytest.raises(ValueError, match="all-zero"):
        index.add(np.zeros((1, DIM)), ["a"], [1])
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, DIM), np.nan), k=1)
    index.add(x, labels, ids)
    with pytest.raises(ValueError, match="already present"):
        index.add(x[:1], labels[:1], ids[:1])
    with pytest.raises(ValueError, match="repeats"):
        index.add(x[:2], labels[:2], [7, 7])
    with pytest.raises(ValueError, match="k must be"):
        index.search(x, k=0)
    assert len(index) == 4  # failed adds changed nothing


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved SupportIndex"):
        SupportIndex.load(tmp_path / "nothing")
    x, labels, ids = data(5)
    index = SupportIndex(DIM)
    index.add(x, labels, ids)
    index.save(tmp_path / "idx")
    (tmp_path / "idx" / "labels.json").write_text('["only-one"]')
    with pytest.raises(ValueError, match="inconsistent"):
        SupportIndex.load(tmp_path / "idx")


def test_label_counts_follow_every_change(tmp_path):
    rng = np.random.default_rng(0)
    idx = SupportIndex(8)
    idx.add(rng.normal(size=(5, 8)), ["a", "a", "b", "c", "c"])
    assert idx.label_counts() == {"a": 2, "b": 1, "c": 2}
    idx.add(rng.normal(size=(1, 8)), ["b"])
    assert idx.label_counts() == {"a": 2, "b": 2, "c": 2}
    idx.remove(idx.ids[:2])
    assert idx.label_counts() == {"b": 2, "c": 2}
    idx.save(tmp_path / "s")
    assert SupportIndex.load(tmp_path / "s").label_counts() == {"b": 2, "c": 2}
