"""Hand-written torch iMAML meta-gradients: a loop over tasks with plain ``torch.autograd``.

Independent of :mod:`bilevel` on purpose: the benchmark's references (run in float64)
and its "hand-written torch" rows (float32) come from here.

* :func:`implicit`: ``K`` detached gradient steps, then ``x = (I + H/lam)^{-1} g_test``
  by CG from zero with a reverse-over-reverse Hessian-vector product on a graph built
  once per task (``steps`` iterations, or until ``||r|| <= rtol ||g_test||``).
* :func:`unrolled`: reverse mode through the ``K`` steps (MAML with the proximal term).
* :func:`converged`: the inner problem minimized (L-BFGS) to ``||G|| <= inner_tol`` and
  the linear system solved to ``rtol``: the ground truth every meta-gradient is compared with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from _tasks import SPECS, proximal, task_loss


def _inner_grad(problem: str, phi, theta, xs, ys, create_graph: bool = False):
    loss = task_loss(problem, phi, xs, ys) + proximal(phi, theta, SPECS[problem].lam)
    return torch.autograd.grad(loss, phi, create_graph=create_graph)


def _descend(problem: str, theta, xs, ys, steps: int):
    """``steps`` gradient steps of size ``alpha`` from ``theta`` (no graph kept)."""
    alpha = SPECS[problem].alpha
    phi = tuple(t.detach().clone() for t in theta)
    for _ in range(steps):
        phi = tuple(p.requires_grad_() for p in phi)
        grads = _inner_grad(problem, phi, theta, xs, ys)
        phi = tuple((p - alpha * g).detach() for p, g in zip(phi, grads))
    return phi


def conjugate_gradient(matvec, b: Tensor, steps: int, rtol: float = 0.0) -> tuple[Tensor, Tensor]:
    """Plain CG from zero on a flat vector; returns ``(x, ||b - A x||)`` (recurrence residual)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    tol2 = (rtol ** 2) * rs
    for _ in range(steps):
        if rtol and rs <= tol2:
            break
        ap = matvec(p)
        a = rs / (p @ ap)
        x = x + a * p
        r = r - a * ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, torch.sqrt(rs)


def _implicit_task(problem: str, phi, xs, ys, xq, yq, cg_steps: int, rtol: float = 0.0):
    lam = SPECS[problem].lam
    phi = tuple(p.detach().requires_grad_() for p in phi)
    g_train = torch.autograd.grad(task_loss(problem, phi, xs, ys), phi, create_graph=True)
    g_test = torch.cat([g.reshape(-1) for g in torch.autograd.grad(task_loss(problem, phi, xq, yq), phi)])
    sizes = [p.numel() for p in phi]

    def matvec(v: Tensor) -> Tensor:  # (I + H/lam) v
        hv = torch.autograd.grad(g_train, phi, tuple(c.view_as(p) for c, p in zip(v.split(sizes), phi)),
                                 retain_graph=True)
        return v + torch.cat([h.reshape(-1) for h in hv]) / lam

    x, residual = conjugate_gradient(matvec, g_test, cg_steps, rtol)
    return x, float(residual / torch.linalg.vector_norm(g_test))


def implicit(problem: str, theta, data, steps: int, cg_steps: int) -> Tensor:
    """Mean over tasks of the implicit meta-gradient at ``K = steps``, flat."""
    xs, ys, xq, yq = data
    total = 0
    for i in range(xs.shape[0]):
        phi = _descend(problem, theta, xs[i], ys[i], steps)
        total = total + _implicit_task(problem, phi, xs[i], ys[i], xq[i], yq[i], cg_steps)[0]
    return total / xs.shape[0]


def unrolled(problem: str, theta, data, steps: int) -> Tensor:
    """Mean over tasks of the unrolled MAML meta-gradient, flat (one backward per task)."""
    alpha = SPECS[problem].alpha
    xs, ys, xq, yq = data
    tasks = xs.shape[0]
    theta = tuple(t.detach().requires_grad_() for t in theta)
    grads = [torch.zeros_like(t) for t in theta]
    for i in range(tasks):
        phi = theta
        for _ in range(steps):
            g = _inner_grad(problem, phi, theta, xs[i], ys[i], create_graph=True)
            phi = tuple(p - alpha * gi for p, gi in zip(phi, g))
        task_grad = torch.autograd.grad(task_loss(problem, phi, xq[i], yq[i]) / tasks, theta)
        grads = [a + b for a, b in zip(grads, task_grad)]
    return torch.cat([g.reshape(-1) for g in grads])


def _minimize(problem: str, theta, xs, ys, inner_tol: float, max_iter: int):
    """Inner minimizer by scipy's L-BFGS from ``theta`` (float64): ``(phi*, ||G(phi*)||)``.

    Plain gradient descent at ``alpha`` need not converge (on the sinusoid the sharpness
    grows to ``2/alpha`` and it settles into a period-2 oscillation), so the reference
    takes the local minimizer that L-BFGS reaches from ``theta``.
    """
    import numpy as np
    from scipy.optimize import minimize

    sizes, shapes = [t.numel() for t in theta], [t.shape for t in theta]

    def unflat(v):
        return tuple(c.view(s) for c, s in zip(torch.as_tensor(v, dtype=theta[0].dtype).split(sizes), shapes))

    def fun(v):
        phi = tuple(p.requires_grad_() for p in unflat(v))
        loss = task_loss(problem, phi, xs, ys) + proximal(phi, theta, SPECS[problem].lam)
        grads = torch.autograd.grad(loss, phi)
        return float(loss.detach()), np.concatenate([g.reshape(-1).numpy() for g in grads])

    start = np.concatenate([t.reshape(-1).numpy() for t in theta])
    out = minimize(fun, start, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "maxfun": 2 * max_iter, "gtol": inner_tol, "ftol": 0.0})
    return unflat(out.x), float(np.linalg.norm(fun(out.x)[1]))


def converged(problem: str, theta, data, *, inner_tol: float = 1e-9, max_inner: int = 20_000,
              rtol: float = 1e-10, max_cg: int = 5_000) -> tuple[Tensor, dict]:
    """Ground-truth meta-gradient (CPU float64) and how converged it is."""
    xs, ys, xq, yq = data
    total, worst_g, worst_r = 0, 0.0, 0.0
    for i in range(xs.shape[0]):
        phi, gnorm = _minimize(problem, theta, xs[i], ys[i], inner_tol, max_inner)
        x, residual = _implicit_task(problem, phi, xs[i], ys[i], xq[i], yq[i], max_cg, rtol)
        total = total + x
        worst_g, worst_r = max(worst_g, gnorm), max(worst_r, residual)
    return total / xs.shape[0], {"inner_grad_norm": worst_g, "cg_rel_residual": worst_r}
