"""Conformance tests run over every head in pipeline.heads.HEADS, plus head-specific checks."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from pipeline.heads import (
    HEADS,
    KNN,
    Ensemble,
    MLP,
    Head,
    HeadInputError,
    LinearProbe,
    NearestCentroid,
    NotFittedError,
    TipAdapter,
    ZeroShot,
    load_head,
)

DIM = 64
NAMES = ["zebra", "apple", "moth", "cat", "bus"]  # deliberately not sorted
INT_LABELS = [7, 3, 11, 0, 5]


def _blobs(n: int, seed: int, labels=NAMES):
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(123).normal(size=(len(labels), DIM)) * 1.5
    k = rng.integers(0, len(labels), size=n)
    X = means[k] + rng.normal(size=(n, DIM)) + 2.0  # offset: features are not centred
    return X.astype(np.float32), np.asarray(labels)[k], k


def fake_text_embedder(prompts):
    """Deterministic stand-in for a CLIP text tower: each prompt maps near its class mean."""
    means = np.random.default_rng(123).normal(size=(len(NAMES), DIM)) * 1.5
    out = []
    for p in prompts:
        hits = [i for i, name in enumerate(NAMES) if name in p]
        assert len(hits) == 1, p
        noise = np.random.default_rng(zlib.crc32(p.encode())).normal(size=DIM)
        out.append(means[hits[0]] + 2.0 + 0.1 * noise)
    return np.asarray(out, dtype=np.float32)


def make_head(name: str) -> Head:
    if name == "ZeroShot":
        return ZeroShot(text_embedder=fake_text_embedder)
    if name == "MLP":
        return MLP(hidden=64, max_epochs=30, patience=5)
    if name == "Ensemble":  # overlapping slices, a member without logits, unequal weights
        return Ensemble([LinearProbe(), KNN(k=5)], [(0, 40), (24, DIM)], weights=[2.0, 1.0])
    return HEADS[name]()


@pytest.fixture(scope="module")
def data():
    Xtr, ytr, _ = _blobs(400, seed=1)
    Xte, yte, _ = _blobs(150, seed=2)
    return Xtr, ytr, Xte, yte


@pytest.fixture(scope="module")
def fitted(data):
    Xtr, ytr, _, _ = data
    out = {}
    for name in HEADS:
        head = make_head(name)
        out[name] = (head, head.fit(Xtr, ytr))
    return out


ALL = sorted(HEADS)


def test_registry_lists_every_head():
    assert set(HEADS) == {"LinearProbe", "KNN", "NearestCentroid", "ZeroShot", "TipAdapter", "MLP",
                          "Ensemble"}
    for name, cls in HEADS.items():
        assert cls.__name__ == name and issubclass(cls, Head)


@pytest.mark.parametrize("name", ALL)
def test_fit_returns_self_and_sets_sorted_classes(name, fitted, data):
    head, ret = fitted[name]
    assert ret is head
    assert head.classes_.tolist() == sorted(NAMES)
    assert head.n_features_in_ == DIM


@pytest.mark.parametrize("name", ALL)
def test_accuracy_on_separable_blobs(name, fitted, data):
    _, _, Xte, yte = data
    head = fitted[name][0]
    assert head.score(Xte, yte) >= 0.95, name


@pytest.mark.parametrize("name", ALL)
def test_predict_proba_rows_and_column_order(name, fitted, data):
    _, _, Xte, yte = data
    head = fitted[name][0]
    proba = head.predict_proba(Xte)
    assert proba.shape == (len(Xte), len(NAMES))
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    pred = head.predict(Xte)
    np.testing.assert_array_equal(pred, head.classes_[proba.argmax(axis=1)])
    # column j really is classes_[j]: samples of that class put most mass on column j
    for j, label in enumerate(head.classes_):
        assert proba[yte == label].mean(axis=0).argmax() == j


@pytest.mark.parametrize("name", ALL)
def test_decision_function_matches_predict_where_present(name, fitted, data):
    _, _, Xte, _ = data
    head = fitted[name][0]
    if name == "KNN":
        assert not hasattr(head, "decision_function")
        return
    scores = head.decision_function(Xte)
    assert scores.shape == (len(Xte), len(NAMES))
    np.testing.assert_array_equal(head.classes_[scores.argmax(axis=1)], head.predict(Xte))


@pytest.mark.parametrize("name", ALL)
def test_integer_labels_in_shuffled_order(name):
    Xtr, ytr, _ = _blobs(300, seed=3, labels=INT_LABELS)
    head = make_head(name)
    if name == "ZeroShot":  # prompts need the class names: map int labels to them
        head.set_params(class_names=dict(zip(INT_LABELS, NAMES)))
    head.fit(Xtr, ytr.tolist())  # a plain list of Python ints
    assert head.classes_.dtype.kind == "i"
    assert head.classes_.tolist() == sorted(INT_LABELS)
    Xte, yte, _ = _blobs(100, seed=4, labels=INT_LABELS)
    pred = head.predict(Xte)
    assert pred.dtype.kind == "i"
    assert np.mean(pred == yte) >= 0.9


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip_is_exact(name, fitted, data, tmp_path):
    _, _, Xte, _ = data
    head = fitted[name][0]
    path = head.save(tmp_path / name)
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert "config.json" in files and "arrays.safetensors" in files
    assert not any(f.endswith((".pkl", ".pickle", ".pt", ".joblib")) for f in files)
    config = json.loads((path / "config.json").read_text())
    assert config["class"] == name and config["version"] == 1
    assert config["classes"] == sorted(NAMES)

    for loaded in (load_head(path), HEADS[name].load(path), Head.load(path)):
        assert type(loaded) is type(head)
        np.testing.assert_array_equal(loaded.classes_, head.classes_)
        np.testing.assert_array_equal(loaded.predict_proba(Xte), head.predict_proba(Xte))
        np.testing.assert_array_equal(loaded.predict(Xte), head.predict(Xte))
        nested = ("text_embedder", "base", "heads")  # callables / nested heads: checked per head
        saved = {k: v for k, v in head.get_params(deep=False).items() if k not in nested}
        got = {k: v for k, v in loaded.get_params(deep=False).items() if k in saved}
        assert got == saved


@pytest.mark.parametrize("name", ALL)
def test_save_load_with_integer_labels(name, tmp_path):
    Xtr, ytr, _ = _blobs(300, seed=5, labels=INT_LABELS)
    head = make_head(name)
    if name == "ZeroShot":
        head.set_params(class_names=dict(zip(INT_LABELS, NAMES)))
    head.fit(Xtr, ytr)
    loaded = load_head(head.save(tmp_path / "h"))
    assert loaded.classes_.dtype.kind == "i"
    np.testing.assert_array_equal(loaded.classes_, head.classes_)
    np.testing.assert_array_equal(loaded.predict(Xtr[:20]), head.predict(Xtr[:20]))


@pytest.mark.parametrize("name", ALL)
def test_params_stored_verbatim_and_cloneable(name):
    head = make_head(name)
    params = head.get_params(deep=False)
    clone = type(head)(**params)
    assert clone.get_params(deep=False) == params
    first = next(iter(params))
    assert head.set_params(**{first: params[first]}) is head
    with pytest.raises(ValueError, match="invalid parameter"):
        head.set_params(not_a_param=1)
    assert repr(head).startswith(name + "(")


@pytest.mark.parametrize("name", ALL)
def test_predict_before_fit_is_not_fitted_error(name, data, tmp_path):
    head = make_head(name)
    X = data[2]
    for call in (head.predict_proba, head.predict, lambda X: head.save(tmp_path)):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            call(X)


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_rejected_with_clear_errors(name, fitted, data):
    Xtr, ytr, Xte, _ = data
    head = make_head(name)
    with pytest.raises(HeadInputError, match="2-D"):
        head.fit(Xtr[0], ytr[:1])
    with pytest.raises(HeadInputError, match="2-D"):
        head.fit(Xtr[None], ytr)
    bad = Xtr.copy()
    bad[3, 5] = np.nan
    with pytest.raises(HeadInputError, match="NaN or inf in 1 row"):
        head.fit(bad, ytr)
    bad[3, 5] = np.inf
    with pytest.raises(HeadInputError, match="NaN or inf"):
        head.fit(bad, ytr)
    with pytest.raises(HeadInputError, match="different lengths"):
        head.fit(Xtr, ytr[:-1])
    with pytest.raises(HeadInputError, match="at least 2 classes"):
        head.fit(Xtr, np.full(len(Xtr), "cat"))
    with pytest.raises(HeadInputError, match="strings or integers"):
        head.fit(Xtr, np.arange(len(Xtr), dtype=float))
    with pytest.raises(HeadInputError, match="only strings or only integers"):
        head.fit(Xtr[:2], np.array(["cat", 1], dtype=object))
    with pytest.raises(HeadInputError, match="numeric"):
        head.fit(np.full((4, 3), "x"), ["a", "b", "a", "b"])

    fitted_head = fitted[name][0]
    with pytest.raises(HeadInputError, match=f"has {DIM + 1} features but this head was fitted on {DIM}"):
        fitted_head.predict_proba(np.zeros((3, DIM + 1), np.float32))
    with pytest.raises(HeadInputError, match="reshape"):
        fitted_head.predict(Xte[0])
    bad = Xte[:4].copy()
    bad[0, 0] = np.nan
    with pytest.raises(HeadInputError, match="NaN"):
        fitted_head.predict_proba(bad)


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name, fitted, data):
    Xtr, ytr, Xte, _ = data
    again = make_head(name).fit(Xtr, ytr)
    np.testing.assert_array_equal(again.predict_proba(Xte), fitted[name][0].predict_proba(Xte))


def test_load_checks_class_and_version(fitted, tmp_path):
    path = fitted["KNN"][0].save(tmp_path / "knn")
    with pytest.raises(ValueError, match="holds a KNN, not a LinearProbe"):
        LinearProbe.load(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="newer tlpipe"):
        load_head(path)
    with pytest.raises(FileNotFoundError, match="not a saved tlpipe head"):
        load_head(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------- KNN


def test_knn_votes_and_add(data):
    Xtr, ytr, Xte, yte = data
    knn = KNN(k=5, weights="uniform").fit(Xtr, ytr)
    sims, ids = knn.kneighbors(Xte[:3])
    assert sims.shape == ids.shape == (3, 5)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)  # nearest first
    proba = knn.predict_proba(Xte[:3])
    np.testing.assert_allclose(proba * 5, np.round(proba * 5), atol=1e-9)  # uniform votes of 5
    # k larger than the support set is capped
    small = KNN(k=50).fit(Xtr[:10], ytr[:10])
    assert small.kneighbors(Xte[:2])[0].shape == (2, 10)
    # add a new class: classes_ stays sorted and a query at the new points predicts it
    rng = np.random.default_rng(9)
    new = (rng.normal(size=(20, DIM)) * 0.1 - 8.0).astype(np.float32)
    knn.add(new, ["aardvark"] * 20)
    assert knn.classes_.tolist() == sorted(NAMES + ["aardvark"])
    assert set(knn.predict(new[:5])) == {"aardvark"}
    assert knn.score(Xte, yte) >= 0.95  # old classes unaffected by the re-indexing
    with pytest.raises(ValueError, match="weights must be one of"):
        KNN(weights="cubic").fit(Xtr, ytr)


def test_knn_saves_faiss_index(fitted, tmp_path):
    path = fitted["KNN"][0].save(tmp_path / "knn")
    assert (path / "index.faiss").stat().st_size > DIM * 4 * 100


# ----------------------------------------------------------------------------- ZeroShot


def test_zero_shot_needs_embedder_and_matching_dims(data):
    Xtr, ytr, _, _ = data
    with pytest.raises(ValueError, match="text_embedder"):
        ZeroShot().fit(Xtr, ytr)
    with pytest.raises(HeadInputError, match="same CLIP model"):
        ZeroShot(text_embedder=fake_text_embedder).fit(np.zeros((len(ytr), 32), np.float32), ytr)
    with pytest.raises(ValueError, match="placeholder"):
        ZeroShot(text_embedder=fake_text_embedder, templates=["no slot"]).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="mapping"):
        ZeroShot(text_embedder=fake_text_embedder, class_names=NAMES).fit(Xtr, ytr)


def test_zero_shot_prompts_and_load_without_text_tower(data, tmp_path):
    Xtr, ytr, Xte, _ = data
    seen = []

    def embedder(prompts):
        seen.extend(prompts)
        return fake_text_embedder(prompts)

    zs = ZeroShot(text_embedder=embedder, templates=("a photo of a {}.", "art of the {}."),
                  class_names={"moth": "moth insect"}, logit_scale=50.0).fit(Xtr, ytr)
    assert "a photo of a moth insect." in seen and "art of the zebra." in seen
    assert len(seen) == 2 * len(NAMES)
    assert zs.text_embeddings_.shape == (len(NAMES), DIM)
    np.testing.assert_allclose(np.linalg.norm(zs.text_embeddings_, axis=1), 1.0, atol=1e-6)
    loaded = load_head(zs.save(tmp_path / "zs"))
    assert loaded.text_embedder is None  # no text tower needed after load
    assert loaded.logit_scale == 50.0 and loaded.class_names == {"moth": "moth insect"}
    np.testing.assert_array_equal(loaded.predict_proba(Xte), zs.predict_proba(Xte))
    # logits are logit_scale * cosine
    assert np.abs(zs.decision_function(Xte)).max() <= 50.0 + 1e-4


# ----------------------------------------------------------------------------- NearestCentroid


def test_nearest_centroid_prototypes(data):
    Xtr, ytr, Xte, _ = data
    nc = NearestCentroid(temperature=0.5).fit(Xtr, ytr)
    np.testing.assert_allclose(nc.mean_, Xtr.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(nc.centroids_, axis=1), 1.0, atol=1e-6)
    sharp = NearestCentroid(temperature=0.05).fit(Xtr, ytr)
    assert sharp.predict_proba(Xte).max(axis=1).mean() > nc.predict_proba(Xte).max(axis=1).mean()
    np.testing.assert_array_equal(sharp.predict(Xte), nc.predict(Xte))
    assert np.abs(nc.decision_function(Xte)).max() <= 1 / 0.5 + 1e-5


# ----------------------------------------------------------------------------- TipAdapter


def test_tip_adapter_over_zero_shot_never_worse_on_val(tmp_path):
    # a weak zero-shot base (noisy text embeddings) that the cache can fix
    def noisy(prompts):
        out = fake_text_embedder(prompts)
        return out + np.random.default_rng(0).normal(size=out.shape).astype(np.float32) * 1.5

    Xtr, ytr, _ = _blobs(400, seed=11)
    Xv, yv, _ = _blobs(200, seed=12)
    Xte, yte, _ = _blobs(200, seed=13)
    zs = ZeroShot(text_embedder=noisy).fit(Xtr, ytr)
    tip = TipAdapter(base=zs).fit(Xtr, ytr, X_val=Xv, y_val=yv)
    assert tip.base_ is zs and tip.base_prefitted_
    base_val = next(r for r in tip.grid_results_ if r["alpha"] == 0.0)["val_accuracy"]
    assert tip.best_params_["val_accuracy"] >= base_val
    assert tip.score(Xte, yte) >= zs.score(Xte, yte)
    assert len(tip.keys_) == len(Xtr)  # X_val given: cache = train set
    loaded = load_head(tip.save(tmp_path / "tip"))
    assert (tmp_path / "tip" / "base" / "config.json").exists()
    assert isinstance(loaded.base_, ZeroShot) and isinstance(loaded.base, ZeroShot)
    np.testing.assert_array_equal(loaded.predict_proba(Xte), tip.predict_proba(Xte))


def test_tip_adapter_unfitted_base_is_cloned_and_refit(data):
    Xtr, ytr, Xte, yte = data
    base = NearestCentroid()
    tip = TipAdapter(base=base, val_fraction=0.25).fit(Xtr, ytr)
    assert not hasattr(base, "classes_")  # the param itself is never fitted
    assert isinstance(tip.base_, NearestCentroid) and not tip.base_prefitted_
    assert len(tip.keys_) == len(Xtr)  # refit=True: cache rebuilt on all of X
    assert tip.alpha_ in TipAdapter().alphas and tip.beta_ in TipAdapter().betas
    no_refit = TipAdapter(base=base, val_fraction=0.25, refit=False).fit(Xtr, ytr)
    assert len(no_refit.keys_) < len(Xtr)
    with pytest.raises(HeadInputError, match="differ from the training labels"):
        TipAdapter(base=tip.base_).fit(Xtr, np.where(ytr == "cat", "dog", ytr))


# ----------------------------------------------------------------------------- MLP


def test_mlp_early_stopping_and_validation_set(data):
    Xtr, ytr, Xte, yte = data
    mlp = MLP(hidden=32, max_epochs=200, patience=3, lr=1e-2).fit(Xtr, ytr, X_val=Xte, y_val=yte)
    assert 1 <= mlp.best_epoch_ <= len(mlp.history_) < 200
    best = min(h["val_loss"] for h in mlp.history_)
    assert mlp.history_[mlp.best_epoch_ - 1]["val_loss"] == best
    with pytest.raises(HeadInputError, match="not seen in training"):
        MLP().fit(Xtr, ytr, X_val=Xte[:3], y_val=["cat", "dog", "cat"])
    with pytest.raises(HeadInputError, match="both X_val and y_val"):
        MLP().fit(Xtr, ytr, X_val=Xte)


def test_mlp_width_follows_the_number_of_classes(data, tmp_path):
    """No width given: the power of two at or above twice the classes, within [128, 512]; the
    width used is a fitted attribute, saved and loaded with the weights."""
    from pipeline.heads.mlp import auto_hidden

    assert [auto_hidden(c) for c in (2, 10, 64, 65, 101, 256, 1000)] == [128, 128, 128, 256, 256,
                                                                        512, 512]
    Xtr, ytr, Xte, _ = data
    mlp = MLP(max_epochs=3).fit(Xtr, ytr)
    assert mlp.hidden_ == 128 and mlp.W1_.shape == (DIM, 128)
    assert MLP(hidden=48, max_epochs=3).fit(Xtr, ytr).W1_.shape == (DIM, 48)
    mlp.save(tmp_path / "mlp")
    back = load_head(tmp_path / "mlp")
    assert back.hidden_ == 128
    np.testing.assert_allclose(back.predict_proba(Xte), mlp.predict_proba(Xte), rtol=1e-6)


# ----------------------------------------------------------------------------- Ensemble


def _subset(X, y, keep):
    mask = np.isin(y, keep)
    return X[mask], y[mask]


@pytest.fixture(scope="module")
def partial_members(data):
    """Two members fitted on different class subsets and different halves of the features."""
    Xtr, ytr, _, _ = data
    half = DIM // 2
    Xa, ya = _subset(Xtr[:, :half], ytr, ["apple", "cat", "zebra"])
    Xb, yb = _subset(Xtr[:, half:], ytr, ["bus", "cat", "moth"])
    a = LinearProbe(weight_decays=[0.1]).fit(Xa, ya)
    b = NearestCentroid().fit(Xb, yb)
    return a, b, [(0, half), (half, DIM)]


def test_ensemble_aligns_members_that_saw_different_classes(partial_members, data):
    _, _, Xte, _ = data
    a, b, slices = partial_members
    ens = Ensemble.from_fitted([a, b], slices, weights=[3.0, 1.0])
    assert ens.classes_.tolist() == sorted(NAMES) and ens.n_features_in_ == DIM
    assert ens.heads_[0] is a and ens.heads_[1] is b  # used as they are, not refitted
    proba = ens.predict_proba(Xte)
    cols = {c: j for j, c in enumerate(ens.classes_)}
    want = np.zeros_like(proba)
    for head, (lo, hi), w in ((a, slices[0], 3.0), (b, slices[1], 1.0)):
        p = head.predict_proba(Xte[:, lo:hi])
        for k, c in enumerate(head.classes_):
            want[:, cols[c]] += w * p[:, k]
    np.testing.assert_allclose(proba, want / 4.0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    # a class only b knows gets exactly b's share; the shared class gets both
    np.testing.assert_allclose(proba[:, cols["bus"]],
                               b.predict_proba(Xte[:, slices[1][0]:])[:, 0] / 4.0, atol=1e-12)
    logits = ens.decision_function(Xte)
    np.testing.assert_allclose(np.exp(logits - logits.max(1, keepdims=True)).argmax(1), proba.argmax(1))
    np.testing.assert_array_equal(ens.predict(Xte), ens.classes_[proba.argmax(1)])


def test_ensemble_fit_equals_from_fitted_and_refits_fitted_members(data, partial_members):
    Xtr, ytr, Xte, yte = data
    prefitted, _, _ = partial_members  # fitted on 3 classes: fit() must refit a clone on all 5
    slices = [(0, DIM // 2), (16, DIM), (0, DIM)]  # per-backbone slices and the whole vector
    members = [prefitted, NearestCentroid(temperature=0.2), LinearProbe(weight_decays=[0.1])]
    ens = Ensemble(members, slices, weights=[1.0, 2.0, 1.0]).fit(Xtr, ytr)
    assert ens.heads == members and all(m is not h for m, h in zip(ens.heads_, members))
    assert prefitted.classes_.tolist() == ["apple", "cat", "zebra"]  # the param is untouched
    assert all(m.classes_.tolist() == sorted(NAMES) for m in ens.heads_)
    assert [m.n_features_in_ for m in ens.heads_] == [DIM // 2, DIM - 16, DIM]

    by_hand = [type(m)(**m.get_params(deep=False)).fit(Xtr[:, lo:hi], ytr)
               for m, (lo, hi) in zip(members, slices)]
    same = Ensemble.from_fitted(by_hand, slices, weights=[1.0, 2.0, 1.0])
    np.testing.assert_array_equal(same.predict_proba(Xte), ens.predict_proba(Xte))
    assert ens.score(Xte, yte) >= 0.95
    # sklearn-style params: clone and set_params work, and an equal-weight ensemble is the mean
    clone = type(ens)(**ens.get_params())
    assert clone.get_params() == ens.get_params() and not hasattr(clone, "classes_")
    clone.set_params(weights=None).fit(Xtr, ytr)
    mean = np.mean([m.predict_proba(Xte[:, lo:hi]) for m, (lo, hi) in zip(clone.heads_, slices)], axis=0)
    np.testing.assert_allclose(clone.predict_proba(Xte), mean, atol=1e-12)


def test_ensemble_save_load_round_trip_nests_any_head(data, partial_members, tmp_path):
    Xtr, ytr, Xte, _ = data
    a, b, slices = partial_members
    ens = Ensemble.from_fitted([a, b], slices, weights=[3.0, 1.0])
    path = ens.save(tmp_path / "partial")
    assert (path / "member_0" / "config.json").exists() and (path / "member_1" / "config.json").exists()
    assert not any(p.suffix in (".pkl", ".pickle") for p in path.rglob("*"))
    for loaded in (load_head(path), Ensemble.load(path), Head.load(path)):
        assert isinstance(loaded, Ensemble)
        assert [type(m) for m in loaded.heads_] == [LinearProbe, NearestCentroid]
        assert loaded.feature_slices == slices and loaded.weights == [3.0, 1.0]
        np.testing.assert_array_equal(loaded.classes_, ens.classes_)
        np.testing.assert_array_equal(loaded.predict_proba(Xte), ens.predict_proba(Xte))

    # every other head type as a member, nested saves included (TipAdapter keeps its base inside)
    members = [KNN(k=7), TipAdapter(base=NearestCentroid()), MLP(hidden=16, max_epochs=10),
               ZeroShot(text_embedder=fake_text_embedder)]
    full = Ensemble(members, [(0, 40), (8, DIM), (0, DIM), (0, DIM)]).fit(Xtr, ytr)
    loaded = load_head(full.save(tmp_path / "all"))
    assert (tmp_path / "all" / "member_1" / "base" / "config.json").exists()
    assert [type(m) for m in loaded.heads_] == [KNN, TipAdapter, MLP, ZeroShot] and loaded.weights is None
    np.testing.assert_array_equal(loaded.predict_proba(Xte), full.predict_proba(Xte))
    # a loaded ensemble refits like the original (ZeroShot needs its text tower back)
    loaded.heads[3].set_params(text_embedder=fake_text_embedder)
    np.testing.assert_allclose(loaded.fit(Xtr, ytr).predict_proba(Xte), full.predict_proba(Xte), atol=1e-6)


def test_ensemble_with_integer_labels_round_trip(tmp_path):
    Xtr, ytr, _ = _blobs(300, seed=21, labels=INT_LABELS)
    a = KNN(k=5).fit(*_subset(Xtr[:, :32], ytr, [0, 3, 7]))
    b = NearestCentroid().fit(*_subset(Xtr[:, 32:], ytr, [5, 7, 11]))
    ens = Ensemble.from_fitted([a, b], [(0, 32), (32, DIM)])
    assert ens.classes_.dtype.kind == "i" and ens.classes_.tolist() == sorted(INT_LABELS)
    loaded = load_head(ens.save(tmp_path / "e"))
    assert loaded.classes_.dtype.kind == "i"
    np.testing.assert_array_equal(loaded.predict_proba(Xtr[:20]), ens.predict_proba(Xtr[:20]))


def test_ensemble_rejects_bad_slices_members_and_weights(data, partial_members):
    Xtr, ytr, _, _ = data
    a, b, slices = partial_members
    two = [LinearProbe(), NearestCentroid()]
    with pytest.raises(HeadInputError, match=r"feature_slices\[1\] = \(32, 80\) reaches past the 64 features"):
        Ensemble(two, [(0, 32), (32, 80)]).fit(Xtr, ytr)
    with pytest.raises(HeadInputError, match=r"feature_slices\[0\] = \(10, 5\) is not a valid column range"):
        Ensemble(two, [(10, 5), (0, 8)]).fit(Xtr, ytr)
    with pytest.raises(HeadInputError, match=r"is not a \(start, stop\) pair"):
        Ensemble(two, [(0, 32), 7]).fit(Xtr, ytr)
    with pytest.raises(HeadInputError, match="got 1 feature_slices for 2 heads"):
        Ensemble(two, [(0, 32)]).fit(Xtr, ytr)
    with pytest.raises(HeadInputError, match="fitted on 32 features but feature_slices"):
        Ensemble.from_fitted([a, b], [(0, 40), slices[1]])
    with pytest.raises(NotFittedError, match="heads\\[1\\] \\(NearestCentroid\\) is not fitted"):
        Ensemble.from_fitted([a, NearestCentroid()], slices)
    with pytest.raises(ValueError, match="ensembles do not nest"):
        Ensemble([Ensemble.from_fitted([a, b], slices), NearestCentroid()], [(0, DIM), (0, 8)]).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="non-empty list of tlpipe heads"):
        Ensemble([], []).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="got 3 weights for 2 heads"):
        Ensemble(two, slices, weights=[1, 2, 3]).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="not all 0"):
        Ensemble.from_fitted([a, b], slices, weights=[0, 0])
    with pytest.raises(HeadInputError, match="has 65 features but this head was fitted on 64"):
        Ensemble.from_fitted([a, b], slices).predict_proba(np.zeros((2, DIM + 1), np.float32))


def test_mlp_adamw_matches_torch_adamw_without_importing_dynamo():
    import copy
    import subprocess
    import sys

    import torch

    from pipeline.heads.mlp import AdamW

    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    m2 = copy.deepcopy(m1)
    o1 = AdamW(list(m1.parameters()), lr=1e-2, weight_decay=1e-2)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=1e-2)
    x, y = torch.randn(50, 20), torch.randint(0, 3, (50,))
    for _ in range(30):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # fitting an MLP in a fresh process never imports torch._dynamo (seconds per Ray worker)
    code = ("import sys, numpy as np; from pipeline.heads import MLP; "
            "X = np.random.default_rng(0).normal(size=(60, 8)).astype('float32'); "
            "MLP(max_epochs=2).fit(X, np.arange(60) % 3); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
