"""LinearProbe: agreement with scikit-learn, sweep selection, options, batched solver."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from pipeline.heads import LinearProbe, load_head
from pipeline.heads.base import Standardizer
from pipeline.heads.batched_lbfgs import fit_sweep
from pipeline.heads.linear_probe import DEFAULT_WEIGHT_DECAYS


def _overlapping(n: int, seed: int, dim: int = 40, n_classes: int = 4, noise_dims: int = 0,
                 sep: float = 0.35):
    """Overlapping Gaussian classes (Bayes accuracy well below 100 %) + optional noise dims."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(77).normal(size=(n_classes, dim)) * sep
    k = rng.integers(0, n_classes, size=n)
    X = means[k] + rng.normal(size=(n, dim))
    if noise_dims:
        X = np.hstack([X, rng.normal(size=(n, noise_dims)) * 3.0])
    scales = np.exp(np.random.default_rng(78).normal(size=X.shape[1]))  # uneven feature scales
    return (X * scales + 5.0).astype(np.float32), k


@pytest.fixture(scope="module")
def problem():
    Xtr, ytr = _overlapping(1500, seed=1)
    Xte, yte = _overlapping(2000, seed=2)
    return Xtr, ytr, Xte, yte


def _objective(W, b, Xs, y, lam):
    Z = Xs.astype(np.float64) @ W + b
    Z -= Z.max(axis=1, keepdims=True)
    logp = Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean() + 0.5 * lam * (W**2).sum()


def test_default_sweep_has_20_log_spaced_values():
    lams = np.asarray(DEFAULT_WEIGHT_DECAYS)
    assert len(lams) == 20 and lams[0] == pytest.approx(1e-6) and lams[-1] == pytest.approx(10.0)
    np.testing.assert_allclose(np.diff(np.log(lams)), np.log(lams[1] / lams[0]))


def test_matches_sklearn_at_the_same_regularisation(problem):
    Xtr, ytr, Xte, yte = problem
    lam = 1e-2
    probe = LinearProbe(weight_decays=[lam]).fit(Xtr, ytr)
    Xs_tr = probe.scaler_.transform(Xtr)
    sk = LogisticRegression(C=1.0 / (lam * len(Xtr)), max_iter=1000, tol=1e-8).fit(Xs_tr, ytr)
    ours = _objective(probe.coef_, probe.intercept_, Xs_tr, ytr, lam)
    theirs = _objective(sk.coef_.T, sk.intercept_, Xs_tr, ytr, lam)
    assert ours <= theirs + 1e-5  # same optimisation problem, same optimum
    np.testing.assert_allclose(probe.coef_, sk.coef_.T - sk.coef_.T.mean(1, keepdims=True)
                               + probe.coef_.mean(1, keepdims=True), atol=2e-3)
    agree = np.mean(probe.predict(Xte) == sk.predict(probe.scaler_.transform(Xte)))
    assert agree >= 0.99


def test_sweep_best_matches_sklearn_best_within_one_point(problem):
    Xtr, ytr, Xte, yte = problem
    lams = np.logspace(-5, 1, 20)
    probe = LinearProbe(weight_decays=lams).fit(Xtr, ytr, X_val=Xte, y_val=yte)
    ours = max(r["val_accuracy"] for r in probe.sweep_results_)
    Xs_tr, Xs_te = probe.scaler_.transform(Xtr), probe.scaler_.transform(Xte)
    theirs = max(
        LogisticRegression(C=1.0 / (lam * len(Xtr)), max_iter=1000).fit(Xs_tr, ytr).score(Xs_te, yte)
        for lam in lams[::2]  # every other value keeps the test fast
    )
    assert ours >= theirs - 0.01
    assert probe.best_params_["selected_on"] == "X_val" and not probe.best_params_["refitted"]
    for r, lam in zip(probe.sweep_results_, lams):
        assert r["weight_decay"] == pytest.approx(lam)
        assert r["C"] == pytest.approx(1.0 / (lam * len(Xtr)))


def test_sweep_selects_interior_value_and_honest_holdout_is_close_to_oracle():
    # few samples, many pure-noise dims: both ends of the grid are clearly worse
    Xtr, ytr = _overlapping(600, seed=3, dim=10, noise_dims=150, sep=0.6)
    Xte, yte = _overlapping(3000, seed=4, dim=10, noise_dims=150, sep=0.6)
    oracle = LinearProbe().fit(Xtr, ytr, X_val=Xte, y_val=yte)
    accs = np.array([r["val_accuracy"] for r in oracle.sweep_results_])
    best = int(accs.argmax())
    assert 0 < best < len(accs) - 1
    assert accs.max() - accs[0] > 0.05 and accs.max() - accs[-1] > 0.05

    honest = LinearProbe(seed=0).fit(Xtr, ytr)
    assert honest.best_params_["selected_on"] == "holdout" and honest.best_params_["refitted"]
    assert honest.score(Xte, yte) >= accs.max() - 0.04
    assert len(honest.sweep_results_) == 20
    assert all("val_accuracy" in r and "val_log_loss" in r for r in honest.sweep_results_)


