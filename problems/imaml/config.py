"""Settings of a training run, validated before any data or model is built.

Defaults follow the paper per data set; :meth:`Config.resolved` fills them in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bilevel.devices import resolve_device
from bilevel.problems.imaml.omniglot import SPLITS
from bilevel.solvers import SOLVERS

__all__ = ["ACTIVATIONS", "Config", "DATASETS", "MODES", "SOLVERS", "SPLITS", "RESUMABLE", "BASELINES",
           "INNER_OPTIMIZERS", "VARIANTS",
           "EVAL_BN", "LR_SCHEDULES"]

DATASETS = ("sinusoid", "omniglot")
MODES = ("implicit", "unrolled", "first_order")
# Settings that may change when a run is resumed; everything else must match the checkpoint.
RESUMABLE = ("steps", "max_minutes", "cuda_graph", "chunk_size", "exact", "eval_lam", "device", "data_dir",
             "cache_dir", "out_dir", "progress", "spike_factor", "baseline", "eval_queries", "eval_bn",
             "eval_rotations", "threads", "log_every", "checkpoint_every")
BASELINES = ("maml", "none")
# Omniglot's presets: the paper's reference code (aravindr93/imaml_dev: plain inner steps then one
# proximal step, its CG system damped by about 22 in --damping units), which trains, and the formula.
VARIANTS = {"reference": dict(prox_schedule="last_step", damping=22.0),
            "formula": dict(prox_schedule="every_step", damping=0.0)}
EVAL_BN = ("balanced", "queries")
LR_SCHEDULES = ("constant", "cosine")
# The sinusoid main job's iMAML settings: lam, the adjoint solver and the steps chosen by
# benchmarks/imaml_sweep.py (docs/results/imaml.md, "Choosing the main job's settings"); the SiLU
# network and its inner problem solved by Newton-CG (docs/imaml.md, iMAML-HF).
SINUSOID = dict(lam=3.0, inner_steps=100, inner_optimizer="newton_cg", inner_tol=1e-4, activation="silu",
                solver="minres", cg_steps=20, solver_rtol=1e-2, steps=1000)
INNER_OPTIMIZERS = ("gd", "nesterov", "armijo", "lbfgs", "newton_cg")
ACTIVATIONS = ("relu", "silu", "softplus")

# Counts that make sense only from 1 up (a None field takes its default, which is valid;
# chunk_size None batches the whole meta-batch).
_POSITIVE_COUNTS = ("steps", "ways", "channels", "shots", "queries", "cg_steps", "inner_steps", "meta_batch", "chunk_size",
                    "log_every", "eval_every", "eval_tasks", "final_tasks", "checkpoint_every", "eval_queries")


@dataclass
class Config:
    """A training run. ``None`` fields take the data set's default (see :meth:`resolved`).

    Omniglot defaults are the paper's: ``lam = 2``, 16 inner GD steps of 0.1 for
    5-way (25 for 20-way), 5 CG steps, Adam 1e-3, meta-batch 32, 30000 meta-steps
    (a GPU run), with the reference code's ``variant`` (``"reference"``: one closing
    proximal step, the adjoint system damped by 22; ``"formula"``: the proximal
    term in every step, undamped) and evaluation queries scored in class-balanced
    batch-norm groups (``eval_bn="balanced"``). MAML and FOMAML (``mode``
    ``"unrolled"`` / ``"first_order"``) default to ``lam = 0``, the original
    algorithms. Sinusoid (the main job, :data:`SINUSOID`, chosen by measurement):
    10 shots, 10 queries, meta-batch 25, 1000 meta-steps, ``lam = 3``, a SiLU network
    whose proximal inner problem is solved by Newton-CG (at most 100 iterations) to an
    inner gradient norm of ``1e-4``, MINRES with at most 20 iterations to
    ``rtol = 1e-2``, and a MAML ``baseline`` (10 plain steps of 0.02, the same network)
    run beside it by the job; MAML and FOMAML alone take 10 steps. ``activation``:
    ``"relu"`` on Omniglot (the papers'), ``"silu"`` on the sinusoid. ``eval_queries``, ``eval_bn`` and
    ``eval_rotations`` set the evaluation protocol; ``adam_eps`` and
    ``lr_schedule`` (``"constant"`` or ``"cosine"``) the outer optimizer;
    ``spike_factor`` the loss-spike warning.
    ``max_minutes`` ends meta-training early, after the first log step past that
    wall-clock budget (counted from this start or resume), with a checkpoint and
    the final evaluation as usual. ``cuda_graph`` replays each meta-gradient as
    one captured CUDA graph (:class:`bilevel.CUDAGraphed`; ``device`` must be CUDA).
    ``eval_lam`` sets the proximal strength of the adaptation in evaluations
    (default ``lam``; the paper's reference code adapts with 0 at test time).
    ``split`` chooses the Omniglot meta-train/meta-test characters (see
    :meth:`Omniglot.split`); the official 20-way runs are scored only under the
    default ``"official-runs"``, where none of their characters is trained on.
    ``chunk_size`` batches that many tasks per ``torch.func.vmap`` call (``None``:
    the whole meta-batch); smaller chunks need less memory, same results.
    ``exact`` computes each task alone and averages the per-task meta-gradients
    in global task order (:meth:`bilevel.distributed.Context.ordered_mean`), so
    that a run ends with bitwise the same parameters on any number of processes.
    """

    dataset: str = "sinusoid"
    ways: int = 5
    split: str = "official-runs"
    channels: int = 64
    activation: str | None = None
    shots: int | None = None
    queries: int | None = None
    mode: str = "implicit"
    solver: str | None = None
    cg_steps: int | None = None
    solver_rtol: float | None = None
    damping: float | None = None
    variant: str | None = None
    lam: float | None = None
    inner_lr: float | None = None
    inner_steps: int | None = None
    inner_optimizer: str | None = None
    inner_tol: float | None = None
    prox_schedule: str | None = None
    eval_lam: float | None = None
    eval_queries: int | None = None
    eval_bn: str | None = None
    eval_rotations: bool = False
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"
    meta_batch: int | None = None
    chunk_size: int | None = None
    exact: bool = False
    meta_lr: float = 1e-3
    steps: int | None = None
    max_minutes: float | None = None
    log_every: int = 10
    eval_every: int = 200
    eval_tasks: int = 100
    final_tasks: int = 600
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "cpu"
    cuda_graph: bool = False
    out_dir: str = "runs/imaml"
    data_dir: str | None = None
    cache_dir: str | None = None
    progress: bool = True
    threads: int | None = None
    spike_factor: float = 10.0
    baseline: str | None = None

    def resolved(self) -> "Config":
        """A copy with every ``None`` default filled in and the settings validated."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.solver is not None and self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {self.solver!r}")
        counts = {k: getattr(self, k) for k in _POSITIVE_COUNTS if getattr(self, k) is not None}
        bad = {k: v for k, v in counts.items() if not (isinstance(v, int) and v >= 1)}
        if bad:
            raise ValueError(f"these settings must be whole numbers >= 1: {bad}")
        if self.checkpoint_every % self.log_every or self.eval_every % self.log_every:
            raise ValueError(f"checkpoint_every ({self.checkpoint_every}) and eval_every ({self.eval_every}) "
                             f"must be multiples of log_every ({self.log_every})")
        if self.eval_lam is not None and not self.eval_lam >= 0:
            raise ValueError(f"eval_lam must be >= 0, got {self.eval_lam}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")
        device = resolve_device(self.device)
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got device={self.device!r}")
        if self.dataset == "omniglot" and self.ways < 2:
            raise ValueError(f"an Omniglot task needs ways >= 2 classes, got {self.ways}")
        if not self.meta_lr > 0:
            raise ValueError(f"meta_lr must be positive, got {self.meta_lr}")
        if self.damping is not None and not self.damping >= 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        for name, value, allowed in (("variant", self.variant, VARIANTS), ("eval_bn", self.eval_bn, EVAL_BN),
                                     ("activation", self.activation, ACTIVATIONS),
                                     ("lr_schedule", self.lr_schedule, LR_SCHEDULES)):
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be positive, got {self.adam_eps}")
        if self.inner_optimizer is not None and self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {self.inner_optimizer!r}")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        for name in ("solver_rtol", "inner_tol"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not self.spike_factor > 1:
            raise ValueError(f"spike_factor must be > 1, got {self.spike_factor}")
        if self.mode == "unrolled" and self.inner_optimizer not in (None, "gd"):
            raise ValueError("mode='unrolled' differentiates through gradient descent: use inner_optimizer='gd'")
        omniglot = self.dataset == "omniglot"
        implicit, sinusoid = self.mode == "implicit", not omniglot
        defaults = dict(
            shots=1 if omniglot else 10,
            queries=5 if omniglot else 10,
            lam=(2.0 if omniglot else SINUSOID["lam"]) if implicit else 0.0,
            inner_lr=0.1 if omniglot else 0.02,
            inner_steps=(16 if self.ways <= 5 else 25) if omniglot else SINUSOID["inner_steps"] if implicit else 10,
            inner_optimizer=SINUSOID["inner_optimizer"] if sinusoid and implicit else "gd",
            inner_tol=SINUSOID["inner_tol"] if sinusoid and implicit else None,
            activation=SINUSOID["activation"] if sinusoid else "relu",
            solver=SINUSOID["solver"] if sinusoid else "cg",
            cg_steps=SINUSOID["cg_steps"] if sinusoid else 5,
            solver_rtol=SINUSOID["solver_rtol"] if sinusoid else None,
            meta_batch=32 if omniglot else 25,
            steps=30000 if omniglot else SINUSOID["steps"],
            baseline="maml" if sinusoid and implicit else "none",
            eval_bn="balanced" if omniglot else "queries",
        )
        filled = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in defaults.items()}
        preset = VARIANTS[self.variant or ("reference" if omniglot else "formula")]
        filled["prox_schedule"] = self.prox_schedule or preset["prox_schedule"]
        filled["damping"] = self.damping if self.damping is not None else preset["damping"] if implicit else 0.0
        filled["eval_queries"] = self.eval_queries or filled["queries"]
        if omniglot and filled["eval_bn"] == "balanced" and filled["eval_queries"] % filled["shots"]:
            raise ValueError(f"eval_bn='balanced' scores the queries in groups of shots={filled['shots']} per "
                             f"class: eval_queries ({filled['eval_queries']}) must be a multiple of it")
        return dataclasses.replace(self, **filled)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
