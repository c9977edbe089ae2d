"""bilevel.distributed: sharding, the meta-gradient all-reduce, exact gathering, replica checks,
and a rank that dies, on Gloo with a FileStore (separate processes, no TCP port)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bilevel import distributed
from bilevel.errors import BilevelError

WORKER = Path(__file__).with_name("distributed_worker.py")


def run_ranks(scenario: str, world: int, tmp_path: Path, timeout: float = 120) -> list[dict]:
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(r), str(world), str(store),
                               str(tmp_path / f"rank{r}.pt")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    results = []
    for r, (p, out) in enumerate(zip(procs, outputs)):
        path = tmp_path / f"rank{r}.pt"
        results.append(torch.load(path) if path.exists() else {"returncode": p.returncode, "output": out})
    return results


@given(n=st.integers(0, 50), world=st.integers(1, 9))
def test_shards_are_contiguous_cover_the_batch_and_differ_by_at_most_one(n, world):
    parts = [distributed.shard(n, r, world) for r in range(world)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_refuses_a_rank_outside_the_world():
    with pytest.raises(BilevelError, match="rank 2 is not in a world of 2"):
        distributed.shard(4, 2, 2)


def test_one_process_context_is_a_no_op():
    ctx = distributed.init("cpu")
    assert ctx.world_size == 1 and ctx.is_main and not ctx.distributed
    values = {"w": torch.arange(6.0).reshape(3, 2)}
    assert ctx.take(values, 3)["w"].shape == (3, 2)
    torch.testing.assert_close(ctx.mean_of_sums({"w": values["w"].sum(0)}, 3)["w"], values["w"].mean(0))
    assert ctx.gather(values, 3) is values
    ctx.check_replicas(values)
    ctx.barrier()


def _reference(n: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(n, 3, 2, generator=g, dtype=torch.float64),
            "b": torch.randn(n, 4, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("world", [2, 3])
def test_mean_of_sums_and_gather_match_one_process(tmp_path, world):
    results = run_ranks("reduce", world, tmp_path)
    assert all("mean" in r for r in results), results
    full = _reference()
    for r in results:
        for key in full:
            # One all-reduce of the per-rank sums: equal to the one-process mean to round-off.
            torch.testing.assert_close(r["mean"][key], full[key].mean(0), rtol=1e-14, atol=1e-15)
            # Exact mode: the gathered per-task values are bitwise those of one process.
            assert torch.equal(r["gathered"][key], full[key])
            assert torch.equal(r["gathered"][key].sum(0) / 7, full[key].sum(0) / 7)
        assert float(r["count"]) == 7.0


def test_drifted_replicas_are_refused(tmp_path):
    results = run_ranks("drift", 2, tmp_path)
    for r in results:
        assert "replicas drifted" in r["error"] and "rank(s) [1]" in r["error"]


def test_a_rank_that_dies_ends_the_others_with_a_clear_error(tmp_path):
    start = time.monotonic()
    results = run_ranks("dies", 2, tmp_path, timeout=90)
    assert results[1]["returncode"] == 3
    assert "another process probably died" in results[0]["error"], results[0]
    assert time.monotonic() - start < 90


# ------------------------------------------------------------------ bilevel imaml under torchrun

IMAML_TINY = ["--meta-batch", "5", "--inner-steps", "3", "--log-every", "2", "--eval-every", "4",
              "--checkpoint-every", "2", "--eval-tasks", "6", "--final-tasks", "6", "--baseline", "none",
              "--device", "cpu", "--no-progress"]


def imaml(out: Path, steps: int, processes: int, *extra: str) -> None:
    """``bilevel imaml`` on one process, or under torchrun on several (meta-batch 5: uneven shards)."""
    args = ["-m", "bilevel", "imaml", "--steps", str(steps), "--out-dir", str(out), *IMAML_TINY, *extra]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def final_theta(out: Path) -> dict[str, torch.Tensor]:
    from bilevel.checkpoint import load

    return load(out / "checkpoint.pt")["theta"]


def assert_same_run(a: Path, b: Path) -> None:
    # The per-step meta-gradients agree to float32 round-off (1e-7); over steps the round-off grows
    # through the run's discrete decisions (Armijo backtracking, solver exits): 4e-6 after 4 steps.
    for key, value in final_theta(a).items():
        other = final_theta(b)[key]
        relative = float((value - other).norm() / value.norm())
        assert relative <= 1e-5, (key, relative, float((value - other).abs().max()))
    log_a = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    for ra, rb in zip(log_a, log_b):
        assert ra.get("solve_status") == rb.get("solve_status")
        assert abs(ra["query_loss"] - rb["query_loss"]) <= 1e-5 * max(1.0, abs(ra["query_loss"]))


def test_imaml_on_two_processes_ends_as_on_one_and_resumes_across_world_sizes(tmp_path):
    imaml(tmp_path / "one", 4, 1)
    imaml(tmp_path / "two", 4, 2)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    # Stopped at step 2 on two processes, resumed on one; and the other way round.
    imaml(tmp_path / "two-then-one", 2, 2)
    imaml(tmp_path / "two-then-one", 4, 1, "--resume")
    assert_same_run(tmp_path / "one", tmp_path / "two-then-one")
    imaml(tmp_path / "one-then-two", 2, 1)
    imaml(tmp_path / "one-then-two", 4, 2, "--resume")
    assert_same_run(tmp_path / "one", tmp_path / "one-then-two")


def test_the_main_job_with_its_maml_baseline_under_torchrun_writes_once(tmp_path):
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bilevel", "imaml",
            "--steps", "2", "--out-dir", str(tmp_path / "run"),
            *[a for a in IMAML_TINY if a not in ("--baseline", "none")], "--baseline", "maml"]
    done = subprocess.run([sys.executable, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("MAML baseline") == 1  # rank 0 alone reports
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert "solver_outcomes" in final and final["baseline"]["meta_steps"] == 2


def test_more_processes_than_tasks_is_refused(tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "bilevel", "imaml", "--steps", "2", "--out-dir", str(tmp_path / "run"), *IMAML_TINY,
            "--meta-batch", "1"]
    done = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "smaller than the 2 processes" in done.stdout + done.stderr