def test_refit_false_keeps_the_selected_member(problem):
    Xtr, ytr, _, _ = problem
    a = LinearProbe(weight_decays=[1e-3, 1e-1], refit=False).fit(Xtr, ytr)
    b = LinearProbe(weight_decays=[1e-3, 1e-1], refit=True).fit(Xtr, ytr)
    assert a.best_params_["weight_decay"] == b.best_params_["weight_decay"]
    assert not a.best_params_["refitted"] and b.best_params_["refitted"]
    assert not np.array_equal(a.coef_, b.coef_)


def test_scoring_log_loss_and_bad_options(problem):
    Xtr, ytr, _, _ = problem
    p = LinearProbe(weight_decays=np.logspace(-4, 0, 5), scoring="log_loss").fit(Xtr, ytr)
    losses = [r["val_log_loss"] for r in p.sweep_results_]
    assert p.best_params_["weight_decay"] == pytest.approx(np.logspace(-4, 0, 5)[int(np.argmin(losses))])
    with pytest.raises(ValueError, match="scoring"):
        LinearProbe(scoring="f1").fit(Xtr, ytr)
    with pytest.raises(ValueError, match="weight_decays"):
        LinearProbe(weight_decays=[-1.0]).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="label_smoothing"):
        LinearProbe(label_smoothing=1.5).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="class_weight"):
        LinearProbe(class_weight="sometimes").fit(Xtr, ytr)


def test_class_weight_balanced_lifts_minority_recall():
    X, y = _overlapping(4000, seed=5)
    keep = (y != 0) | (np.arange(len(y)) % 10 == 0)  # class 0 is 10x rarer
    X, y = X[keep], y[keep]
    Xte, yte = _overlapping(3000, seed=6)
    plain = LinearProbe(weight_decays=[1e-3]).fit(X, y)
    bal = LinearProbe(weight_decays=[1e-3], class_weight="balanced").fit(X, y)
    recall = lambda m: np.mean(m.predict(Xte[yte == 0]) == 0)  # noqa: E731
    assert recall(bal) > recall(plain) + 0.1
    dict_w = LinearProbe(weight_decays=[1e-3], class_weight={0: 10.0}).fit(X, y)
    assert recall(dict_w) > recall(plain) + 0.1


def test_label_smoothing_softens_probabilities(problem):
    Xtr, ytr, Xte, _ = problem
    hard = LinearProbe(weight_decays=[1e-4]).fit(Xtr, ytr)
    soft = LinearProbe(weight_decays=[1e-4], label_smoothing=0.3).fit(Xtr, ytr)
    assert soft.predict_proba(Xte).max(1).mean() < hard.predict_proba(Xte).max(1).mean() - 0.02


def test_standardisation_is_stored_and_used(problem, tmp_path):
    Xtr, ytr, Xte, _ = problem
    p = LinearProbe(weight_decays=[1e-2]).fit(Xtr, ytr)
    np.testing.assert_allclose(p.scaler_.mean, Xtr.mean(0), rtol=1e-4)
    np.testing.assert_allclose(p.scaler_.std, Xtr.std(0), rtol=1e-3)
    loaded = load_head(p.save(tmp_path / "lp"))
    np.testing.assert_array_equal(loaded.scaler_.mean, p.scaler_.mean)
    assert loaded.sweep_results_ == p.sweep_results_ and loaded.best_params_ == p.best_params_
    np.testing.assert_array_equal(loaded.decision_function(Xte), p.decision_function(Xte))
    raw = LinearProbe(weight_decays=[1e-2], standardize=False).fit(Xtr, ytr)
    assert np.all(raw.scaler_.mean == 0) and np.all(raw.scaler_.std == 1)


def test_threads_restored_and_deterministic(problem):
    Xtr, ytr, Xte, _ = problem
    before = torch.get_num_threads()
    a = LinearProbe(weight_decays=np.logspace(-4, 0, 6), n_threads=1, seed=3).fit(Xtr, ytr)
    assert torch.get_num_threads() == before
    b = LinearProbe(weight_decays=np.logspace(-4, 0, 6), n_threads=1, seed=3).fit(Xtr, ytr)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.predict_proba(Xte), b.predict_proba(Xte))


