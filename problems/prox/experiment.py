"""Learn the regularizer's weights (and filters) by Adam on implicit hypergradients, against a grid baseline.

A run: pick the best single weight ``exp(c)`` for every filter from a grid (by the
training MSE), start ``theta`` there, take ``steps`` Adam steps on the training
MSE with the hypergradient of the chosen differentiation, and report the PSNR
of both on the held-out images. Files in the output folder: ``metrics.jsonl``
(one record per step: loss, PSNR, adjoint-solve status and iterations, forward
iterations), ``checkpoint.pt`` (:func:`bilevel.checkpoint.save`: atomic, with a
digest, the previous one kept) and ``summary.json``. A folder that holds a run
is refused unless ``resume`` continues it or ``overwrite`` deletes its files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import bilevel
from bilevel.checkpoint import file_patterns, load_for_resume
from bilevel.checkpoint import save as save_checkpoint
from bilevel.devices import resolve_device
from bilevel.runs import output_patterns, prepare_output, write_records, write_text_atomic
from bilevel.solvers import SOLVERS, SolveResult, Status

from .data import Images, load_images
from .operators import filter_bank, gaussian_kernel
from .problem import ProxRestoration, Theta

__all__ = ["CHECKPOINT", "DIFFERENTIATIONS", "RUN_FILES", "RUN_KEYS", "hypergradient", "psnr", "run_experiment",
           "saved_settings"]

DIFFERENTIATIONS = {"optimality": "cg", "pg": "gmres", "admm": "gmres", "unrolled": None}
"""How the hypergradient is taken, with its default adjoint solver: (a) ``grad E = 0``, (b) the
proximal-gradient fixed point, (c) the ADMM fixed point, or reverse mode through ``max_iter`` PG steps."""
RUN_KEYS = frozenset({"out_dir", "resume", "overwrite", "steps", "checkpoint_every", "progress", "device",
                      "data_dir"})
"""Settings that may change between a run and its resumption (all others must match)."""
CHECKPOINT = "checkpoint.pt"
RUN_FILES = (*file_patterns(CHECKPOINT), *output_patterns("metrics.jsonl", "summary.json"))
_LOCATION = ("out_dir", "resume", "overwrite")


def psnr(x: Tensor, clean: Tensor) -> float:
    """Mean over images of ``10 log10(1 / MSE)`` (intensities in [0, 1])."""
    mse = (x - clean).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def hypergradient(problem: ProxRestoration, theta: Theta, clean: Tensor, y: Tensor, how: str, solver: str | None,
                  on_failure: str = "warn") -> tuple[Theta, Tensor, Tensor, SolveResult | None, int | None]:
    """``(grad, loss, x*, adjoint solve, forward iterations)`` of the training MSE at ``theta``.

    ``how`` is a key of :data:`DIFFERENTIATIONS`; the forward iterations are ``None`` for ``"optimality"``
    (:meth:`ProxRestoration.solve_inner` runs inside :func:`bilevel.hypergradient`).
    """
    data = (clean, y)
    if how in ("optimality", "unrolled"):
        mode = "implicit" if how == "optimality" else "unrolled"
        result = bilevel.hypergradient(problem, theta, data, solver=solver, mode=mode, on_failure=on_failure)
        iterations = problem.inner_steps if mode == "unrolled" else None
        return result.grad, result.outer_loss, result.inner, result.solve, iterations
    live = {k: v.detach().requires_grad_() for k, v in theta.items()}
    solution = (problem.pg_solution if how == "pg" else problem.admm_solution)(solver, on_failure)
    out = solution(live, y)
    x = out if how == "pg" else out["x"]
    loss = problem.outer_objective(x, live, data)
    grads = torch.autograd.grad(loss, list(live.values()))
    return dict(zip(live, grads)), loss.detach(), x.detach(), solution.last_solve, solution.forward_iterations


def _problem(settings: dict[str, Any], dtype: torch.dtype, device: torch.device) -> ProxRestoration:
    return ProxRestoration(gaussian_kernel(settings["blur"], dtype=dtype).to(device),
                           filter_bank(settings["filters"], dtype=dtype).to(device), eps=settings["eps"],
                           penalty=settings["penalty"], forward=settings["forward"], tol=settings["tol"],
                           max_iter=settings["max_iter"])


def _restore(problem: ProxRestoration, theta: Theta, y: Tensor) -> Tensor:
    with torch.no_grad():
        return problem.solve_inner(theta, (y, y), y)


def grid_search(problem: ProxRestoration, images: Images, lows: list[float]) -> list[dict[str, float]]:
    """One weight ``exp(c)`` for every filter, for each ``c``: training and held-out PSNR."""
    n_filters = problem.bank.shape[0]
    rows = []
    for c in lows:
        theta = {"log_weights": torch.full((n_filters,), c, dtype=images.train_clean.dtype,
                                           device=images.train_clean.device)}
        rows.append({"log_weight": c,
                     "train_psnr": psnr(_restore(problem, theta, images.train_observed), images.train_clean),
                     "test_psnr": psnr(_restore(problem, theta, images.test_observed), images.test_clean)})
    return rows


def _config(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: settings[k] for k in sorted(settings) if k not in RUN_KEYS}


def saved_settings(out_dir: str, resume: bool | str = True) -> dict[str, Any]:
    """The settings of the run in ``out_dir`` (``resume="previous"``: from the previous checkpoint)."""
    return load_for_resume(Path(out_dir) / CHECKPOINT, resume, map_location="cpu")["settings"]


def run_experiment(settings: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) a learning run; returns the summary (grid baseline, learned weights, PSNRs)."""
    from tqdm import tqdm

    device = resolve_device(settings["device"])
    out = prepare_output(settings["out_dir"], RUN_FILES, resume=bool(settings["resume"]),
                         overwrite=settings["overwrite"])
    ckpt_path, metrics_path = out / CHECKPOINT, out / "metrics.jsonl"
    dtype = getattr(torch, settings["dtype"])
    images = load_images(settings["dataset"], n_train=settings["n_train"], n_test=settings["n_test"],
                         size=settings["size"], blur_sigma=settings["blur"], noise=settings["noise"],
                         seed=settings["seed"], data_dir=settings["data_dir"], dtype=dtype, device=device)
    problem = _problem(settings, dtype, device)
    how = settings["differentiation"]
    solver = None if how == "unrolled" else SOLVERS[settings["solver"] or DIFFERENTIATIONS[how]](
        rtol=settings["adjoint_rtol"], maxiter=settings["adjoint_maxiter"])

    if settings["resume"]:
        ckpt = load_for_resume(ckpt_path, settings["resume"], map_location=device)
        if _config(ckpt["settings"]) != _config(settings):
            changed = sorted(k for k in _config(settings) if _config(settings)[k] != _config(ckpt["settings"]).get(k))
            raise ValueError(f"--resume: settings {changed} differ from the checkpointed run in {out}; use the same "
                             "settings, or a new --out-dir")
        grid, records, elapsed = ckpt["grid"], ckpt["records"], ckpt["elapsed"]
        theta = {k: v.to(device).requires_grad_() for k, v in ckpt["theta"].items()}
    else:
        n = settings["grid"]
        lows = [settings["grid_low"] + i * (settings["grid_high"] - settings["grid_low"]) / max(n - 1, 1)
                for i in range(n)]
        grid = grid_search(problem, images, lows)
        best = max(grid, key=lambda r: r["train_psnr"])
        theta = {"log_weights": torch.full((problem.bank.shape[0],), best["log_weight"], dtype=dtype,
                                           device=device, requires_grad=True)}
        if settings["learn_filters"]:
            theta["filters"] = problem.bank.clone().requires_grad_()
        records, elapsed = [], 0.0
    optimizer = torch.optim.Adam(list(theta.values()), lr=settings["lr"])
    if settings["resume"]:
        optimizer.load_state_dict(ckpt["optimizer"])

    def save() -> None:
        save_checkpoint({"theta": {k: v.detach() for k, v in theta.items()}, "optimizer": optimizer.state_dict(),
                         "grid": grid, "records": records, "elapsed": elapsed,
                         "settings": {k: v for k, v in settings.items() if k not in _LOCATION}}, ckpt_path)

    if not settings["resume"]:
        save()
    write_records(metrics_path, records)
    bar = tqdm(total=settings["steps"], initial=len(records), desc=f"prox {how}", disable=not settings["progress"])
    with open(metrics_path, "a") as fh:
        while len(records) < settings["steps"]:
            began = time.perf_counter()
            grad, loss, x, solve, iterations = hypergradient(problem, theta, images.train_clean,
                                                             images.train_observed, how, solver,
                                                             settings["on_failure"])
            for k, v in theta.items():
                v.grad = grad[k]
            optimizer.step()
            elapsed += time.perf_counter() - began
            record = {"step": len(records) + 1, "time": elapsed, "train_mse": float(loss),
                      "train_psnr": psnr(x, images.train_clean), "forward_iterations": iterations,
                      "adjoint_status": None if solve is None else Status(int(solve.status)).name,
                      "adjoint_iterations": None if solve is None else int(solve.iterations),
                      "log_weights": theta["log_weights"].detach().cpu().tolist()}
            records.append(record)
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            bar.update(1)
            bar.set_postfix(psnr=f"{record['train_psnr']:.2f}")
            if record["step"] % settings["checkpoint_every"] == 0:
                save()
    bar.close()
    save()
    best = max(grid, key=lambda r: r["train_psnr"])
    learned = {k: v.detach() for k, v in theta.items()}
    summary = {"observed_test_psnr": psnr(images.test_observed, images.test_clean),
               "grid_best": best, "grid_oracle_test_psnr": max(r["test_psnr"] for r in grid),
               "learned_test_psnr": psnr(_restore(problem, learned, images.test_observed), images.test_clean),
               "learned_log_weights": learned["log_weights"].cpu().tolist(), "steps": len(records),
               "seconds": elapsed, "adjoint_statuses": sorted({r["adjoint_status"] or "-" for r in records})}
    summary["gain_db"] = summary["learned_test_psnr"] - best["test_psnr"]
    write_text_atomic(out / "summary.json", json.dumps({**summary, "grid": grid, "settings": {
        k: v for k, v in settings.items() if k != "progress"}}, indent=2) + "\n")
    return summary
