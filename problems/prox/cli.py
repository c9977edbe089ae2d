"""``bilevel prox``: learn an image-restoration regularizer through implicit fixed points.

    x*(theta) = argmin_x 1/2 ||k * x - y||^2 + sum_j exp(theta_j) sum huber_eps(d_j * x)

with a Gaussian blur ``k`` and finite-difference filters ``d_j`` (learned too with
--learn-filters); outer loss: the training MSE; reported: held-out PSNR against
the best single weight of a grid. Examples::

    bilevel prox --dataset shapes --out-dir runs/prox                      # (a) grad E = 0, CG
    bilevel prox --mode pg --solver bicgstab --out-dir runs/prox-pg
    bilevel prox --dataset mnist --data-dir ../shared/data --mode admm --out-dir runs/prox-mnist
    bilevel prox --out-dir runs/prox --resume        # continue a stopped run, with its settings

An output folder that holds a run is refused unless --resume continues it or
--overwrite deletes it. --resume restores the run's settings from its
checkpoint; flags given with it must match, except the resumable ones (--steps,
--checkpoint-every, --log-every, --max-minutes, --device, --data-dir, --threads).
A damaged checkpoint is named with the way out: --resume previous (the previous
checkpoint, kept beside it) or --overwrite. SIGTERM or Ctrl-C stops the run after
a checkpoint of its last step.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run_command"]


def register(subparsers: Any) -> None:
    """Add the ``prox`` command."""
    from bilevel.runner.flags import add_shared_flags, deprecated_alias
    from bilevel.runner.flags import count, real, track_given
    from bilevel.solvers import SOLVERS

    from .config import DIFFERENTIATIONS, ProxConfig
    from .data import DATASETS
    from .operators import FILTER_BANKS
    from .problem import FORWARD

    d = ProxConfig()
    p = subparsers.add_parser("prox", help="learned image-restoration priors through implicit fixed points",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    track_given(p)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                      help="generated piecewise-constant shapes, or MNIST digits from --data-dir (default shapes)")
    data.add_argument("--size", type=count(8), default=d.size, help="image side in pixels (default %(default)s)")
    data.add_argument("--n-train", type=count(1), default=d.n_train, help="training images (default %(default)s)")
    data.add_argument("--n-test", type=count(1), default=d.n_test, help="held-out images (default %(default)s)")
    data.add_argument("--blur", type=real(0), default=d.blur,
                      help="Gaussian blur sigma in pixels (default %(default)s; 0 denoises)")
    data.add_argument("--noise", type=real(0), default=d.noise, help="noise standard deviation (default %(default)s)")
    model = p.add_argument_group("regularizer and solvers")
    model.add_argument("--filters", choices=FILTER_BANKS, default=d.filters,
                       help="tv: first differences; fd: first and second differences (default)")
    model.add_argument("--learn-filters", action="store_true", help="learn the 3x3 filters too (field of experts)")
    model.add_argument("--eps", type=real(0, low_open=True), default=d.eps, help="Huber width (default %(default)s)")
    model.add_argument("--mode", dest="differentiation", choices=tuple(DIFFERENTIATIONS), default=d.differentiation,
                       help="how the hypergradient is taken: optimality: implicitly through grad E = 0 (CG); pg: "
                            "through the proximal-gradient fixed point (GMRES); admm: through the ADMM fixed point "
                            "on (x, z, u) (GMRES); unrolled: reverse mode through --inner-steps PG steps")
    deprecated_alias(model, "--differentiation", "--mode", "differentiation", choices=tuple(DIFFERENTIATIONS))
    model.add_argument("--forward", choices=FORWARD, default=d.forward,
                       help="forward solver for --mode optimality (default %(default)s)")
    model.add_argument("--tol", type=real(0), default=d.tol, help="forward solvers' relative-change tolerance")
    model.add_argument("--penalty", type=real(0, low_open=True), default=d.penalty,
                       help="ADMM penalty, relative to mean(w) / eps (default %(default)s)")
    model.add_argument("--on-failure", choices=("warn", "raise", "ignore"), default=d.on_failure,
                       help="what an unconverged adjoint solve or inner solution does (always recorded)")
    model.add_argument("--dtype", choices=("float64", "float32"), default=d.dtype)
    loop = p.add_argument_group("outer loop")
    loop.add_argument("--grid", type=count(2), default=d.grid, help="single-weight grid points (default %(default)s)")
    loop.add_argument("--grid-low", type=real(), default=d.grid_low, help="smallest log weight of the grid")
    loop.add_argument("--grid-high", type=real(), default=d.grid_high, help="largest log weight of the grid")
    loop.add_argument("--lr", type=real(0, low_open=True), default=d.lr, help="Adam step (default %(default)s)")
    run = add_shared_flags(p, ProxConfig, solvers=SOLVERS, help={
        "solver": "adjoint solver (default: cg for optimality, gmres for pg and admm)",
        "inner_steps": "forward iteration cap; the unrolled steps (default {default})"})
    deprecated_alias(run, "--adjoint-rtol", "--solver-rtol", "solver_rtol", type=real(0, low_open=True))
    deprecated_alias(run, "--adjoint-maxiter", "--solver-maxiter", "solver_maxiter", type=count(1))
    deprecated_alias(run, "--max-iter", "--inner-steps", "inner_steps", type=count(1))
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from bilevel.runner.flags import config_from_args, run_from_args

    from .config import ProxConfig
    from .experiment import COMMAND

    return run_from_args(COMMAND, config_from_args(ProxConfig, args), args)
