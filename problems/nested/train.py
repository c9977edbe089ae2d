"""One method of the NestedMAML comparison, trained on one task pool, with checkpoints and exact resume.

Every method meta-trains the sinusoid MLP on the same fixed pool of ``N``
training tasks (a fraction of them corrupted, :mod:`.tasks`) with full-batch
Adam steps, and is scored on fresh clean test tasks after adaptation:

``maml``       MAML: reverse mode through the inner steps with ``lam = 0`` (the imaml problem's ``unrolled`` mode)
``imaml``      iMAML on every task (``meta_gradient`` of :mod:`bilevel.problems.imaml`)
``uniform``    the nested problem's middle level with fixed weights ``w = 1``
``oracle``     the same with weight 0 on the corrupted tasks (they are dropped)
``lookahead``  per-step weights from :func:`~.problem.lookahead_weights` (NestedMAML's released rule)
``influence``  the look-ahead rule with the implicit response (:func:`~.problem.influence_weights`):
               uniform weights before ``weight_start`` (default 0), then fresh weights every
               ``weight_every`` steps, held in between; its adjoint solve as ``nested``'s
``nested``     learned weights ``w(u)`` (``weighting``: ``N softmax(u)`` or ``2 sigmoid(u)``): from step
               ``weight_start`` (default 50) on, every ``weight_every`` theta-steps one Adam step on ``u`` along the
               implicit hypergradient
               ``bilevel.hypergradient(problem, u, data, init=theta)``. The adjoint solve linearizes the
               middle level at the current meta-parameters (as alternating implicit-differentiation
               methods do); its Jacobian is nonsymmetric (the task meta-gradients come from inexact
               inner and MINRES solves) and indefinite away from a minimum, so it is solved by GMRES
               with ``outer_ridge`` added to it

The adaptation is iMAML's (``lam``, ``inner_steps`` Armijo steps from ``inner_lr``, each
task's meta-gradient by MINRES to ``solver_rtol``: the settings of ``bilevel imaml``'s
sinusoid job); MAML takes ``maml_inner_steps`` plain steps of ``inner_lr``.

:class:`NestedRun` is the instance that :data:`COMMAND` hands to the run loop
(:mod:`bilevel.runner.loop`), which writes ``metrics.jsonl`` (validation loss and
the weights' AUROC at step 0 and every ``log_every`` steps), ``checkpoint.pt`` and
``final.json`` (test MSE with its 95% interval over test tasks, the AUROC, the
learned weights, training seconds and peak memory).
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import bilevel
from bilevel.policy import require_finite
from bilevel.problems.imaml import (IMAMLProblem, Task, adapt, conv4_forward, conv4_init, cross_entropy, meta_gradient,
                                   mlp_forward, mlp_init, mse)
from bilevel.problems.imaml.experiment import make_solver
from bilevel.problems.imaml.models import Params
from bilevel.problems.imaml.omniglot import SPLITS, load_omniglot
from bilevel.problems.imaml.problem import balanced_groups
from bilevel.problems.nested.problem import (WEIGHTINGS, NestedData, NestedMAMLProblem, influence_weights,
                                             lookahead_weights, task_weights)
from bilevel.problems.nested.tasks import CorruptedOmniglot, CorruptedSinusoid, TaskPool
from bilevel.runner import Command
from bilevel.runner import run as run_loop
from bilevel.solvers import GMRES, Status

__all__ = ["COMMAND", "DATASETS", "DATASET_DEFAULTS", "METHODS", "NestedConfig", "NestedRun", "RESUMABLE", "auroc",
           "train"]

METHODS = ("maml", "imaml", "uniform", "oracle", "lookahead", "influence", "nested")
RESUMABLE = frozenset({"steps", "log_every", "checkpoint_every", "max_minutes", "data_dir", "cache_dir", "device",
                       "threads"})
"""Settings a resumed run may change; every other one must match the checkpoint."""


DATASETS = ("sinusoid", "omniglot")
WEIGHT_START = {"nested": 50, "influence": 0}
"""The default first weight update per method (docs/nested.md); the other methods do not use it."""
PER_STEP_RULES = ("lookahead", "influence")
"""Methods whose weights are recomputed per step; their reported weights are averages over steps."""
OUTER_SOLVING = ("nested", "influence")
"""Methods whose weight updates solve the outer adjoint system (their solves are counted by status)."""
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # The documented sinusoid K = 10 setting (docs/results/nested.md, "How the settings were chosen").
    "sinusoid": dict(shots=10, queries=10, lam=10.0, inner_lr=0.02, inner_steps=20, maml_inner_steps=10,
                     meta_lr=3e-3, train_tasks=40, test_tasks=1000, steps=400, meta_batch=None),
    # Omniglot 5-way 1-shot sized for a CPU (docs/results/nested.md, "Omniglot with flipped labels").
    "omniglot": dict(shots=1, queries=5, lam=0.5, inner_lr=0.4, inner_steps=8, maml_inner_steps=5,
                     meta_lr=1e-3, train_tasks=400, test_tasks=600, steps=300, meta_batch=8),
}


@dataclass(frozen=True)
class NestedConfig:
    """Settings of one run. ``None`` fields take the data set's default (:data:`DATASET_DEFAULTS`).

    ``meta_batch``: the tasks drawn (without replacement, uniformly; the oracle from the clean ones)
    from the pool at each step, for every method (sinusoid default: the whole pool at every step).
    ``dataset``: ``"sinusoid"`` (regression, the 1-40-40-1 network, test MSE) or ``"omniglot"``
    (``ways``-way classification with the ``channels``-wide four-block convolutional network,
    tasks of the ``split``'s meta-training characters, test tasks of its meta-test characters,
    test accuracy; ``corruption`` must be ``"flip"``).
    """

    method: str = "nested"
    dataset: str = "sinusoid"
    corrupt: float = 0.5
    meta_batch: int | None = None
    sigma: float = 3.0
    train_tasks: int | None = None
    val_tasks: int = 10
    test_tasks: int | None = None
    shots: int | None = None
    queries: int | None = None
    ways: int = 5
    channels: int = 32
    split: str = "random"
    corruption: str = "flip"
    lam: float | None = None
    inner_lr: float | None = None
    inner_steps: int | None = None
    inner_tol: float = 1e-3
    maml_inner_steps: int | None = None
    solver: str = "minres"
    solver_maxiter: int = 20
    solver_rtol: float = 1e-2
    mu: float = 1e-3
    meta_lr: float | None = None
    steps: int | None = None
    weighting: str = "softmax"
    weight_lr: float = 0.3
    weight_decay: float = 0.0
    weight_every: int = 5
    weight_start: int | None = None
    outer_solver_steps: int = 5
    outer_ridge: float = 10.0
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 100
    data_dir: str | None = None
    cache_dir: str | None = None
    max_minutes: float | None = None
    device: str | None = None
    threads: int | None = None
    out_dir: str = "runs/nested"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not 0.0 <= self.corrupt < 1.0:
            raise ValueError(f"corrupt must be in [0, 1) so that clean training tasks remain, got {self.corrupt}")
        if self.dataset == "omniglot":
            if self.corruption != "flip":
                raise ValueError(f"Omniglot tasks are corrupted by flipping their query labels: use "
                                 f"corruption='flip', got {self.corruption!r}")
            if self.ways < 2:
                raise ValueError(f"an Omniglot task needs ways >= 2 classes, got {self.ways}")
            if self.split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        for name, value in DATASET_DEFAULTS[self.dataset].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.weight_start is None:  # measured: nested needs a warm-up, the influence rule does not
            object.__setattr__(self, "weight_start", WEIGHT_START.get(self.method, WEIGHT_START["nested"]))
        clean = self.train_tasks - int(round(self.corrupt * self.train_tasks))
        if self.meta_batch is not None and not 1 <= self.meta_batch <= clean:
            raise ValueError(f"meta_batch must be between 1 and the pool's {clean} clean tasks (the oracle draws "
                             f"from those), got {self.meta_batch}")


def auroc(weights: Tensor, corrupted: Tensor) -> float:
    """Probability that a clean task weighs more than a corrupted one (ties count 1/2); NaN without both."""
    clean, bad = weights[~corrupted].double(), weights[corrupted].double()
    if not len(clean) or not len(bad):
        return math.nan
    diff = clean[:, None] - bad[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def _pools(config: NestedConfig, device: torch.device) -> tuple[TaskPool, NestedData, Task]:
    """The training pool (its first ``corrupt`` fraction corrupted), clean validation tasks from the
    same distribution, and clean test tasks (Omniglot: of the meta-test characters, unrotated)."""
    rng, test_rng = np.random.default_rng([config.seed, 0]), np.random.default_rng([config.seed, 1])
    if config.dataset == "sinusoid":
        family = test_family = CorruptedSinusoid(config.shots, config.queries, config.sigma, config.corruption)
    else:
        train_chars, test_chars = load_omniglot(config.data_dir, config.cache_dir).split(scheme=config.split)
        family = CorruptedOmniglot(train_chars, config.ways, config.shots, config.queries)
        test_family = CorruptedOmniglot(test_chars, config.ways, config.shots, config.queries, rotations=False)
    pool = family.pool(rng, config.train_tasks, config.corrupt, device=device)
    val = family.pool(rng, config.val_tasks, device=device).tasks
    test = test_family.pool(test_rng, config.test_tasks, device=device).tasks
    for name, tasks in (("training", pool.tasks), ("validation", val), ("test", test)):
        _require_finite_tasks(tasks, name)
    return pool, NestedData(pool.tasks, val), test


def _require_finite_tasks(tasks: Task, name: str) -> None:
    """Raise ``ValueError`` naming the ``name`` tasks whose inputs or targets hold NaN or Inf."""
    bad = torch.zeros(len(tasks.query_y), dtype=torch.bool, device=tasks.query_y.device)
    for t in tasks:
        if t.is_floating_point():
            bad |= ~torch.isfinite(t.flatten(1)).all(1)
    if bool(bad.any()):
        raise ValueError(f"NaN or Inf in the data of {name} tasks {bad.nonzero().flatten().tolist()[:10]} "
                         f"({int(bad.sum())} of {len(bad)}): a NaN would make every weight and meta-parameter "
                         "NaN; repair or drop those tasks (Omniglot: check the archives in --data-dir)")


def _network(config: NestedConfig) -> tuple[Any, Any, Params, Any]:
    """``forward``, ``loss``, initial parameters (seeded by ``config.seed``) and the query scoring
    of evaluations (Omniglot: batch norm over class-balanced groups of the support's composition)."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.dataset == "sinusoid":
        return mlp_forward, mse, mlp_init(generator=generator), None
    init = conv4_init(config.ways, config.channels, generator=generator)
    return conv4_forward, cross_entropy, init, balanced_groups(conv4_forward, config.ways, config.shots)


class NestedRun:
    """One method's training (the run loop's instance): meta-parameters, optimizers, task weights."""

    def __init__(self, config: NestedConfig, device: torch.device):
        self.config = config
        self.pool, self.data, self.test_tasks = _pools(config, device)
        forward, loss, init, self.query_forward = _network(config)
        self.imaml = IMAMLProblem(forward, loss, lam=config.lam, inner_lr=config.inner_lr,
                                  inner_steps=config.inner_steps, inner_optimizer="armijo", inner_tol=config.inner_tol)
        self.maml = IMAMLProblem(forward, loss, lam=0.0, inner_lr=config.inner_lr,
                                 inner_steps=config.maml_inner_steps)
        self.solver = make_solver(config.solver, config.solver_maxiter, 0.0, config.solver_rtol)
        theta = {k: v.to(device) for k, v in init.items()}
        self.problem = NestedMAMLProblem(self.imaml, theta, mu=config.mu, adapt_solver=self.solver,
                                         weighting=config.weighting)
        self.theta = {k: v.clone().requires_grad_() for k, v in theta.items()}
        self.opt = torch.optim.Adam(list(self.theta.values()), lr=config.meta_lr)
        n = config.train_tasks
        self.u = torch.zeros(n, device=device, requires_grad=True)
        self.u_opt = torch.optim.Adam([self.u], lr=config.weight_lr, weight_decay=config.weight_decay)
        self.weight_sum = torch.zeros(n, device=device)  # lookahead, influence: each task's per-step weights, summed
        self.seen = torch.zeros(n, device=device)  # lookahead, influence: the steps that drew each task
        self.held = torch.ones(n, device=device)  # influence: each task's weight from its latest update
        self.batches = np.random.default_rng([config.seed, 2])  # the meta-batches' draws
        self.outer_solves: dict[str, int] = {}  # nested, influence: the weight updates' adjoint solves by status
        self.taken, self.elapsed = 0, 0.0  # steps taken, their seconds

    def weights(self) -> Tensor:
        """The method's task weights: fixed, learned, or the look-ahead rule's average so far."""
        n, bad = self.config.train_tasks, self.pool.corrupted
        if self.config.method == "nested":
            return task_weights(self.u.detach(), self.config.weighting)
        if self.config.method in PER_STEP_RULES:
            return torch.where(self.seen > 0, self.weight_sum / self.seen.clamp(min=1), 1.0)
        if self.config.method == "oracle":
            return (~bad).float() * n / int((~bad).sum())
        return torch.ones(n, device=bad.device)

    def draw(self) -> NestedData:
        """This step's training tasks: the whole pool (the oracle: its clean tasks), or a meta-batch of it."""
        c, bad = self.config, self.pool.corrupted
        if c.meta_batch is None and c.method != "oracle":
            return self.data
        pool = torch.arange(len(bad), device=bad.device)
        candidates = pool[~bad] if c.method == "oracle" else pool
        if c.meta_batch is not None:
            pick = np.sort(self.batches.choice(len(candidates), c.meta_batch, replace=False))
            candidates = candidates[torch.as_tensor(pick, device=bad.device)]
        return NestedData(Task(*(t[candidates] for t in self.pool.tasks)), self.data.val, candidates)

    def meta_grad(self, theta: Params, data: NestedData) -> Params:
        method, tasks = self.config.method, data.train
        if method == "maml":
            # one batching for the whole run (see bilevel.problems.imaml.train): resumes round alike
            return meta_gradient(self.maml, theta, tasks, mode="unrolled", over_tasks="vmap").grad
        if method == "imaml":
            return meta_gradient(self.imaml, theta, tasks, solver=self.solver, over_tasks="vmap").grad
        if method == "oracle":  # clean tasks alone, equally weighted
            return self.problem.weighted_meta_gradient(theta, torch.ones(len(tasks.query_y), device=self.u.device),
                                                       tasks)
        index = torch.arange(len(tasks.query_y), device=self.u.device) if data.index is None else data.index
        if method == "influence" and self.weight_update_due():
            self.held[index], hyper = influence_weights(self.problem, theta, data, self.outer_solver())
            self.count_outer_solve(hyper)
        m = self.problem.task_meta_gradients(theta, tasks)
        if method == "lookahead":
            val_grad = torch.func.grad(self.problem.validation_loss)(theta, data.val)
            w = lookahead_weights(m, val_grad)
        else:
            w = (self.held if method == "influence" else self.weights())[index]
        if method in PER_STEP_RULES:
            self.weight_sum[index] += w
            self.seen[index] += 1
        return self.problem.middle_gradient(theta, w, m)

    def weight_update_due(self) -> bool:
        return self.taken >= self.config.weight_start and self.taken % self.config.weight_every == 0

    def outer_solver(self) -> GMRES:
        """The weight updates' adjoint solver: GMRES capped at ``outer_solver_steps``, ridge ``outer_ridge``."""
        return GMRES(maxiter=self.config.outer_solver_steps, ridge=self.config.outer_ridge)

    def count_outer_solve(self, hyper: bilevel.HypergradientResult) -> None:
        name = Status(int(hyper.solve.status)).name.lower()
        self.outer_solves[name] = self.outer_solves.get(name, 0) + 1

    def train_step(self) -> None:
        theta = {k: v.detach() for k, v in self.theta.items()}
        data = self.draw()
        if self.config.method == "nested" and self.weight_update_due():
            hyper = bilevel.hypergradient(self.problem, self.u.detach(), data, init=theta,
                                          solver=self.outer_solver(), on_failure="ignore")
            self.count_outer_solve(hyper)
            self.u.grad = hyper.grad
            self.u_opt.step()
        grads = self.meta_grad(theta, data)
        require_finite(grads, f"the meta-gradient of step {self.taken} ({self.config.method})",
                       "a training task's adaptation diverged: raise --lam or lower --inner-lr, or --resume from the "
                       "checkpoint (it holds the last finite meta-parameters) with a smaller --meta-lr")
        for k, p in self.theta.items():
            p.grad = grads[k]
        self.opt.step()
        self.taken += 1

    def problem_for_eval(self) -> IMAMLProblem:
        return self.maml if self.config.method == "maml" else self.imaml

    def scores(self, tasks: Task, prefix: str) -> dict[str, float]:
        """Query scores after adaptation from the current meta-parameters: sinusoid ``<prefix>_mse``;
        Omniglot ``<prefix>_loss`` and ``<prefix>_accuracy``; each with its 95% interval over tasks."""
        theta = {k: v.detach() for k, v in self.theta.items()}
        out = adapt(self.problem_for_eval(), theta, tasks, query_forward=self.query_forward)
        loss = "mse" if self.config.dataset == "sinusoid" else "loss"
        per_task = {loss: out.loss_after.double()}
        if self.config.dataset == "omniglot":
            per_task["accuracy"] = (out.output_after.argmax(-1) == tasks.query_y).double().mean(-1)
        scores = {f"{prefix}_{name}{tail}": value for name, v in per_task.items()
                  for tail, value in (("", float(v.mean())), ("_ci95", float(1.96 * v.std() / math.sqrt(len(v)))))}
        return {**scores, f"{prefix}_{loss}_before": float(out.loss_before.double().mean())}

    def validation(self) -> dict[str, float]:
        scores = {k: v for k, v in self.scores(self.data.val, "val").items() if not k.endswith(("_ci95", "_before"))}
        return {"step": self.taken, **scores, "auroc": auroc(self.weights(), self.pool.corrupted),
                "seconds": self.elapsed, **self.solve_counts()}

    def solve_counts(self) -> dict[str, dict[str, int]]:
        """``{"outer_solves": status name -> count}`` for the methods that solve the outer system, else ``{}``."""
        return {"outer_solves": dict(self.outer_solves)} if self.config.method in OUTER_SOLVING else {}

    def test(self) -> dict[str, Any]:
        w = self.weights()
        return {**self.scores(self.test_tasks, "test"), "auroc": auroc(w, self.pool.corrupted),
                "weights": [round(float(x), 5) for x in w], "corrupted": [bool(b) for b in self.pool.corrupted]}

    def state_dict(self) -> dict[str, Any]:
        return {"theta": {k: v.detach() for k, v in self.theta.items()}, "opt": self.opt.state_dict(),
                "u": self.u.detach(), "u_opt": self.u_opt.state_dict(), "weight_sum": self.weight_sum,
                "seen": self.seen, "held": self.held, "batches": self.batches.bit_generator.state, "step": self.taken,
                "elapsed": self.elapsed, "outer_solves": dict(self.outer_solves)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.theta.items():
                v.copy_(state["theta"][k])
            self.u.copy_(state["u"])
            self.weight_sum.copy_(state["weight_sum"])
            # absent from checkpoints written before them (full-batch runs: every task seen at every step)
            self.held.copy_(state.get("held", self.held))
            self.seen.copy_(state.get("seen", torch.full_like(self.seen, state["step"])))
        if "batches" in state:
            self.batches.bit_generator.state = state["batches"]
        self.opt.load_state_dict(state["opt"])
        self.u_opt.load_state_dict(state["u_opt"])
        self.taken, self.elapsed = state["step"], state["elapsed"]
        self.outer_solves = dict(state.get("outer_solves", {}))  # absent from checkpoints written before it

    # the run loop's protocol (bilevel.runner.loop.Instance)

    def start(self) -> dict[str, Any]:
        return self.validation()

    def step(self, index: int) -> None:
        began = time.perf_counter()
        self.train_step()
        self.elapsed += time.perf_counter() - began

    def record(self, step: int, last: bool, seconds: float) -> dict[str, Any]:
        return self.validation()

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        val = record.get("val_mse", record.get("val_accuracy"))
        return {"val": f"{val:.3f}", "auroc": f"{record['auroc']:.2f}"}

    def evaluate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        c = self.config
        device = self.u.device
        return {"method": c.method, "seed": c.seed, "corrupt": c.corrupt, "steps": self.taken,
                "seconds": self.elapsed, "peak_mib": _peak_mib(device), "device": str(device), **self.test(),
                **self.solve_counts()}

    def report(self, final: dict[str, Any]) -> list[str]:
        c = self.config
        score = (f"test MSE {final['test_mse']:.4f} +- {final['test_mse_ci95']:.4f}" if "test_mse" in final else
                 f"test accuracy {100 * final['test_accuracy']:.1f}% +- {100 * final['test_accuracy_ci95']:.1f}")
        lines = [f"nested: {c.method} on {c.dataset}, {c.train_tasks} training tasks ({c.corrupt:g} corrupted), "
                 f"{final['steps']} steps, seed {c.seed}",
                 f"  after adaptation on {c.test_tasks} clean test tasks (95% interval): {score}",
                 f"  AUROC of the task weights (clean above corrupted): {final['auroc']:.3f}"]
        if "outer_solves" in final:
            solves = ", ".join(f"{k} {v}" for k, v in sorted(final["outer_solves"].items())) or "none"
            lines.append(f"  outer adjoint solves (GMRES, at most {c.outer_solver_steps} iterations): {solves}")
        return lines


def _peak_mib(device: torch.device) -> float:
    """Peak memory: CUDA's allocator peak on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(config: NestedConfig, out_dir: str | Path | None = None, *, resume: bool | str = False,
          overwrite: bool = False, device: torch.device | str | None = None,
          progress: bool = False) -> dict[str, Any]:
    """Train ``config.method`` for ``config.steps`` steps in ``out_dir`` (default ``config.out_dir``;
    continuing the run there with ``resume``) and return the ``final.json`` record."""
    config = dataclasses.replace(config, device=str(device) if device is not None else config.device)
    return run_loop(COMMAND, config, out_dir=out_dir, resume=resume, overwrite=overwrite, progress=progress,
                    report=False)


COMMAND = Command("nested", lambda config, run: NestedRun(config, run.device), RESUMABLE)
"""``bilevel nested`` for the run loop."""
