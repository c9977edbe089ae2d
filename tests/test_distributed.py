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


def test_a_rank_without_items_gets_a_stand_in_and_is_told_it_is_idle():
    batch = {"x": torch.arange(6.0).reshape(3, 2), "k": 7}
    busy, idle = distributed.Context(rank=2, world_size=4).take_or_stand_in(batch, 3)
    assert not idle and torch.equal(busy["x"], batch["x"][2:3]) and busy["k"] == 7
    stand_in, idle = distributed.Context(rank=3, world_size=4).take_or_stand_in(batch, 3)
    assert idle and torch.equal(stand_in["x"], batch["x"][:1]) and stand_in["k"] == 7


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

# Armijo on the ReLU network: its few discrete decisions keep the round-off of a resharded run small
# (Newton-CG's trust or line-search decisions amplify it beyond the 1e-5 compared below).
IMAML_TINY = ["--inner-optimizer", "armijo", "--activation", "relu",
              "--meta-batch", "5", "--inner-steps", "3", "--log-every", "2", "--eval-every", "4",
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

    return load(out / "checkpoint.pt")["state"]["theta"]


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


# ------------------------------------------------------------------ bilevel fair, and the exact mode

def _worker_module():
    """tests/distributed_worker.py as a module: the runs of the ranks, repeated here on one process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fair_worlds(tmp_path_factory):
    """The fair runs (and iMAML's exact mode) on one process and on two; the one-process runs resumed
    from step 2 on two processes (``one-then-two``) and the two-process runs on one (``two-then-one``)."""
    import shutil

    worker, folder = _worker_module(), tmp_path_factory.mktemp("fair")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the kernels then round alike
    try:
        one = worker.fair_runs(distributed.single_process(), folder / "world1")
        for method, exact in worker.FAIR_RUNS:
            name = worker.run_name(method, exact)
            shutil.copytree(folder / "world1" / name, folder / "one-then-two" / name)
        ranks = run_ranks("fair", 2, folder, timeout=300)
        assert all("evaluations" in r for r in ranks), ranks
        for method, exact in worker.FAIR_RUNS:
            name = worker.run_name(method, exact)
            shutil.copytree(folder / "world2" / name, folder / "two-then-one" / name)
        worker.resume_fair_runs(distributed.single_process(), folder / "two-then-one")
    finally:
        torch.set_num_threads(threads)
    return {"folder": folder, "worker": worker, "one": one, "two": [r["evaluations"] for r in ranks]}


def _fair_state(run: Path) -> dict:
    from bilevel.checkpoint import load

    payload = load(run / "checkpoint.pt")
    state = payload["state"]
    return {"leaves": state["leaves"], "optimizer": state["optimizer"]["state"], "generator": state["generator"],
            "step": payload["step"], "indefinite": state["indefinite"]}


def _log(run: Path) -> list[dict]:
    """The run's log records without their wall-clock seconds."""
    files = [path for path in run.glob("*.jsonl")]
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in files[0].read_text().splitlines()]


def _relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / x.norm()) if x.norm() > 0 else float((x - y).norm())


