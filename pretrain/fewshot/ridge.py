"""The few-shot fit: closed-form ridge regression from frozen features to ±1 one-vs-all targets, in float64.

The ViT paper's few-shot linear evaluation (arXiv 2010.11929, section 4.1) as big_vision's `fewshot_lsr`
evaluator computes it, with the L2 weight chosen on held-out shots:

1. Features are standardised with the fit set's per-dimension mean and (population) std + `STD_EPS`.
2. Targets: one column per class, +1 for the sample's class and -1 elsewhere.
3. Ridge with an unregularised intercept: `min_w,b |X w + b - Y|^2 + alpha |w|^2`, i.e. scikit-learn's
   `RidgeClassifier(alpha, fit_intercept=True)` on the standardised features. (big_vision appends a constant-100
   feature instead, a nearly unregularised bias; centring makes it exactly unregularised.)
4. Solved for every alpha of the grid at once from one eigendecomposition: of `X^T X` (D x D, the primal form) or,
   when there are fewer samples than dimensions, of `X X^T` (N x N, the dual form), as big_vision does. Products
   with the ±1 targets are per-class sums (O(N D), not O(N D C)).
5. With k >= 2 shots, the last `holdout_shots(k)` shots of each class are held out, the grid is fitted on the rest,
   and the alpha with the best held-out accuracy wins; then the fit is redone on all k shots with it. Held-out
   shots are few (a fifth), so several alphas often tie: the tie goes to the one nearest `DEFAULT_L2` (big_vision's
   fixed weight) on the log scale. One shot per class leaves nothing to hold out: `DEFAULT_L2` itself.
6. The prediction is the class of the largest output; the accuracy is read on the test split.

Everything runs in torch float64 on the given device: in training, rank 0's GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

STD_EPS = 1e-5
"""Added to every feature's std before standardising (a constant feature stays finite), as big_vision does."""
L2_GRID = tuple(float(2.0**e) for e in range(-6, 21, 2))
"""The L2 weights tried: 2^-6, 2^-4, ..., 2^20 (features are standardised, so one grid fits every model)."""
DEFAULT_L2 = 2.0**10
"""big_vision's fixed L2 weight (`l2_reg`): used with one shot per class (nothing to hold out), and the anchor that
breaks ties between grid points of equal held-out accuracy (the nearest to it in log2 wins; then the larger)."""

Array = np.ndarray | torch.Tensor


