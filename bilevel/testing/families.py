"""Bilevel problem families whose hypergradients are known, built deterministically.

Each family is a :class:`~bilevel.BilevelProblem` whose tensors all live in
``data`` (a dict), so that a batch of instances is a batch of ``data`` for
``torch.func.vmap``; the problem object holds only scalars. Each defines
``closed_form(outer, data)``, the exact hypergradient ``dF/dtheta``:

=============== ============================================ ====================== ========================
family          inner problem                                ``d_phi G``            reference
=============== ============================================ ====================== ========================
ridge           least squares + per-feature L2 ``exp(theta)`` SPD                    closed form
quadratic       ``1/2 phi^T A phi + phi^T B theta + c^T phi`` SPD, chosen condition  closed form
logistic        logistic loss + per-feature L2 ``exp(theta)`` SPD                    IFT at a tight solve
contraction     fixed point ``phi = W phi + U theta + b``     ``I - W`` nonsymmetric   closed form
saddle          min-max of a quadratic Lagrangian            symmetric indefinite   closed form
=============== ============================================ ====================== ========================

The builders (``ridge_case`` ...) turn a few small integers and the outer point
into a :class:`ProblemCase`; the hypothesis strategies in
:mod:`bilevel.testing.strategies` draw those integers, so a failing example
shrinks to small dimensions and seed 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.nn.functional import softplus

from bilevel.problem import BilevelProblem
from bilevel.pytree import tree_map

__all__ = [
    "ContractionProblem", "LogisticProblem", "ProblemCase", "QuadraticProblem", "RidgeProblem",
    "SaddleProblem", "STRUCTURES", "contraction_case", "logistic_case", "quadratic_case", "ridge_case",
    "saddle_case", "stack_data", "steps_for", "FAMILIES",
]

STRUCTURES = ("spd", "symmetric_indefinite", "nonsymmetric")
"""Structure of ``d_phi G`` at the solution, which decides the adjoint solver."""


def steps_for(rate: float, accuracy: float = 1e-14, cap: int = 3000) -> int:
    """Iterations of a linear contraction with factor ``rate`` that reach ``accuracy`` (capped)."""
    if rate <= 0.0:
        return 2
    return min(cap, int(math.ceil(math.log(accuracy) / math.log(rate))) + 10)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _orthogonal(g: torch.Generator, n: int) -> Tensor:
    q, r = torch.linalg.qr(_normal(g, n, n))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _spectrum(n: int, condition: float) -> Tensor:
    """``n`` values spread geometrically over ``[1, condition]``."""
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    return condition ** (torch.arange(n, dtype=torch.float64) / (n - 1))


def _psd(g: torch.Generator, n: int) -> Tensor:
    m = _normal(g, n, n) / math.sqrt(n)
    return m @ m.T


# ------------------------------------------------------------------ problems


class RidgeProblem(BilevelProblem):
    """Ridge regression with one L2 weight ``exp(theta_j)`` per feature, tuned on validation data.

    ``g(w, theta) = ||X w - y||^2 / (2m) + sum_j exp(theta_j) w_j^2 / 2``,
    ``f(w) = ||X_val w - y_val||^2 / (2 m_val)``. With ``H = X^T X / m + diag(exp(theta))``:
    ``w* = H^{-1} X^T y / m`` and ``dF/dtheta = -exp(theta) * w* * (H^{-1} grad_w f)``.
    """

    def inner_objective(self, w: Tensor, theta: Tensor, data: dict) -> Tensor:
        fit = (data["X"] @ w - data["y"]).pow(2).mean() / 2
        return fit + (theta.exp() * w.pow(2)).sum() / 2

    def outer_objective(self, w: Tensor, theta: Tensor, data: dict) -> Tensor:
        return (data["X_val"] @ w - data["y_val"]).pow(2).mean() / 2

    def initial_inner(self, theta: Tensor, data: dict) -> Tensor:
        return torch.zeros(data["X"].shape[-1], dtype=theta.dtype, device=theta.device)

    def hessian(self, theta: Tensor, data: dict) -> Tensor:
        X = data["X"]
        return X.T @ X / X.shape[0] + torch.diag_embed(theta.exp())

    def solve_inner(self, theta: Tensor, data: dict, init: Tensor) -> Tensor:
        X = data["X"]
        return torch.linalg.solve(self.hessian(theta, data), X.T @ data["y"] / X.shape[0])

    def closed_form(self, theta: Tensor, data: dict) -> Tensor:
        H = self.hessian(theta, data)
        w = self.solve_inner(theta, data, self.initial_inner(theta, data))
        Xv = data["X_val"]
        v = torch.linalg.solve(H, Xv.T @ (Xv @ w - data["y_val"]) / Xv.shape[0])
        return -theta.exp() * w * v


class QuadraticProblem(BilevelProblem):
    """Quadratic inner and outer problems with an SPD inner Hessian ``A`` of chosen condition.

    ``g = phi^T A phi / 2 + phi^T B theta + c^T phi`` so ``phi* = -A^{-1} (B theta + c)``;
    ``f = phi^T P phi / 2 + p^T phi + theta^T C phi + theta^T Q theta / 2``;
    ``dF/dtheta = C phi* + Q theta - B^T A^{-1} (P phi* + p + C^T theta)``.
    """

    def inner_objective(self, phi: Tensor, theta: Tensor, data: dict) -> Tensor:
        return phi @ data["A"] @ phi / 2 + phi @ (data["B"] @ theta) + data["c"] @ phi

    def outer_objective(self, phi: Tensor, theta: Tensor, data: dict) -> Tensor:
        return (phi @ data["P"] @ phi / 2 + data["p"] @ phi + theta @ data["C"] @ phi
                + theta @ data["Q"] @ theta / 2)

    def initial_inner(self, theta: Tensor, data: dict) -> Tensor:
        return torch.zeros(data["A"].shape[-1], dtype=theta.dtype, device=theta.device)

    def solve_inner(self, theta: Tensor, data: dict, init: Tensor) -> Tensor:
        return -torch.linalg.solve(data["A"], data["B"] @ theta + data["c"])

    def closed_form(self, theta: Tensor, data: dict) -> Tensor:
        phi = self.solve_inner(theta, data, self.initial_inner(theta, data))
        d_phi = data["P"] @ phi + data["p"] + data["C"].T @ theta
        return data["C"] @ phi + data["Q"] @ theta - data["B"].T @ torch.linalg.solve(data["A"], d_phi)


class LogisticProblem(BilevelProblem):
    """L2-regularized logistic regression (labels +-1), per-feature weights ``exp(theta_j)``.

    ``g(w, theta) = mean(softplus(-y X w)) + sum_j exp(theta_j) w_j^2 / 2``,
    ``f(w) = mean(softplus(-y_val X_val w))``. No closed form for ``w*``: the inner
    problem is solved by ``newton_steps`` Newton steps (a fixed count, so it is
    vmap-safe), and :meth:`closed_form` is the implicit function theorem with the
    dense Hessian ``H = X^T diag(s(1-s)) X / m + diag(exp(theta))`` at that solution:
    ``dF/dtheta = -exp(theta) * w* * (H^{-1} grad_w f)``.
    """

    newton_steps: int = 25

    def inner_objective(self, w: Tensor, theta: Tensor, data: dict) -> Tensor:
        return softplus(-data["y"] * (data["X"] @ w)).mean() + (theta.exp() * w.pow(2)).sum() / 2

    def outer_objective(self, w: Tensor, theta: Tensor, data: dict) -> Tensor:
        return softplus(-data["y_val"] * (data["X_val"] @ w)).mean()

    def initial_inner(self, theta: Tensor, data: dict) -> Tensor:
        return torch.zeros(data["X"].shape[-1], dtype=theta.dtype, device=theta.device)

    def hessian(self, w: Tensor, theta: Tensor, data: dict) -> Tensor:
        X = data["X"]
        s = torch.sigmoid(data["y"] * (X @ w))
        return (X.T * (s * (1 - s))) @ X / X.shape[0] + torch.diag_embed(theta.exp())

    def solve_inner(self, theta: Tensor, data: dict, init: Tensor) -> Tensor:
        w = init
        for _ in range(self.newton_steps):
            w = w - torch.linalg.solve(self.hessian(w, theta, data), self.optimality(w, theta, data))
        return w

    def closed_form(self, theta: Tensor, data: dict) -> Tensor:
        w = self.solve_inner(theta, data, self.initial_inner(theta, data))
        d_w = torch.func.grad(self.outer_objective)(w, theta, data)
        return -theta.exp() * w * torch.linalg.solve(self.hessian(w, theta, data), d_w)


class ContractionProblem(BilevelProblem):
    """Fixed point ``phi = T(phi, theta) = W phi + U theta + b`` with ``||W||_2 < 1``.

    ``G = phi - T(phi, theta)``, so ``d_phi G = I - W`` is nonsymmetric, and
    ``inner_lr = 1`` makes ``inner_update`` the iteration ``phi <- T(phi)``.
    ``f = ||phi - t||^2 / 2 + gamma ||theta||^2 / 2``;
    ``phi* = (I - W)^{-1} (U theta + b)``, ``dF/dtheta = gamma theta + U^T (I - W)^{-T} (phi* - t)``.
    """

    inner_lr = 1.0
    gamma = 0.1

    def optimality(self, phi: Tensor, theta: Tensor, data: dict) -> Tensor:
        return phi - (data["W"] @ phi + data["U"] @ theta + data["b"])

    def outer_objective(self, phi: Tensor, theta: Tensor, data: dict) -> Tensor:
        return (phi - data["t"]).pow(2).sum() / 2 + self.gamma * theta.pow(2).sum() / 2

    def initial_inner(self, theta: Tensor, data: dict) -> Tensor:
        return torch.zeros(data["W"].shape[-1], dtype=theta.dtype, device=theta.device)

    def _i_minus_w(self, data: dict) -> Tensor:
        W = data["W"]
        return torch.eye(W.shape[-1], dtype=W.dtype, device=W.device) - W

    def solve_inner(self, theta: Tensor, data: dict, init: Tensor) -> Tensor:
        return torch.linalg.solve(self._i_minus_w(data), data["U"] @ theta + data["b"])

    def closed_form(self, theta: Tensor, data: dict) -> Tensor:
        phi = self.solve_inner(theta, data, self.initial_inner(theta, data))
        v = torch.linalg.solve(self._i_minus_w(data).T, phi - data["t"])
        return self.gamma * theta + data["U"].T @ v


class SaddleProblem(BilevelProblem):
    """Min over ``x``, max over ``y`` of ``L = x^T P x / 2 + x^T K y - y^T R y / 2 + x^T B theta - c^T y``.

    ``G = (d_x L, d_y L) = (P x + K y + B theta, K^T x - R y - c)`` has the symmetric
    indefinite Jacobian ``J = [[P, K], [K^T, -R]]`` (``P``, ``R`` SPD): MINRES, GMRES
    or a direct solve, not CG. ``inner_update`` is gradient descent-ascent. With
    ``f = ||x - t||^2 / 2 + s^T y + gamma ||theta||^2 / 2`` and ``J v = (x* - t, s)``:
    ``dF/dtheta = gamma theta - B^T v_x``.
    """

    gamma = 0.1

    def optimality(self, inner: dict, theta: Tensor, data: dict) -> dict:
        x, y = inner["x"], inner["y"]
        return {"x": data["P"] @ x + data["K"] @ y + data["B"] @ theta,
                "y": data["K"].T @ x - data["R"] @ y - data["c"]}

    def inner_update(self, inner: dict, theta: Tensor, data: dict) -> dict:
        G = self.optimality(inner, theta, data)
        return {"x": inner["x"] - self.inner_lr * G["x"], "y": inner["y"] + self.inner_lr * G["y"]}

    def outer_objective(self, inner: dict, theta: Tensor, data: dict) -> Tensor:
        return ((inner["x"] - data["t"]).pow(2).sum() / 2 + data["s"] @ inner["y"]
                + self.gamma * theta.pow(2).sum() / 2)

    def initial_inner(self, theta: Tensor, data: dict) -> dict:
        zeros = lambda n: torch.zeros(n, dtype=theta.dtype, device=theta.device)  # noqa: E731
        return {"x": zeros(data["P"].shape[-1]), "y": zeros(data["R"].shape[-1])}

    def kkt(self, data: dict) -> Tensor:
        return torch.cat([torch.cat([data["P"], data["K"]], -1),
                          torch.cat([data["K"].T, -data["R"]], -1)], -2)

    def solve_inner(self, theta: Tensor, data: dict, init: dict) -> dict:
        n = data["P"].shape[-1]
        z = torch.linalg.solve(self.kkt(data), torch.cat([-data["B"] @ theta, data["c"]]))
        return {"x": z[:n], "y": z[n:]}

    def closed_form(self, theta: Tensor, data: dict) -> Tensor:
        n = data["P"].shape[-1]
        inner = self.solve_inner(theta, data, self.initial_inner(theta, data))
        v = torch.linalg.solve(self.kkt(data), torch.cat([inner["x"] - data["t"], data["s"]]))
        return self.gamma * theta - data["B"].T @ v[:n]


# --------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True, repr=False)
class ProblemCase:
    """One drawn problem instance with its known hypergradient.

    Attributes:
        family: the family's name (``"ridge"``, ``"quadratic"``, ...).
        problem: the :class:`~bilevel.BilevelProblem`; its ``inner_lr`` makes
            ``inner_update`` a contraction and ``inner_steps`` runs it to ~1e-14.
        outer: the outer point ``theta``.
        data: dict of tensors (all in the case's dtype).
        structure: structure of ``d_phi G``: one of :data:`STRUCTURES`.
        rate: contraction factor of ``inner_update`` (a bound, or the spectral radius).
        params: the integers and numbers it was built from (shown by ``repr``).
    """

    family: str
    problem: BilevelProblem
    outer: Tensor
    data: dict
    structure: str
    rate: float
    params: dict

    def expected(self) -> Tensor:
        """The exact hypergradient, computed in float64."""
        cast = lambda t: t.to(torch.float64)  # noqa: E731
        return self.problem.closed_form(cast(self.outer), tree_map(cast, self.data))

    def to(self, dtype: torch.dtype) -> "ProblemCase":
        """The same case with ``outer`` and ``data`` cast to ``dtype``."""
        cast = lambda t: t.to(dtype)  # noqa: E731
        return dataclasses.replace(self, outer=cast(self.outer), data=tree_map(cast, self.data))

    @property
    def dtype(self) -> torch.dtype:
        return self.outer.dtype

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        point = [round(x, 6) for x in self.outer.tolist()]
        return f"{self.family}_case({args}, outer={point}, dtype={self.dtype})"


def _problem(cls: type, rate: float, lr: float) -> BilevelProblem:
    problem = cls()
    problem.inner_lr = lr
    problem.inner_steps = steps_for(rate)
    problem.inner_tol = 0.0
    problem.residual_tol = 1e-6
    return problem


def _finish(family: str, problem: BilevelProblem, outer: Sequence[float], data: dict, structure: str,
            rate: float, dtype: torch.dtype, params: dict) -> ProblemCase:
    theta = torch.tensor(list(outer), dtype=torch.float64)
    return ProblemCase(family, problem, theta.to(dtype), tree_map(lambda t: t.to(dtype), data),
                       structure, rate, dict(params))


def _check_outer(outer: Sequence[float], n: int, family: str) -> None:
    if len(outer) != n:
        raise ValueError(f"{family}_case needs an outer point of length {n}, got {len(outer)}")


def ridge_case(features: int, samples: int, seed: int, outer: Sequence[float],
               dtype: torch.dtype = torch.float64) -> ProblemCase:
    """Ridge regression, ``features`` L2 weights, ``samples`` training and validation rows."""
    _check_outer(outer, features, "ridge")
    g = _generator(seed)
    w_true = _normal(g, features)
    X, X_val = _normal(g, samples, features), _normal(g, samples + 1, features)
    data = {"X": X, "y": X @ w_true + 0.1 * _normal(g, samples),
            "X_val": X_val, "y_val": X_val @ w_true + 0.1 * _normal(g, samples + 1)}
    theta = torch.tensor(list(outer), dtype=torch.float64)
    eig = torch.linalg.eigvalsh(RidgeProblem().hessian(theta, data))
    lo, hi = float(eig[0]), float(eig[-1])
    rate = (hi - lo) / (hi + lo)
    problem = _problem(RidgeProblem, rate, 2.0 / (hi + lo))
    return _finish("ridge", problem, outer, data, "spd", rate, dtype,
                   {"features": features, "samples": samples, "seed": seed})


def quadratic_case(dim: int, outer_dim: int, condition: float, seed: int, outer: Sequence[float],
                   dtype: torch.dtype = torch.float64) -> ProblemCase:
    """Quadratic bilevel problem, inner Hessian with eigenvalues spread over ``[1, condition]``."""
    _check_outer(outer, outer_dim, "quadratic")
    g = _generator(seed)
    U = _orthogonal(g, dim)
    data = {"A": (U * _spectrum(dim, condition)) @ U.T, "B": _normal(g, dim, outer_dim) / math.sqrt(dim),
            "c": _normal(g, dim), "P": _psd(g, dim), "p": _normal(g, dim),
            "C": _normal(g, outer_dim, dim) / math.sqrt(dim), "Q": _psd(g, outer_dim)}
    rate = (condition - 1.0) / (condition + 1.0)
    problem = _problem(QuadraticProblem, rate, 2.0 / (1.0 + condition))
    return _finish("quadratic", problem, outer, data, "spd", rate, dtype,
                   {"dim": dim, "outer_dim": outer_dim, "condition": condition, "seed": seed})


def logistic_case(features: int, samples: int, seed: int, outer: Sequence[float],
                  dtype: torch.dtype = torch.float64) -> ProblemCase:
    """Logistic regression, ``features`` L2 weights, labels from a noisy linear model."""
    _check_outer(outer, features, "logistic")
    g = _generator(seed)
    w_true = _normal(g, features)
    X, X_val = _normal(g, samples, features), _normal(g, samples + 1, features)
    label = lambda Z: torch.where(Z @ w_true + 0.5 * _normal(g, Z.shape[0]) >= 0, 1.0, -1.0)  # noqa: E731
    data = {"X": X, "y": label(X).double(), "X_val": X_val, "y_val": label(X_val).double()}
    lam = torch.tensor(list(outer), dtype=torch.float64).exp()
    smooth = float(torch.linalg.matrix_norm(X, ord=2)) ** 2 / (4 * samples) + float(lam.max())
    strong = float(lam.min())
    rate = (smooth - strong) / (smooth + strong)
    problem = _problem(LogisticProblem, rate, 2.0 / (smooth + strong))
    return _finish("logistic", problem, outer, data, "spd", rate, dtype,
                   {"features": features, "samples": samples, "seed": seed})


def contraction_case(dim: int, outer_dim: int, rho: float, seed: int, outer: Sequence[float],
                     dtype: torch.dtype = torch.float64) -> ProblemCase:
    """Linear fixed point with a nonsymmetric ``W`` of spectral norm ``rho < 1``."""
    _check_outer(outer, outer_dim, "contraction")
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"contraction_case needs 0 <= rho < 1, got {rho}")
    g = _generator(seed)
    singular = torch.linspace(1.0, 0.3, dim, dtype=torch.float64) if dim > 1 else torch.ones(1, dtype=torch.float64)
    data = {"W": rho * (_orthogonal(g, dim) * singular) @ _orthogonal(g, dim).T,
            "U": _normal(g, dim, outer_dim) / math.sqrt(dim), "b": _normal(g, dim), "t": _normal(g, dim)}
    problem = _problem(ContractionProblem, rho, 1.0)
    return _finish("contraction", problem, outer, data, "nonsymmetric", rho, dtype,
                   {"dim": dim, "outer_dim": outer_dim, "rho": rho, "seed": seed})


def saddle_case(primal: int, dual: int, outer_dim: int, seed: int, outer: Sequence[float],
                dtype: torch.dtype = torch.float64) -> ProblemCase:
    """Quadratic min-max problem with ``primal`` + ``dual`` variables."""
    _check_outer(outer, outer_dim, "saddle")
    g = _generator(seed)
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    data = {"P": _psd(g, primal) + eye(primal), "R": _psd(g, dual) + eye(dual),
            "K": _normal(g, primal, dual) / math.sqrt(primal), "B": _normal(g, primal, outer_dim),
            "c": _normal(g, dual), "t": _normal(g, primal), "s": _normal(g, dual)}
    # Gradient descent-ascent iterates with I - lr M, M = [[P, K], [-K^T, R]], Re(eig M) > 0.
    M = torch.cat([torch.cat([data["P"], data["K"]], -1), torch.cat([-data["K"].T, data["R"]], -1)], -2)
    eig = torch.linalg.eigvals(M)
    lr = float((eig.real / eig.abs().pow(2)).min())
    rate = float((1 - lr * eig).abs().max())
    problem = _problem(SaddleProblem, rate, lr)
    return _finish("saddle", problem, outer, data, "symmetric_indefinite", rate, dtype,
                   {"primal": primal, "dual": dual, "outer_dim": outer_dim, "seed": seed})


FAMILIES: dict[str, Callable[..., ProblemCase]] = {
    "ridge": ridge_case, "quadratic": quadratic_case, "logistic": logistic_case,
    "contraction": contraction_case, "saddle": saddle_case,
}
"""Family name -> builder."""


def stack_data(cases: Sequence[ProblemCase]) -> dict[str, Any]:
    """The ``data`` of same-shaped cases stacked along a new leading (batch) dimension."""
    return {k: torch.stack([c.data[k] for c in cases]) for k in cases[0].data}