def test_batched_members_equal_separate_fits(problem):
    """Fitting values together gives the same solutions as fitting each alone."""
    Xtr, ytr, _, _ = problem
    Xs = Standardizer.fit(Xtr).transform(Xtr)
    lams = [1e-4, 1e-2, 1.0]
    together = fit_sweep(Xs, ytr, 4, lams, tol=1e-6)
    assert together.converged.all()
    for s, lam in enumerate(lams):
        alone = fit_sweep(Xs, ytr, 4, [lam], tol=1e-6)
        f_t = _objective(together.coef[s], together.intercept[s], Xs, ytr, lam)
        f_a = _objective(alone.coef[0], alone.intercept[0], Xs, ytr, lam)
        assert f_t == pytest.approx(f_a, rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(
            together.coef[s] - together.coef[s].mean(1, keepdims=True),
            alone.coef[0] - alone.coef[0].mean(1, keepdims=True), atol=5e-3)


def test_pruning_stops_only_hopeless_members():
    Xtr, ytr = _overlapping(600, seed=3, dim=10, noise_dims=150, sep=0.6)
    Xv, yv = _overlapping(1000, seed=8, dim=10, noise_dims=150, sep=0.6)
    full = LinearProbe(prune=False).fit(Xtr, ytr, X_val=Xv, y_val=yv)
    pruned = LinearProbe().fit(Xtr, ytr, X_val=Xv, y_val=yv)
    assert not any(r["stopped_early"] for r in full.sweep_results_)
    stopped = [r for r in pruned.sweep_results_ if r["stopped_early"]]
    assert stopped and all(not r["converged"] for r in stopped)
    assert pruned.best_params_["weight_decay"] == full.best_params_["weight_decay"]
    best = next(r for r in pruned.sweep_results_ if r["weight_decay"] == pruned.best_params_["weight_decay"])
    assert best["converged"] and not best["stopped_early"]
    np.testing.assert_allclose(pruned.coef_, full.coef_, atol=1e-5)
    assert sum(r["n_iter"] for r in pruned.sweep_results_) < sum(r["n_iter"] for r in full.sweep_results_)
    # too few validation rows to trust: nothing is stopped
    small = LinearProbe().fit(Xtr, ytr, X_val=Xv[:150], y_val=yv[:150])
    assert not any(r["stopped_early"] for r in small.sweep_results_)


def test_large_sets_sweep_all_values_on_a_subsample_then_finalists_on_every_row():
    """Successive halving over data: every value on a stratified subsample at the same C, the
    finalists continue on all rows; the result matches the plain all-rows sweep's best."""
    Xtr, ytr = _overlapping(3000, seed=5, dim=10, noise_dims=150, sep=0.6)
    Xte, yte = _overlapping(2000, seed=6, dim=10, noise_dims=150, sep=0.6)
    plain = LinearProbe(subsample=None).fit(Xtr, ytr, X_val=Xte, y_val=yte)
    halved = LinearProbe(subsample=1000, finalists=3).fit(Xtr, ytr, X_val=Xte, y_val=yte)

    rows = halved.sweep_results_
    assert len(rows) == 20 and [r["weight_decay"] for r in rows] == pytest.approx(list(DEFAULT_WEIGHT_DECAYS))
    finalists = [i for i, r in enumerate(rows) if r.get("finalist")]
    assert len(finalists) == 3
    for i, r in enumerate(rows):
        if i in finalists:  # trained on every row, subsample scores kept beside
            assert r["rows"] == 3000 and "subsample_val_accuracy" in r
        else:
            assert 990 <= r["rows"] <= 1010 and not r.get("finalist")
        assert r["C"] == pytest.approx(1.0 / (r["weight_decay"] * 3000), rel=0.02)  # the same C either way
    # the finalists are the subsample's best, and the chosen model is the best finalist
    sub_acc = [r.get("subsample_val_accuracy", r["val_accuracy"]) for r in rows]
    assert sorted(finalists) == sorted(np.argsort(sub_acc)[::-1][:3].tolist()) or \
        min(sub_acc[i] for i in finalists) >= sorted(sub_acc)[-3]
    best = halved.best_params_["weight_decay"]
    assert best in [rows[i]["weight_decay"] for i in finalists]
    assert halved.best_params_["val_accuracy"] == max(rows[i]["val_accuracy"] for i in finalists)
    assert halved.score(Xte, yte) >= plain.best_params_["val_accuracy"] - 0.01
    # the chosen weights are an all-rows optimum: refitting that value from scratch agrees
    ref = LinearProbe(weight_decays=[best], subsample=None).fit(Xtr, ytr)
    assert np.mean(ref.predict(Xte) == halved.predict(Xte)) >= 0.98
    # small sets and single values never halve
    small = LinearProbe(subsample=2000).fit(Xtr, ytr, X_val=Xte, y_val=yte)
    assert all(r.get("rows") is None for r in small.sweep_results_)


def test_block_diagonal_and_shared_preconditioners_reach_the_same_optimum(problem):
    """The preconditioner only changes the path: a block-diagonal basis (wide concatenations) and
    a basis from other rows (shared by CV folds) give the full basis's optimum."""
    from pipeline.heads.batched_lbfgs import second_moment_basis

    Xtr, ytr, _, _ = problem
    Xs = Standardizer.fit(Xtr).transform(Xtr)
    lams = [1e-3, 1e-2]
    e, V = second_moment_basis(Xs, max_block=16)  # 40 columns -> blocks 0:13, 13:26, 26:40
    assert not V[:13, 13:].any() and not V[13:, :13].any() and V[:13, :13].any()
    np.testing.assert_allclose(V.T @ V, np.eye(Xs.shape[1]), atol=1e-4)
    other = second_moment_basis(Xs[::3])
    full = fit_sweep(Xs, ytr, 4, lams, tol=1e-6)
    for basis in ((e, V), other):
        fit = fit_sweep(Xs, ytr, 4, lams, tol=1e-6, basis=basis)
        for s, lam in enumerate(lams):
            assert _objective(fit.coef[s], fit.intercept[s], Xs, ytr, lam) == pytest.approx(
                _objective(full.coef[s], full.intercept[s], Xs, ytr, lam), abs=1e-6)


def test_rows_rotated_once_and_sliced_give_the_same_fit(problem):
    """A cross-validation rotates every row once and hands each fold its slice (`rotated`), with
    the standardisation of all rows (`scaler`): the same iterates as rotating inside the fit."""
    from pipeline.heads.batched_lbfgs import rotate_rows, second_moment_basis

    Xtr, ytr, Xte, _ = problem
    scaler = Standardizer.fit(Xtr)
    Xs = scaler.transform(Xtr)
    basis = second_moment_basis(Xs)
    rows = np.arange(len(Xs)) % 4 != 0  # one fold's training rows
    sliced = rotate_rows(Xs, basis)[rows]
    a = fit_sweep(Xs[rows], ytr[rows], 4, [1e-3, 1e-2], basis=basis)
    b = fit_sweep(Xs[rows], ytr[rows], 4, [1e-3, 1e-2], basis=basis, rotated=sliced)
    np.testing.assert_allclose(a.coef, b.coef, atol=1e-5)
    assert list(a.n_iter) == list(b.n_iter)
    kw = dict(basis=basis, scaler=scaler)
    p = LinearProbe(weight_decays=[1e-2]).fit(Xtr[rows], ytr[rows], **kw, rotated=sliced)
    q = LinearProbe(weight_decays=[1e-2]).fit(Xtr[rows], ytr[rows], **kw)
    np.testing.assert_allclose(p.predict_proba(Xte), q.predict_proba(Xte), atol=1e-5)
    assert p.scaler_ is scaler  # the shared standardisation is the head's own
    with pytest.raises(ValueError, match="need a basis and the shape of X"):
        LinearProbe(weight_decays=[1e-2]).fit(Xtr[rows], ytr[rows], scaler=scaler, rotated=sliced[:5], basis=basis)


def test_a_basis_of_the_wrong_width_is_refused(problem):
    from pipeline.heads.batched_lbfgs import second_moment_basis

    Xtr, ytr, _, _ = problem
    with pytest.raises(ValueError, match="eigenvalues for 40 features"):
        LinearProbe(weight_decays=[1e-2]).fit(Xtr, ytr, basis=second_moment_basis(Xtr[:, :10]))


def test_rotation_block_by_block_equals_the_dense_products():
    import torch

    from pipeline.heads.batched_lbfgs import MAX_BLOCK, Rotation, second_moment_basis

    rng = np.random.default_rng(0)
    D = MAX_BLOCK + 64  # two blocks
    X = rng.normal(size=(D + 50, D)).astype(np.float32)
    _, V = second_moment_basis(X)
    rot = Rotation(torch.from_numpy(V))
    assert len(rot.blocks) == 2
    Vt = torch.from_numpy(V).double()
    M = torch.from_numpy(rng.normal(size=(D, 7)).astype(np.float32))
    Xt = torch.from_numpy(X[:40])
    np.testing.assert_allclose(rot.apply(M).double(), Vt @ M.double(), atol=1e-4)
    np.testing.assert_allclose(rot.apply(M, transpose=True).double(), Vt.T @ M.double(), atol=1e-4)
    np.testing.assert_allclose(rot.rows(Xt).double(), Xt.double() @ Vt, atol=1e-3)
    dense = Rotation(torch.from_numpy(np.linalg.qr(rng.normal(size=(D, D)))[0].astype(np.float32)))
    assert dense.blocks == [(0, D)]  # not block-diagonal: one block, the plain product
