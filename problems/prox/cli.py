"""``bilevel prox``: learn an image-restoration regularizer through implicit fixed points.

    x*(theta) = argmin_x 1/2 ||k * x - y||^2 + sum_j exp(theta_j) sum huber_eps(d_j * x)

with a Gaussian blur ``k`` and finite-difference filters ``d_j`` (learned too with
--learn-filters); outer loss: the training MSE; reported: held-out PSNR against
the best single weight of a grid. Examples::

    bilevel prox --dataset shapes --out-dir runs/prox                      # (a) grad E = 0, CG
    bilevel prox --differentiation pg --solver bicgstab --out-dir runs/prox-pg
    bilevel prox --dataset mnist --data-dir ../shared/data --differentiation admm --out-dir runs/prox-mnist
    bilevel prox --out-dir runs/prox --resume        # continue a stopped run, with its settings

An output folder that holds a run is refused unless --resume continues it or
--overwrite deletes it. --resume restores the run's settings from its
checkpoint; flags given with it must match, except the resumable ones (--steps,
--checkpoint-every, --device, --data-dir). A damaged checkpoint is named with
the way out: --resume previous (the previous checkpoint, kept beside it) or --overwrite.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``prox`` command."""
    from bilevel.runs import add_run_flags, count, real, track_given
    from bilevel.solvers import SOLVERS

    from .data import DATASETS
    from .experiment import DIFFERENTIATIONS
    from .operators import FILTER_BANKS
    from .problem import FORWARD

    p = subparsers.add_parser("prox", help="learned image-restoration priors through implicit fixed points",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    track_given(p)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="shapes",
                      help="generated piecewise-constant shapes, or MNIST digits from --data-dir (default shapes)")
    data.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $BILEVEL_DATA_DIR)")
    data.add_argument("--size", type=count(8), default=32, help="image side in pixels (default 32)")
    data.add_argument("--n-train", type=count(1), default=16, help="training images (default 16)")
    data.add_argument("--n-test", type=count(1), default=64, help="held-out images (default 64)")
    data.add_argument("--blur", type=real(0), default=1.0, help="Gaussian blur sigma in pixels (default 1; 0 denoises)")
    data.add_argument("--noise", type=real(0), default=0.05, help="noise standard deviation (default 0.05)")
    data.add_argument("--seed", type=count(0), default=0, help="seed of the images and the noise")
    model = p.add_argument_group("regularizer and solvers")
    model.add_argument("--filters", choices=FILTER_BANKS, default="fd",
                       help="tv: first differences; fd: first and second differences (default)")
    model.add_argument("--learn-filters", action="store_true", help="learn the 3x3 filters too (field of experts)")
    model.add_argument("--eps", type=real(0, low_open=True), default=0.02, help="Huber width (default 0.02)")
    model.add_argument("--differentiation", choices=tuple(DIFFERENTIATIONS), default="optimality",
                       help="optimality: grad E = 0 (CG); pg: proximal-gradient fixed point (GMRES); admm: ADMM "
                            "fixed point on (x, z, u) (GMRES); unrolled: reverse mode through --max-iter PG steps")
    model.add_argument("--solver", choices=sorted(SOLVERS), default=None,
                       help="adjoint solver (default: cg for optimality, gmres for pg and admm)")
    model.add_argument("--adjoint-rtol", type=real(0, low_open=True), default=1e-6)
    model.add_argument("--adjoint-maxiter", type=count(1), default=1000)
    model.add_argument("--forward", choices=FORWARD, default="admm",
                       help="forward solver for --differentiation optimality (default admm)")
    model.add_argument("--tol", type=real(0), default=1e-7, help="forward solvers' relative-change tolerance")
    model.add_argument("--max-iter", type=count(1), default=3000, help="forward iteration cap; the unrolled steps")
    model.add_argument("--penalty", type=real(0, low_open=True), default=0.1,
                       help="ADMM penalty, relative to mean(w) / eps (default 0.1)")
    model.add_argument("--on-failure", choices=("warn", "raise", "ignore"), default="warn",
                       help="what an unconverged adjoint solve or inner solution does (always recorded)")
    loop = p.add_argument_group("outer loop")
    loop.add_argument("--grid", type=count(2), default=13, help="single-weight grid points (default 13)")
    loop.add_argument("--grid-low", type=real(), default=-9.0, help="smallest log weight of the grid")
    loop.add_argument("--grid-high", type=real(), default=-3.0, help="largest log weight of the grid")
    loop.add_argument("--lr", type=real(0, low_open=True), default=0.05, help="Adam step (default 0.05)")
    loop.add_argument("--steps", type=count(1), default=60, help="Adam steps (default 60)")
    run_group = p.add_argument_group("run")
    run_group.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    run_group.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    run_group.add_argument("--out-dir", default="runs/prox", help="metrics, checkpoint, summary (default runs/prox)")
    add_run_flags(run_group, "<out-dir>/checkpoint.pt")
    run_group.add_argument("--checkpoint-every", type=count(1), default=10, help="steps between checkpoints")
    run_group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from bilevel.runs import given_flags, restore, settings_of

    from .experiment import RUN_KEYS, run_experiment, saved_settings

    settings = settings_of(args)
    if args.resume:  # the run's settings, with the flags given on top
        settings = restore(saved_settings(settings["out_dir"], args.resume), settings, given_flags(args), RUN_KEYS,
                           settings["out_dir"])
    if settings["grid_low"] >= settings["grid_high"]:
        raise ValueError(f"--grid-low {settings['grid_low']} must be below --grid-high {settings['grid_high']}")
    summary = run_experiment(settings)
    print(json.dumps(summary, indent=2))
    return 0
