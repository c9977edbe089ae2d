"""One rank of a distributed test: ``python distributed_worker.py SCENARIO RANK WORLD STORE OUT``.

Run by tests/test_distributed.py as separate processes that meet in a
``torch.distributed.FileStore`` (no TCP port). Writes its results with torch.save.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bilevel import distributed
from bilevel.problems.fair.data import Task, synthetic_tasks
from bilevel.problems.fair.train import Config as FairConfig
from bilevel.problems.fair.train import evaluate
from bilevel.problems.fair.train import train as fair_train
from bilevel.problems.imaml.config import Config as IMAMLConfig
from bilevel.problems.imaml.train import train as imaml_train

FAIR_RUNS = (("fair", False), ("fair", True), ("pdfm", False))
"""The ``bilevel fair`` runs of every world size: (method, exact)."""


def fair_tasks() -> list[Task]:
    """Six small synthetic tasks: the first four to meta-train on, the last two to evaluate."""
    return synthetic_tasks(6, n=30, dim=4)


def fair_config(method: str) -> FairConfig:
    """Meta-batch 3 (2 + 1 tasks on two ranks), 4 steps, a checkpoint every 2."""
    return FairConfig(method=method, c=0.05, k_shot=6, n_query=6, meta_batch=3, steps=4, log_every=1, checkpoint_every=2,
                      newton_steps=8)


def run_name(method: str, exact: bool) -> str:
    return f"{method}-exact" if exact else method


def fair_runs(ctx: distributed.Context, folder: Path) -> dict[str, dict]:
    """Every run of :data:`FAIR_RUNS` in ``folder/<name>`` and its evaluation on 3 episodes of each
    held-out task (2 + 1 on two ranks); then iMAML's exact mode in ``folder/imaml-exact``."""
    tasks, evaluations = fair_tasks(), {}
    for method, exact in FAIR_RUNS:
        name, cfg = run_name(method, exact), fair_config(method)
        outer = fair_train(cfg, tasks[:4], folder / name, progress=False, ctx=ctx, exact=exact)
        evaluations[name] = evaluate(cfg, outer, tasks[4:], episodes=3, ctx=ctx, exact=exact)
    imaml_train(IMAMLConfig(meta_batch=5, inner_steps=3, log_every=2, eval_every=4, checkpoint_every=2, eval_tasks=6,
                            final_tasks=6, baseline="none", device="cpu", progress=False, steps=4, exact=True,
                            out_dir=str(folder / "imaml-exact")), ctx=ctx)
    return evaluations


def resume_fair_runs(ctx: distributed.Context, folder: Path) -> None:
    """Continue every run of :data:`FAIR_RUNS` in ``folder`` from its previous checkpoint (step 2)."""
    for method, exact in FAIR_RUNS:
        fair_train(fair_config(method), fair_tasks()[:4], folder / run_name(method, exact), resume="previous",
                   progress=False, ctx=ctx, exact=exact)


def per_task_values(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(n, 3, 2, generator=g, dtype=torch.float64),
            "b": torch.randn(n, 4, generator=g, dtype=torch.float64)}


def main() -> None:
    scenario, rank, world, store_path, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    store = dist.FileStore(store_path, world)
    seconds = 60 if scenario == "fair" else 20  # training: rank 0 writes files while the other waits
    ctx = distributed.init("cpu", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=seconds))
    result: dict = {"rank": ctx.rank, "world": ctx.world_size}
    if scenario == "reduce":
        n = 7
        values = ctx.take(per_task_values(n), n)
        local = {k: v.sum(0) for k, v in values.items()}
        result["mean"] = ctx.mean_of_sums(local, n)
        result["gathered"] = ctx.gather(values, n)
        result["count"] = ctx.sum(torch.tensor([float(values["w"].shape[0])]))
        ctx.check_replicas(result["mean"])
    elif scenario == "drift":
        try:
            ctx.check_replicas({"w": torch.full((3,), float(rank))})
        except distributed.DistributedError as e:
            result["error"] = str(e)
    elif scenario == "dies":
        if rank == 1:
            sys.exit(3)
        try:
            ctx.mean_of_sums({"w": torch.ones(4)}, 2)
        except distributed.DistributedError as e:
            result["error"] = str(e)
    elif scenario == "fair":  # the runs of two processes, and the resumption of the one-process runs
        folder = Path(out).parent
        result["evaluations"] = fair_runs(ctx, folder / f"world{world}")
        resume_fair_runs(ctx, folder / "one-then-two")
    torch.save(result, out)
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main()
