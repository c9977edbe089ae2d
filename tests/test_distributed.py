"""bilevel.distributed: sharding, the meta-gradient all-reduce, exact gathering, replica checks,
and a rank that dies, on Gloo with a FileStore (separate processes, no TCP port)."""

from __future__ import annotations

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