def assert_close_runs(a: Path, b: Path) -> None:
    """Float64 runs whose tasks are batched and summed otherwise: the same to round-off, the same steps
    and counts. Measured: PDFM's parameters agree to 2e-16 relative; in the fair method an Armijo step
    choice of the damped Newton solve, flipped by the round-off of kernels batched over 2 + 1 tasks
    instead of 3, makes it 1.5e-10 in the first step's meta-gradient and 9e-11 in the parameters after
    4 steps."""
    sa, sb = _fair_state(a), _fair_state(b)
    assert sa["step"] == sb["step"] and sa["indefinite"] == sb["indefinite"]
    assert torch.equal(sa["generator"], sb["generator"])  # the same task stream
    for x, y in zip(sa["leaves"], sb["leaves"]):
        assert _relative(x, y) <= 1e-9, (x, y)
    for i in sa["optimizer"]:
        for key in sa["optimizer"][i]:
            assert _relative(sa["optimizer"][i][key], sb["optimizer"][i][key]) <= 1e-9, (i, key)
    la, lb = _log(a), _log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb):
        assert ra.keys() == rb.keys() and ra["indefinite_total"] == rb["indefinite_total"]
        for key in ("outer_loss", "lambda0", "solver_converged"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("name", ["fair", "pdfm"])
def test_fair_on_two_processes_ends_as_on_one_with_an_uneven_meta_batch(fair_worlds, name):
    folder = fair_worlds["folder"]
    assert_close_runs(folder / "world1" / name, folder / "world2" / name)
    one, (rank0, rank1) = fair_worlds["one"][name], fair_worlds["two"]
    assert rank0[name] == rank1[name]  # every rank returns the same evaluation
    for metric, summary in one["summary"].items():
        other = rank0[name]["summary"][metric]
        assert summary["n"] == other["n"] and summary["nan"] == other["nan"]
        assert summary["mean"] == pytest.approx(other["mean"], rel=1e-9, abs=1e-12), metric


@pytest.mark.parametrize("name", ["fair", "pdfm"])
def test_fair_resumes_across_world_sizes(fair_worlds, name):
    folder = fair_worlds["folder"]
    assert_close_runs(folder / "world1" / name, folder / "one-then-two" / name)
    assert_close_runs(folder / "world1" / name, folder / "two-then-one" / name)


def test_fair_exact_mode_is_bitwise_the_one_process_run(fair_worlds):
    folder = fair_worlds["folder"]
    for run in (folder / "world2" / "fair-exact", folder / "one-then-two" / "fair-exact",
                folder / "two-then-one" / "fair-exact"):
        one, other = _fair_state(folder / "world1" / "fair-exact"), _fair_state(run)
        assert one["step"] == other["step"] == 4 and torch.equal(one["generator"], other["generator"])
        assert all(torch.equal(x, y) for x, y in zip(one["leaves"], other["leaves"])), run
        assert all(torch.equal(one["optimizer"][i][k], other["optimizer"][i][k])
                   for i in one["optimizer"] for k in one["optimizer"][i]), run
        assert _log(folder / "world1" / "fair-exact") == _log(run)
    assert fair_worlds["one"]["fair-exact"] == fair_worlds["two"][0]["fair-exact"]  # the evaluation too


def test_imaml_exact_mode_is_bitwise_the_one_process_run(fair_worlds):
    # Per-task gradients are not bitwise the same under vmap in batches of 5 and of 3 + 2 tasks (MKL's
    # matrix-vector products round a row by its place in the batch): the exact mode computes each task
    # alone and averages the per-task gradients gathered in task order.
    from bilevel.checkpoint import load

    folder = fair_worlds["folder"]
    one, two = (load(folder / world / "imaml-exact" / "checkpoint.pt")["state"] for world in ("world1", "world2"))
    assert one["taken"] == two["taken"] == 4 and one["rng"] == two["rng"]
    assert all(torch.equal(one["theta"][k], two["theta"][k]) for k in one["theta"])
    state_one, state_two = one["optimizer"]["state"], two["optimizer"]["state"]
    assert all(torch.equal(state_one[i][k], state_two[i][k]) for i in state_one for k in state_one[i])
    assert _log(folder / "world1" / "imaml-exact") == _log(folder / "world2" / "imaml-exact")


def test_fair_under_torchrun_reports_once_and_ends_as_on_one_process(tmp_path, shared_data):
    from bilevel.checkpoint import load
    from bilevel.cli import main

    # --episodes 1: the second rank has no episode of its own to evaluate
    args = ["fair", "--dataset", "lsac", "--data-dir", str(shared_data), "--methods", "pdfm", "--c", "0.05",
            "--steps", "2", "--meta-batch", "3", "--episodes", "1", "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "bilevel", *args, "--out-dir", str(tmp_path / "two")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    # rank 0 alone prints: the run's line as it ends, and again in the closing report
    assert "on 2 processes" in done.stdout and done.stdout.count("pdfm_c0.05: accuracy") == 2
    assert main([*args, "--out-dir", str(tmp_path / "one")]) == 0
    one, two = (load(tmp_path / world / "checkpoint.pt")["state"]["outers"]["pdfm_c0.05"] for world in ("one", "two"))
    assert all(_relative(x, y) <= 1e-9 for x, y in zip(one, two))
    records = [json.loads((tmp_path / world / "final.json").read_text())["results"] for world in ("one", "two")]
    assert len(records[0]) == len(records[1]) == 1
    for metric, summary in records[0][0]["summary"].items():
        assert summary["mean"] == pytest.approx(records[1][0]["summary"][metric]["mean"], rel=1e-9, abs=1e-12)