def holdout_shots(k: int) -> int:
    """Shots per class held out to choose the L2 weight: a fifth, at least one; none with a single shot."""
    return 0 if k < 2 else max(1, k // 5)


def _f64(x: Array, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.as_tensor(x).to(device=device, dtype=torch.float64)


def standardize(x: Array, ref: Array) -> torch.Tensor:
    """`x` standardised with the mean and population std (+ STD_EPS) of `ref`, per dimension, in float64."""
    ref = _f64(ref)
    x = _f64(x, ref.device)
    return (x - ref.mean(dim=0)) / (ref.std(dim=0, correction=0) + STD_EPS)


def pm_one_targets(labels: Array, num_classes: int) -> torch.Tensor:
    """Labels (N,) -> (N, C) float64 targets: +1 at the label, -1 elsewhere."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    y = -torch.ones(len(labels), num_classes, dtype=torch.float64, device=labels.device)
    y[torch.arange(len(labels), device=labels.device), labels] = 1.0
    return y


def _class_sums(rows: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, M) rows -> (M, C): column c is the sum of the rows of class c (= rows^T @ one_hot(labels))."""
    out = torch.zeros(num_classes, rows.shape[1], dtype=rows.dtype, device=rows.device)
    return out.index_add_(0, labels, rows).T


@dataclass
class RidgeFit:
    """Ridge solutions of one fit set for every L2 weight, from one eigendecomposition."""

    lhs: torch.Tensor
    """(D, R): w(alpha) = lhs @ diag(1 / (eigs + alpha)) @ rhs."""
    eigs: torch.Tensor
    """(R,) eigenvalues of X^T X (primal) or X X^T (dual), X centred."""
    rhs: torch.Tensor
    """(R, C)."""
    x_mean: torch.Tensor
    """(D,) mean of the fit features."""
    y_mean: torch.Tensor
    """(C,) mean of the targets."""

    def weights(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(w (D, C), b (C,)) of `min |X w + b - Y|^2 + alpha |w|^2`."""
        w = (self.lhs / (self.eigs + alpha)) @ self.rhs
        return w, self.y_mean - self.x_mean @ w

    def predictions(self, x: torch.Tensor, alphas: tuple[float, ...]) -> torch.Tensor:
        """(len(alphas), N) argmax classes for features `x` (standardised like the fit set): the outputs are
        ((x - mean) @ lhs) @ diag(1 / (eigs + alpha)) @ rhs + mean(Y), the first product shared by every alpha."""
        p = (x - self.x_mean) @ self.lhs  # (N, R)
        return torch.stack([((p / (self.eigs + a)) @ self.rhs + self.y_mean).argmax(dim=1) for a in alphas])


def ridge(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, form: Literal["auto", "primal", "dual"] = "auto"
) -> RidgeFit:
    """Prepare ridge solutions for float64 features `x` (N, D) and ±1 targets of `labels` (N,).

    The primal form decomposes X^T X (D x D), the dual X X^T (N x N); `auto` takes the dual when N < D.
    """
    labels = labels.to(x.device)
    n = len(x)
    x_mean = x.mean(dim=0)
    freq = torch.bincount(labels, minlength=num_classes).to(x.dtype) / n
    y_mean = 2 * freq - 1
    xc = x - x_mean  # centred: the intercept is not regularised
    dual = form == "dual" or (form == "auto" and n < x.shape[1])
    ones = torch.ones(n, 1, dtype=x.dtype, device=x.device)

    def times_centred_targets(a: torch.Tensor) -> torch.Tensor:
        """a^T (Y - mean(Y)) for a (N, M), with Y = 2 one_hot - 1: per-class sums instead of a product with Y."""
        return 2 * _class_sums(a, labels, num_classes) - (a.T @ ones) * (1 + y_mean)  # a^T 2 onehot - a^T 1 (1 + mean)

    if dual:  # w = X^T (X X^T + a I)^-1 Y = X^T Q diag(1/(e+a)) Q^T Y
        eigs, q = torch.linalg.eigh(xc @ xc.T)
        lhs, rhs = xc.T @ q, times_centred_targets(q)
    else:  # w = (X^T X + a I)^-1 X^T Y = Q diag(1/(e+a)) Q^T X^T Y
        eigs, q = torch.linalg.eigh(xc.T @ xc)
        lhs, rhs = q, q.T @ times_centred_targets(xc)
    return RidgeFit(lhs, eigs.clamp(min=0.0), rhs, x_mean, y_mean)  # eigh's round-off can dip below 0


def predict(
    train_x: Array, train_y: Array, test_x: Array, num_classes: int, alphas: tuple[float, ...], device="cpu"
) -> np.ndarray:
    """(len(alphas), N_test) predicted classes of a ridge fit on (train_x, train_y) for each alpha, on `device`;
    the features are standardised with the training set's statistics first."""
    ref = _f64(train_x, device)
    fit = ridge(standardize(ref, ref), torch.as_tensor(train_y, dtype=torch.int64, device=ref.device), num_classes)
    return fit.predictions(standardize(test_x, ref), alphas).cpu().numpy()


@dataclass
class ShotResult:
    """The few-shot accuracy of one set at one shot count."""

    accuracy: float
    """Test accuracy of the fit on all k shots."""
    alpha: float
    """The L2 weight used (chosen on held-out shots, or DEFAULT_L2)."""
    heldout: dict[float, float] = field(default_factory=dict)
    """Held-out accuracy of each grid alpha (empty for one shot)."""
    predictions: np.ndarray | None = None
    """(N_test,) predicted classes."""


def choose_alpha(
    x: Array,
    y: np.ndarray,
    shot: np.ndarray,
    k: int,
    num_classes: int,
    grid: tuple[float, ...] = L2_GRID,
    device="cpu",
) -> tuple[float, dict[float, float]]:
    """The grid alpha with the best accuracy on the held-out shots (ties: nearest DEFAULT_L2), and every alpha's.

    Args:
        x, y: features (N, D) and labels (N,) of the k-shot train set.
        shot: (N,) the index of each sample among its class's shots (0 .. k-1); the last `holdout_shots(k)` are held
            out.
        k: shots per class.
        num_classes: classes of the set.
        grid: the L2 weights tried.
        device: where the fit runs.
    """
    h = holdout_shots(k)
    if h == 0:
        return DEFAULT_L2, {}
    held = shot >= k - h
    x, mask = _f64(x, device), torch.as_tensor(held, device=device)
    preds = predict(x[~mask], y[~held], x[mask], num_classes, grid, device)
    acc = {a: float((p == y[held]).mean()) for a, p in zip(grid, preds, strict=True)}
    return max(grid, key=lambda a: (acc[a], -abs(math.log2(a / DEFAULT_L2)), a)), acc


def fewshot_fit(
    x: Array,
    y: np.ndarray,
    shot: np.ndarray,
    k: int,
    test_x: Array,
    test_y: np.ndarray,
    num_classes: int,
    grid: tuple[float, ...] = L2_GRID,
    device="cpu",
) -> ShotResult:
    """The k-shot result: alpha chosen on held-out shots (`choose_alpha`), refitted on all k shots, test accuracy."""
    alpha, heldout = choose_alpha(x, y, shot, k, num_classes, grid, device)
    pred = predict(x, y, test_x, num_classes, (alpha,), device)[0]
    return ShotResult(float((pred == test_y).mean()) if len(test_y) else 0.0, alpha, heldout, pred)


def _ridge_flops(n: int, d: int, c: int) -> float:
    """FLOPs of `ridge` on n samples of d dimensions and c classes (an eigendecomposition counted as 9 r^3)."""
    if n < d:  # dual: X X^T, eigh, X^T Q, per-class sums of Q
        return 2.0 * n * n * d + 9.0 * n**3 + 2.0 * d * n * n + n * n
    return 2.0 * n * d * d + 9.0 * d**3 + n * d + 2.0 * d * d * c  # primal: X^T X, eigh, class sums, Q^T (X^T Y)


def fit_flops(classes: int, shots: tuple[int, ...], dim: int, test: int, grid: int = len(L2_GRID)) -> float:
    """Float64 FLOPs of one set's fits (`fewshot_fit` for every shot count, full classes): what the planner prices."""
    total = 0.0
    for k in shots:
        n, h = classes * k, holdout_shots(k)
        if h:
            fit, held = classes * (k - h), classes * h
            total += _ridge_flops(fit, dim, classes) + 2.0 * held * dim * min(fit, dim) * (1 + grid * classes / dim)
        total += _ridge_flops(n, dim, classes) + 2.0 * test * dim * min(n, dim) * (1 + classes / dim)
    return total
