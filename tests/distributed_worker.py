"""One rank of a distributed test: ``python distributed_worker.py SCENARIO RANK WORLD STORE OUT``.

Run by tests/test_distributed.py as separate processes that meet in a
``torch.distributed.FileStore`` (no TCP port). Writes its results with torch.save.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist

from bilevel import distributed


def per_task_values(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(n, 3, 2, generator=g, dtype=torch.float64),
            "b": torch.randn(n, 4, generator=g, dtype=torch.float64)}


def main() -> None:
    scenario, rank, world, store_path, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    store = dist.FileStore(store_path, world)
    ctx = distributed.init("cpu", store=store, rank=rank, world_size=world,
                           timeout=datetime.timedelta(seconds=20))
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
    torch.save(result, out)
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main()
