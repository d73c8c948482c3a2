"""Many L2-regularised multinomial logistic regressions fitted together.

Problem for sweep member s (weight decay lambda_s), on standardised features X (N, D):

    f_s(W, b) = sum_i w_i * CE(softmax(x_i W + b), t_i) / sum_i w_i  +  lambda_s / 2 * ||W||^2

(t_i = one-hot or label-smoothed target, w_i = sample weights, intercept unpenalised). This is
scikit-learn's ``LogisticRegression(C=1 / (lambda_s * sum_i w_i))`` objective divided by
``C * sum_i w_i``, so the minimisers coincide.

All members share one (N, D) x (D, S*C) matrix product per evaluation, which is where the time
goes; members that have converged drop out of that product. Each member runs its own L-BFGS
(own curvature history, own Armijo backtracking step), all advanced in lock-step as tensors.

Preconditioning: with the eigendecomposition of the feature second-moment matrix
``X^T X / N = V diag(e) V^T`` we optimise ``W = V diag(d_s) Wh`` with ``d_s = 1 / sqrt(k e +
lambda_s)`` and ``k = 1 / C`` (the softmax curvature at uniform probabilities). Rotation by V
leaves L-BFGS unchanged; the diagonal rescaling makes the
Hessian of every member roughly isotropic, so each converges in tens of iterations instead of
hundreds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.heads.base import torch_threads



@dataclass(frozen=True)
class SweepFit:
    coef: np.ndarray  # (S, D, C) float32, in the standardised feature space
    intercept: np.ndarray  # (S, C) float32
    loss: np.ndarray  # (S,) final objective
    n_iter: np.ndarray  # (S,) iterations used
    converged: np.ndarray  # (S,) bool
    n_evals: int  # objective evaluations (each one shared (N, D) x (D, k*C) product)
    stopped: np.ndarray  # (S,) bool: stopped early by the monitor (not converged)


class Rotation:
    """Products with an orthogonal basis V (D, D), block by block where V is block-diagonal (a
    wide concatenation of backbones: `second_moment_basis`'s blocks, or one basis per backbone
    set side by side by `pipeline.sweep.cv.joined_preparation`): a quarter or less of the dense
    product's work, and the same result."""

    def __init__(self, V: torch.Tensor):
        self.V = V
        self.blocks = diagonal_blocks(V, MAX_BLOCK)

    def apply(self, M: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        """V @ M (or V^T @ M) for M (D, m)."""
        if len(self.blocks) == 1:
            return (self.V.T if transpose else self.V) @ M
        parts = []
        for a, b in self.blocks:
            B = self.V[a:b, a:b]
            parts.append((B.T if transpose else B) @ M[a:b])
        return torch.cat(parts, dim=0)

    def rows(self, X: torch.Tensor) -> torch.Tensor:
        """X @ V for X (N, D)."""
        if len(self.blocks) == 1:
            return X @ self.V
        return torch.cat([X[:, a:b] @ self.V[a:b, a:b] for a, b in self.blocks], dim=1)


def diagonal_blocks(V: torch.Tensor | np.ndarray, max_width: int) -> list[tuple[int, int]]:
    """Contiguous column ranges [a, b) such that V is zero outside the diagonal blocks
    V[a:b, a:b]: the finest such split, then neighbours merged while the merged block stays at
    most `max_width` wide (fewer, larger products; a dense V is one block)."""
    nz = (V != 0).numpy() if isinstance(V, torch.Tensor) else np.asarray(V) != 0
    D = nz.shape[0]
    if D == 0:
        return []
    has = nz.any(axis=1)
    # per row: the last and first non-zero column (rows of zeros constrain nothing)
    last = np.where(has, D - 1 - nz[:, ::-1].argmax(axis=1), -1)
    first = np.where(has, nz.argmax(axis=1), D)
    reach = np.maximum.accumulate(last)  # furthest column of rows 0..k-1
    start = np.minimum.accumulate(first[::-1])[::-1]  # nearest column of rows k..D-1
    ks = np.arange(1, D)
    cuts = ks[(reach[:-1] < ks) & (ks <= start[1:])].tolist()
    edges = [0, *cuts, D]
    merged: list[tuple[int, int]] = []
    for a, b in zip(edges[:-1], edges[1:]):
        if merged and b - merged[-1][0] <= max_width:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


class _Objective:
    def __init__(self, X, targets, weights, lambdas, V, e, n_classes, tol=0.0, Xr=None):
        # class-major, as the evaluation works (see __call__): soft targets (C, N), rows of
        # targets summing to 1; row weights (N,), summing to 1
        self.Tt = targets.T.contiguous()
        self.wt = weights
        self.tol = float(tol)
        self.lam = lambdas  # (S,) float32
        self.rot = Rotation(V)  # V (D, D) orthogonal; block-diagonal for wide inputs
        self.D = X.shape[1]
        self.C = n_classes
        kappa = 1.0 / n_classes  # softmax cross-entropy curvature at uniform probabilities
        self.d = 1.0 / torch.sqrt(kappa * e[None, :] + lambdas[:, None])  # (S, D)
        self.db = 1.0 / np.sqrt(kappa)
        # the rows in V's basis, once: then X W = Xr U with U = V^T W = diag(d) Wh, and no
        # evaluation pays a (D, D) rotation of the weights
        self.Xr = self.rot.rows(X) if Xr is None else Xr  # (N, D) = X V
        wT = targets * weights[:, None]  # (N, C)
        self.XrtwT = (self.Xr.T @ wT).double()  # (D, C): V^T sum_i w_i t_i x_i, linear CE term
        self.wT_sum = wT.sum(0).double()  # (C,)
        self.n_evals = 0

    def unpack(self, theta: torch.Tensor, idx: torch.Tensor):
        """Preconditioned params (k, P) of members idx -> real (W (k,D,C), b (k,C))."""
        k = theta.shape[0]
        D, C = self.D, self.C
        Wh = theta[:, : D * C].view(k, D, C) * self.d[idx][:, :, None]
        W = self.rot.apply(Wh.permute(1, 0, 2).reshape(D, k * C)).view(D, k, C)
        b = theta[:, D * C :] * self.db
        return W, b  # W is (D, k, C)

    def __call__(self, theta: torch.Tensor, idx: torch.Tensor):
        """Objective and gradient for members idx at preconditioned params theta (k, P).

        Logits and gradients are computed class-major, (k*C, N) = U^T Xr^T and (k*C, D) = G^T Xr:
        with a few dozen columns MKL runs these layouts markedly faster than Xr U and Xr^T G."""
        self.n_evals += 1
        k = theta.shape[0]
        D, C = self.D, self.C
        N = self.Xr.shape[0]
        U = theta[:, : D * C].view(k, D, C) * self.d[idx][:, :, None]  # V^T W, (k, D, C)
        Ut = U.transpose(1, 2).contiguous()  # (k, C, D)
        b = theta[:, D * C :] * self.db
        Zt = (Ut.view(k * C, D) @ self.Xr.T).view(k, C, N)
        Zt += b[:, :, None]
        lse = torch.logsumexp(Zt, dim=1, keepdim=True)  # (k, 1, N)
        # CE_s = sum_i w_i lse_is - sum_i w_i t_i . z_is; the second sum is linear in (U, b)
        lin = torch.einsum("dc,kdc->k", self.XrtwT, U.double()) + b.double() @ self.wT_sum
        ce = (lse[:, 0, :] * self.wt).sum(1, dtype=torch.float64) - lin
        lam = self.lam[idx]
        sq = (U * U).sum(dim=(1, 2), dtype=torch.float64)  # ||W||^2: V is orthogonal
        f = ce + 0.5 * lam.double() * sq
        Gt = Zt.sub_(lse).exp_().sub_(self.Tt).mul_(self.wt)  # dL/dZ, (k, C, N)
        gUt = (Gt.view(k * C, N) @ self.Xr).view(k, C, D)
        gUt += lam[:, None, None] * Ut
        gb = Gt.sum(dim=2)  # (k, C)
        gmax = self._gradient_max(gUt, gb)
        gWh = gUt.transpose(1, 2) * self.d[idx][:, :, None]  # (k, D, C)
        grad = torch.cat([gWh.reshape(k, D * C), gb * self.db], dim=1)
        return f, grad.contiguous(), gmax

    def _gradient_max(self, gUt: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
        """Per member, the largest absolute gradient entry in the features' own coordinates
        (what the stopping rule reads), or a value that is certainly above `tol`.

        The rotation keeps norms, so max|g| >= ||g|| / sqrt(#entries): a member whose RMS
        gradient exceeds tol cannot stop, and its exact maximum (one (D, D) product) is needed
        only once that bound no longer decides."""
        k, C, D = gUt.shape
        rms = torch.sqrt((gUt.double() ** 2).sum(dim=(1, 2)) / (C * D))
        out = torch.maximum(rms.float(), gb.abs().amax(dim=1))
        near = torch.nonzero(rms <= self.tol).flatten()
        if len(near):
            gW = self.rot.apply(gUt[near].permute(2, 0, 1).reshape(D, len(near) * C))
            out[near] = torch.maximum(gW.abs().view(D, len(near), C).amax(dim=(0, 2)),
                                      gb[near].abs().amax(dim=1))
        return out


def fit_sweep(
    X: np.ndarray,
    codes: np.ndarray,
    n_classes: int,
    lambdas,
    *,
    sample_weight: np.ndarray | None = None,
    label_smoothing: float = 0.0,
    max_iter: int = 500,
    tol: float = 1e-4,
    ftol: float = 1e-7,
    history: int = 10,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    basis: tuple[np.ndarray, np.ndarray] | None = None,
    monitor: Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
    check_every: int = 5,
    rotated: np.ndarray | None = None,
) -> SweepFit:
    """Fit one multinomial logistic regression per weight decay in ``lambdas``.

    X: (N, D) float32 standardised features; codes: (N,) int class indices in [0, n_classes).
    Stops a member when its largest absolute gradient entry (real coordinates) is <= tol, when
    its objective changes by less than ``ftol`` relative over an iteration, or at max_iter.
    init: optional (coef (S,D,C), intercept (S,C)) warm start. basis: optional precomputed
    (eigenvalues (D,), eigenvectors (D, D)) of X^T X / N (see ``second_moment_basis``).
    monitor: optional ``monitor(iteration, coef (S,D,C), intercept (S,C), active (S,) bool) ->
    (S,) bool`` called every ``check_every`` iterations with every member's current weights;
    members it flags (among the active ones) stop where they are (``SweepFit.stopped``).
    rotated: optional ``X`` already in the basis (``rotate_rows(X, basis)``), e.g. sliced per
    fold from the rows of a whole cross-validation, so no fit pays that (N, D) x (D, D) product.
    """
    Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    N, D = Xt.shape
    C = int(n_classes)
    lam = torch.as_tensor(np.asarray(lambdas, dtype=np.float32))
    S = lam.shape[0]

    T = torch.zeros(N, C, dtype=torch.float32)
    T[torch.arange(N), torch.from_numpy(np.asarray(codes, dtype=np.int64))] = 1.0
    if label_smoothing > 0:
        T = T * (1.0 - label_smoothing) + label_smoothing / C
    if sample_weight is None:
        w = torch.full((N,), 1.0 / N, dtype=torch.float32)
    else:
        sw = np.asarray(sample_weight, dtype=np.float64)
        w = torch.from_numpy((sw / sw.sum()).astype(np.float32))
    if basis is None:
        basis = second_moment_basis(X)
    e, V = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in basis)
    Xr = None
    if rotated is not None:
        if np.shape(rotated) != (N, D):
            raise ValueError(f"rotated rows have shape {np.shape(rotated)}; expected {(N, D)}")
        Xr = torch.from_numpy(np.ascontiguousarray(rotated, dtype=np.float32))
    obj = _Objective(Xt, T, w, lam, V, e, C, tol=tol, Xr=Xr)

    P = D * C + C
    theta = np.zeros((S, P), dtype=np.float32)
    if init is not None:
        W0 = torch.from_numpy(np.asarray(init[0], dtype=np.float32))
        b0 = torch.from_numpy(np.asarray(init[1], dtype=np.float32))
        Wh0 = obj.rot.apply(W0.permute(1, 0, 2).reshape(D, S * C), transpose=True)
        Wh0 = Wh0.view(D, S, C).permute(1, 0, 2)
        Wh0 = Wh0 / obj.d[:, :, None]
        theta = torch.cat([Wh0.reshape(S, D * C), b0 / obj.db], dim=1).numpy().copy()

    def evaluate(th: np.ndarray, idx: np.ndarray):
        f_, g_, gm_ = obj(torch.from_numpy(th), torch.from_numpy(idx))
        return f_.numpy(), g_.numpy(), gm_.numpy()

    # L-BFGS state in numpy: many small single-threaded ops, no OpenMP hand-offs
    all_idx = np.arange(S)
    f, g, gmax = evaluate(theta, all_idx)
    m = max(1, int(history))
    s_hist = np.zeros((m, S, P), dtype=np.float32)
    y_hist = np.zeros((m, S, P), dtype=np.float32)
    rho = np.zeros((m, S), dtype=np.float32)  # 0 marks an empty / skipped pair
    gamma = np.zeros(S, dtype=np.float32)  # 0 = no curvature pair yet
    n_iter = np.zeros(S, dtype=np.int64)
    converged = gmax <= tol
    done = converged.copy()
    slot = 0  # ring-buffer position shared by all members
    c1 = 1e-4

    def rowdot(a, b):
        return np.einsum("ij,ij->i", a, b)

    stopped = np.zeros(S, dtype=bool)
    for it in range(max_iter):
        if monitor is not None and it > 0 and it % max(1, int(check_every)) == 0:
            W_all, b_all = obj.unpack(torch.from_numpy(theta), torch.from_numpy(all_idx))
            stop = np.asarray(
                monitor(it, W_all.permute(1, 0, 2).numpy(), b_all.numpy(), ~done), dtype=bool
            ) & ~done
            stopped |= stop
            done |= stop
        act = np.flatnonzero(~done)
        if len(act) == 0:
            break
        th, fa, ga = theta[act], f[act], g[act]

        # two-loop recursion, batched over active members
        q = ga.copy()
        order = [(slot - 1 - j) % m for j in range(m)]  # newest first
        alphas = []
        for j in order:
            r_j = rho[j, act]
            if not r_j.any():
                alphas.append(None)
                continue
            s_j = s_hist[j, act]
            a = r_j * rowdot(s_j, q)
            q -= a[:, None] * y_hist[j, act]
            alphas.append((a, s_j))
        gam = gamma[act]
        no_hist = gam <= 0
        r = q * np.where(no_hist, 1.0, gam).astype(np.float32)[:, None]
        for j, item in zip(reversed(order), reversed(alphas)):
            if item is None:
                continue
            a, s_j = item
            beta = rho[j, act] * rowdot(y_hist[j, act], r)
            r += s_j * (a - beta)[:, None]
        d = -r
        gd = rowdot(ga, d).astype(np.float64)
        bad = gd >= 0  # not a descent direction: drop that member's history, steepest descent
        if bad.any():
            d[bad] = -ga[bad]
            gd[bad] = -rowdot(ga[bad], ga[bad])
            rho[:, act[bad]] = 0.0
            gamma[act[bad]] = 0.0
            no_hist = no_hist | bad
        # first step without curvature information: a unit-length move
        gnorm = np.sqrt(rowdot(ga, ga))
        t = np.where(no_hist, 1.0 / np.maximum(gnorm, 1.0), 1.0)

        # Armijo backtracking, each member on its own step length
        new_th = th + t[:, None].astype(np.float32) * d
        new_f, new_g, new_gmax = evaluate(new_th, act)
        ok = new_f <= fa + c1 * t * gd
        for _bt in range(30):
            if ok.all():
                break
            fail = np.flatnonzero(~ok)
            # safeguarded quadratic interpolation of the step
            t_f = t[fail]
            denom = 2.0 * (new_f[fail] - fa[fail] - gd[fail] * t_f)
            with np.errstate(divide="ignore", invalid="ignore"):
                t_q = np.where(denom > 0, -gd[fail] * t_f**2 / denom, 0.5 * t_f)
            t_new = np.clip(t_q, 0.1 * t_f, 0.5 * t_f)
            t[fail] = t_new
            cand = th[fail] + t_new[:, None].astype(np.float32) * d[fail]
            cf, cg, cgm = evaluate(cand, act[fail])
            new_th[fail], new_f[fail], new_g[fail], new_gmax[fail] = cand, cf, cg, cgm
            ok[fail] = cf <= fa[fail] + c1 * t_new * gd[fail]

        # a member whose line search fails is at float32 precision: stop it where it is
        stalled = ~ok
        s_vec = new_th - th
        y_vec = new_g - ga
        sy = rowdot(s_vec, y_vec)
        yy = rowdot(y_vec, y_vec)
        good = ok & (sy > 1e-10 * yy) & (yy > 0)
        rho[slot, act] = np.where(good, 1.0 / np.where(good, sy, 1.0), 0.0)
        s_hist[slot, act] = np.where(good[:, None], s_vec, 0.0)
        y_hist[slot, act] = np.where(good[:, None], y_vec, 0.0)
        gamma[act] = np.where(good, sy / np.where(good, yy, 1.0), gamma[act])
        slot = (slot + 1) % m

        rel = np.abs(fa - new_f) / np.maximum(np.abs(new_f), 1.0)
        upd = act[ok]
        theta[upd], f[upd], g[upd], gmax[upd] = new_th[ok], new_f[ok], new_g[ok], new_gmax[ok]
        n_iter[act] += 1
        conv = ok & ((new_gmax <= tol) | (rel <= ftol))
        converged[act] |= conv
        done[act] |= conv | stalled

    W, b = obj.unpack(torch.from_numpy(theta), torch.from_numpy(all_idx))
    return SweepFit(
        coef=W.permute(1, 0, 2).numpy().astype(np.float32),
        intercept=b.numpy().astype(np.float32),
        loss=f.astype(np.float64),
        n_iter=n_iter,
        converged=converged,
        n_evals=obj.n_evals,
        stopped=stopped,
    )


def rotate_rows(X: np.ndarray, basis: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """X @ V for the eigenvectors V of `basis` (block by block where V is block-diagonal): the
    rows as `fit_sweep` works on them, to compute once and slice (its `rotated`)."""
    V = torch.from_numpy(np.asarray(basis[1], dtype=np.float32))
    Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    return Rotation(V).rows(Xt).numpy()


#: widest feature block whose second-moment matrix is eigendecomposed whole; wider inputs (e.g.
#: several backbones side by side) get a block-diagonal preconditioner of blocks this wide at most
MAX_BLOCK = 1536


def second_moment_basis(X: np.ndarray, max_rows: int | None = None,
                        max_block: int = MAX_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (D,) and eigenvectors (D, D) of X^T X / N, float32 (a preconditioner only).

    Estimated from at most ``max_rows`` evenly spaced rows (default max(8192, 4 D)): enough
    for the small eigenvalues to be right (with fewer rows they collapse towards 0, the
    preconditioner over-scales those directions and L-BFGS needs ~50 % more iterations), while
    keeping the (D, N) x (N, D) product cheap. The eigendecomposition runs single-threaded:
    LAPACK's threaded path gains little at D ~ 1e3 and stalls badly on a busy machine.

    Above ``max_block`` columns the matrix is split into equal contiguous blocks and each block
    is decomposed alone (V block-diagonal): the cost falls from D^3 to D^3 / blocks^2, and since
    the preconditioner never changes the minimiser, only the iteration count, ignoring the
    correlations between blocks costs a few iterations where a full decomposition of a 4k-wide
    concatenation would cost more than the whole fit.
    """
    Xa = np.asarray(X, dtype=np.float32)
    rows = max(8192, 4 * Xa.shape[1]) if max_rows is None else int(max_rows)
    if len(Xa) > rows:
        Xa = Xa[np.linspace(0, len(Xa) - 1, rows).astype(np.int64)]
    D = Xa.shape[1]
    n_blocks = max(1, -(-D // max(1, int(max_block))))
    edges = np.linspace(0, D, n_blocks + 1).astype(np.int64)
    e = np.zeros(D, dtype=np.float32)
    V = np.zeros((D, D), dtype=np.float32)
    for a, b in zip(edges[:-1], edges[1:]):
        Xt = torch.from_numpy(np.ascontiguousarray(Xa[:, a:b]))
        M = (Xt.T @ Xt) / Xt.shape[0]
        with torch_threads(1):
            eb, Vb = torch.linalg.eigh(M)
        e[a:b] = eb.clamp_min(0).numpy()
        V[a:b, a:b] = Vb.numpy()
    return e, V
