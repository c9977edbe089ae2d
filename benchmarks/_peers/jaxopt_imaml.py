"""jaxopt's implicit meta-gradient: ``jaxopt.implicit_diff.custom_root``, jit-compiled.

The inner loop is a ``lax.fori_loop`` of ``K`` gradient steps; the adjoint system is
solved by ``jaxopt.linear_solve.solve_cg(maxiter=cg_steps, tol=0)`` (exactly
``cg_steps`` iterations from zero). Tasks are a Python loop inside the jitted
function, as the peers do not vectorize the meta-batch. The networks are written
again in ``jax.numpy`` (same layouts as :mod:`_tasks`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np

from _tasks import SPECS


def _forward(problem: str, params, x):
    if SPECS[problem].net == "mlp":
        w1, b1, w2, b2, w3, b3 = params
        h = jnp.tanh(x @ w1.T + b1)
        h = jnp.tanh(h @ w2.T + b2)
        return h @ w3.T + b3
    h = x
    for i in range(4):
        h = jax.lax.conv_general_dilated(h, params[2 * i], (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = jax.nn.silu(h + params[2 * i + 1][None, :, None, None])
        h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4.0
    return h.reshape(h.shape[0], -1) @ params[8].T + params[9]


def _loss(problem: str, params, x, y):
    out = _forward(problem, params, x)
    if SPECS[problem].loss == "mse":
        return jnp.mean((out - y) ** 2)
    logp = jax.nn.log_softmax(out)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def make(problem: str, theta: list[np.ndarray], data: tuple[np.ndarray, ...], steps: int, cg_steps: int,
         device: str = "cpu"):
    """``(call, block)``: ``call()`` returns the mean meta-gradient as a tuple of jax arrays."""
    lam, alpha = SPECS[problem].lam, SPECS[problem].alpha
    dev = jax.devices("gpu" if device.startswith("cuda") else "cpu")[0]

    def inner_objective(phi, meta, xs, ys):
        prox = sum(jnp.sum((p - t) ** 2) for p, t in zip(phi, meta))
        return _loss(problem, phi, xs, ys) + 0.5 * lam * prox

    @jaxopt.implicit_diff.custom_root(
        jax.grad(inner_objective),
        solve=functools.partial(jaxopt.linear_solve.solve_cg, maxiter=cg_steps, tol=0.0))
    def inner_solve(phi, meta, xs, ys):
        def body(_, p):
            g = jax.grad(inner_objective)(p, meta, xs, ys)
            return tuple(a - alpha * b for a, b in zip(p, g))
        return jax.lax.fori_loop(0, steps, body, phi)

    def meta_loss(meta, data):
        xs, ys, xq, yq = data
        tasks = xs.shape[0]
        return sum(_loss(problem, inner_solve(meta, meta, xs[i], ys[i]), xq[i], yq[i])
                   for i in range(tasks)) / tasks

    def put(a):
        return jax.device_put(jnp.asarray(a, dtype=jnp.int32 if a.dtype.kind == "i" else jnp.float32), dev)

    meta = tuple(put(t) for t in theta)
    batch = tuple(put(a) for a in data)
    meta_grad = jax.jit(jax.grad(meta_loss))
    return (lambda: meta_grad(meta, batch)), jax.block_until_ready
