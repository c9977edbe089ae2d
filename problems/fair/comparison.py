"""``bilevel fair`` as the run loop's instance: every method of the comparison, one after another.

The comparison is one run of ``len(runs) * steps`` steps: the runs of
:func:`~bilevel.problems.fair.config.runs` in order, each meta-trained for
``steps`` steps by a :class:`~bilevel.problems.fair.train.FairTrainer` and
evaluated on the meta-test tasks as soon as its last step is taken. The
checkpoint holds the results and trained parameters of the finished runs and the
state of the one under way, so a stopped comparison resumes where it stopped, bit for bit. The loop
writes ``metrics.jsonl`` (each run's log records, named by ``run``),
``checkpoint.pt`` and ``final.json`` (one evaluation record per run); the
instance adds ``tradeoff.png`` (accuracy against the demographic parity gap).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bilevel.runner import Command, Run

from .config import RESUMABLE, FairConfig, run_config, runs
from .data import load_tasks, split_tasks, to_device
from .train import FairTrainer, evaluate

__all__ = ["COMMAND", "FairComparison"]


class FairComparison:
    """The runs of a :class:`~bilevel.problems.fair.config.FairConfig`, trained and evaluated in turn."""

    log_every = 1  # each run logs on its own schedule (its config's log_every); the loop writes what it gives

    def __init__(self, config: FairConfig, run: Run) -> None:
        self.config, self.ctx = config, run.ctx
        tasks = load_tasks(config.dataset, config.data_dir, min_rows=config.shots + config.queries)
        self.train_tasks, self.test_tasks = (to_device(part, run.device)
                                             for part in split_tasks(tasks, config.test_fraction, config.seed))
        self.plan = runs(config)
        self.total_steps = len(self.plan) * config.steps
        self.results: list[dict[str, Any]] = []
        self.outers: dict[str, list[torch.Tensor]] = {}  # each finished run's trained leaves (w, b, lambda0)
        self.trainer: FairTrainer | None = None
        self.pending: dict | None = None
        if self.ctx.is_main:
            where = f"{self.ctx.world_size} processes" if self.ctx.distributed else str(run.device)
            print(f"{config.dataset}: {len(self.train_tasks)} meta-train tasks, {len(self.test_tasks)} meta-test "
                  f"tasks, {tasks[0].x.shape[1]} features, on {where}")

    def _trainer(self) -> FairTrainer:
        """The trainer of the run under way: the first one without a result."""
        if self.trainer is None:
            method, c = self.plan[len(self.results)]
            tag = method if c is None else f"{method}_c{c:g}"
            self.trainer = FairTrainer(run_config(self.config, method, c), self.train_tasks, self.ctx,
                                       exact=self.config.exact, tag=tag)
        return self.trainer

    def step(self, index: int) -> None:
        trainer = self._trainer()
        local = index % self.config.steps
        self.pending = trainer.step(local)
        if local + 1 == self.config.steps:
            self._evaluate(trainer)
            self.trainer = None

    def _evaluate(self, trainer: FairTrainer) -> None:
        config, cfg = self.config, trainer.cfg
        method, c = self.plan[len(self.results)]
        ev = evaluate(cfg, trainer.outer(), self.test_tasks, episodes=config.episodes, seed=config.seed + 1,
                      ctx=self.ctx, exact=config.exact)
        record = {"run": trainer.tag, "dataset": config.dataset, "method": method, "c": c, "k_shot": config.shots,
                  "steps": config.steps, **ev}
        self.results.append(record)
        self.outers[trainer.tag] = trainer.replicas()
        if self.ctx.is_main:
            print("\n".join(_lines(record)))

    def record(self, step: int, last: bool, seconds: float) -> dict | None:
        pending, self.pending = self.pending, None
        return None if pending is None else {**pending, "seconds": seconds}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"run": record["run"], "loss": f"{record['outer_loss']:.3f}"}

    def replicas(self) -> list[torch.Tensor]:
        return self.trainer.replicas() if self.trainer is not None else [torch.zeros(1, device=self.ctx.device)]

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "outers": self.outers,
                "trainer": None if self.trainer is None else self.trainer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.results, self.outers = list(state["results"]), dict(state["outers"])
        if state["trainer"] is not None:
            self._trainer().load_state_dict(state["trainer"])

    def evaluate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"dataset": self.config.dataset, "results": self.results}

    def finish(self, out: Path, final: dict[str, Any], records: list[dict[str, Any]]) -> None:
        from .plot import tradeoff_plot

        tradeoff_plot(final["results"], out / "tradeoff.png", title=f"{self.config.dataset}, {self.config.shots}-shot")

    def report(self, final: dict[str, Any]) -> list[str]:
        c = self.config
        head = (f"fair on {c.dataset}: {len(final['results'])} runs of {c.steps} meta-steps, {c.shots}-shot, "
                f"evaluated on {c.episodes} episodes per meta-test task (mean +- 95% interval):")
        return [head, *(line for record in final["results"] for line in _lines(record))]


def _lines(record: dict[str, Any]) -> list[str]:
    """One run's result in words: its scores with their intervals, and the indefinite saddle points."""
    s, tag = record["summary"], record["run"]
    lines = [f"{tag:>14}: accuracy {s['accuracy']['mean']:.3f} +- {s['accuracy']['ci95']:.3f}  "
             f"parity gap {s['parity_gap']['mean']:.3f} +- {s['parity_gap']['ci95']:.3f} "
             f"(null {s['null_gap']['mean']:.3f}, {s['parity_gap']['nan']} episodes without both groups)  "
             f"soft gap {s['soft_gap']['mean']:.3f}  DBC {s['dbc']['mean']:.4f}  "
             f"consistency {s['consistency']['mean']:.3f}"]
    if record["indefinite"]["count"]:
        lines.append(f"{tag:>14}: {record['indefinite']['count']} of {record['indefinite']['of']} adapted saddle "
                     "points are indefinite in w (raise --prox)")
    return lines


COMMAND = Command("fair", FairComparison, RESUMABLE, files=("tradeoff.png",))
"""``bilevel fair`` for the run loop."""
