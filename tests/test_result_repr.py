"""Result objects print statuses by name and scalars as plain numbers."""

from __future__ import annotations

import re

import torch

import bilevel
from bilevel.solvers import CG, Status

A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)


def matvec(v: torch.Tensor) -> torch.Tensor:
    return v @ A


def test_a_single_solve_shows_plain_values():
    text = repr(CG()(matvec, torch.ones(2, dtype=torch.float64)))
    # the true residual is at rounding level: 0.0 or a few units of float64's eps
    assert re.fullmatch(r"SolveResult\(x=\[0\.5, 1\.0\], converged=True, iterations=2, "
                        r"residual_norm=(0\.0|\d\.\d+e-1[5-7]), status=CONVERGED, history=None\)", text), text


def test_a_batch_shows_one_status_name_per_system():
    text = repr(CG(maxiter=1)(matvec, torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)))
    assert "converged=[True, False]" in text
    assert f"status=[CONVERGED, {Status.MAX_ITERATIONS.name}]" in text
    assert "iterations=[1, 1]" in text


def test_large_tensors_show_shape_and_dtype():
    text = repr(CG(history=True)(lambda v: 2 * v, torch.ones(20, dtype=torch.float32)))
    assert "x=Tensor(shape=(20,), dtype=torch.float32)" in text
    assert "history=Tensor(shape=(201,), dtype=torch.float32)" in text


class Ridge(bilevel.BilevelProblem):
    inner_lr, inner_steps, inner_tol = 0.3, 500, 1e-12

    def inner_objective(self, w, theta, data):
        return (w - 1).pow(2).sum() / 2 + (theta["log_lam"].exp() * w.pow(2)).sum() / 2

    def outer_objective(self, w, theta, data):
        return w.pow(2).sum() / 2

    def initial_inner(self, theta, data):
        return torch.zeros(2, dtype=torch.float64)


def test_hypergradient_result_keeps_the_tree_and_names_the_nested_status():
    theta = {"log_lam": torch.zeros(2, dtype=torch.float64)}
    text = repr(bilevel.hypergradient(Ridge(), theta, solver=CG(rtol=1e-12)))
    assert text.startswith("HypergradientResult(grad={'log_lam': [")
    assert "inner=[0.5, 0.5]" in text
    assert "outer_loss=0.25," in text
    assert "status=CONVERGED" in text and "tensor(" not in text
