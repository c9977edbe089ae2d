"""Meta-training on several processes with plain ``torch.distributed`` collectives.

The tasks of a meta-batch are independent, so their meta-gradients can be
computed anywhere: sharding the batch over processes and summing is exact, not
an approximation. Each rank

1. draws the *whole* meta-batch from the same seeded generator and keeps its
   contiguous slice (:func:`shard`): the task stream is the one-process run's;
2. sums its tasks' meta-gradients into one flat buffer;
3. takes part in one ``all_reduce(SUM)`` and divides by the *global* batch size
   (:meth:`Context.mean_of_sums`); averaging per-rank means would weigh the
   tasks of a smaller shard more.

The optimizer state stays replicated (every rank applies the same update) and
:meth:`Context.check_replicas` raises when replicas drift apart. Rank 0 writes
files; the others wait at :meth:`Context.barrier`. For bitwise agreement with a
one-process run (exact mode), :meth:`Context.gather` collects the per-task values in
global task order and :meth:`Context.ordered_mean` averages them, so that the
reduction itself runs on the same tensor everywhere.

No ``nn.Module`` or DDP is involved: the library's gradients come from
``torch.func`` over dicts of tensors, which DDP's hooks cannot see. Launch with
``torchrun --standalone --nproc_per_node N -m bilevel imaml ...`` (or ``bilevel fair``);
see ``docs/distributed.md``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from bilevel.errors import BilevelError
from bilevel.pytree import PyTree, ravel

__all__ = ["Context", "DistributedError", "init", "shard", "shutdown", "single_process"]

T = TypeVar("T")
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


class DistributedError(RuntimeError):
    """A collective failed: another process died, timed out or disagrees (replicas drifted)."""


def shard(n: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of ``range(n)`` that ``rank`` owns; sizes differ by at most one.

    The first ``n % world_size`` ranks take one item more. A rank may own nothing
    when ``n < world_size``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise BilevelError(f"rank {rank} is not in a world of {world_size} processes")
    if n < 0:
        raise BilevelError(f"cannot shard a batch of {n} items")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the world size and the device its tensors live on.

    A one-process context (``world_size == 1``) makes every method a no-op, so a
    training loop written against it runs unchanged with or without ``torchrun``.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    timeout: datetime.timedelta = DEFAULT_TIMEOUT

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous slice of a batch of ``n``."""
        return shard(n, self.rank, self.world_size)

    def take(self, tree: T, n: int) -> T:
        """This rank's slice of every tensor leaf of ``tree`` along its leading (batch) dimension."""
        part = self.shard(n)
        return torch.utils._pytree.tree_map(lambda t: t[part] if isinstance(t, Tensor) else t, tree)

    def take_or_stand_in(self, tree: T, n: int) -> tuple[T, bool]:
        """:meth:`take`, and whether this rank is idle: a rank that owns nothing (``n`` below the
        number of ranks) gets the batch's first item as a stand-in instead, so that it runs the
        same computation and the collectives after it; it then keeps none of its values
        (``tree_map(lambda v: v[:0], ...)`` before :meth:`gather`)."""
        part = self.shard(n)
        if part.stop > part.start:
            return self.take(tree, n), False
        return torch.utils._pytree.tree_map(lambda t: t[:1] if isinstance(t, Tensor) else t, tree), True

    def _collective(self, what: str, op: Callable[[], T]) -> T:
        try:
            return op()
        except (RuntimeError, dist.DistBackendError) as e:  # gloo/nccl report a dead peer or a timeout so
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({type(e).__name__}: {str(e)[:200]}); "
                f"another process probably died or stalled past the timeout of "
                f"{self.timeout.total_seconds():.0f} s: see its output, then resume from the last checkpoint"
            ) from e

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            self._collective("a barrier", lambda: dist.barrier())

    def mean_of_sums(self, local_sum: PyTree, global_batch: int) -> PyTree:
        """``(sum over every rank's local sums) / global_batch``: one flat buffer, one all-reduce.

        ``local_sum`` is the sum of this rank's per-task values (zeros on a rank
        without tasks); the result is the mean over the whole meta-batch on every rank.
        """
        if global_batch < 1:
            raise BilevelError(f"global_batch must be >= 1, got {global_batch}")
        flat, unravel = ravel(local_sum)
        if self.distributed:
            flat = flat.contiguous().clone()
            self._collective("all_reduce of the meta-gradient", lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        return unravel(flat / global_batch)

    def sum(self, value: Tensor) -> Tensor:
        """Element-wise sum of ``value`` over ranks (counts, such as solver statuses)."""
        if not self.distributed:
            return value
        out = value.contiguous().clone()
        self._collective("all_reduce of counts", lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM))
        return out

    def gather(self, local: PyTree, global_batch: int) -> PyTree:
        """Every rank's per-task leaves (leading dimension = its shard) in global task order.

        Exact mode: reducing the gathered ``(global_batch, ...)`` tensors runs the same
        operation on the same values as a one-process run, so results agree bitwise.
        """
        if not self.distributed:
            return local
        flat, unravel_one = _per_task_flat(local)
        part = self.shard(global_batch)
        if flat.shape[0] != part.stop - part.start:
            raise BilevelError(f"rank {self.rank} holds {flat.shape[0]} tasks, its shard has {part.stop - part.start}")
        width = -(-global_batch // self.world_size)
        padded = torch.zeros(width, flat.shape[1], dtype=flat.dtype, device=flat.device)
        padded[: flat.shape[0]] = flat
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective("all_gather of per-task values", lambda: dist.all_gather(pieces, padded))
        sizes = [len(range(global_batch)[shard(global_batch, r, self.world_size)]) for r in range(self.world_size)]
        rows = [piece[:size] for piece, size in zip(pieces, sizes)]
        return unravel_one(torch.cat(rows))

    def ordered_mean(self, per_task: PyTree, global_batch: int) -> PyTree:
        """Exact mode's mean over the meta-batch: every task's leaves (leading dimension = this
        rank's shard) gathered in global task order, then averaged over the tasks on every rank.

        The average runs on the same ``(global_batch, ...)`` tensors as in a one-process
        run, so the result is bitwise that run's when each task's values are computed
        alike (one task per kernel call: see ``docs/distributed.md``). It sends every
        task's values instead of one sum per rank.
        """
        everyone = self.gather(per_task, global_batch)
        return torch.utils._pytree.tree_map(lambda v: v.contiguous().mean(0), everyone)

    def check_replicas(self, tree: PyTree, what: str = "the meta-parameters") -> None:
        """Raise :class:`DistributedError` unless ``tree`` is bitwise the same on every rank."""
        if not self.distributed:
            return
        flat, _ = ravel(tree)
        digest = torch.stack([flat.double().sum(), (flat.double() * torch.arange(
            1, flat.numel() + 1, dtype=torch.float64, device=flat.device)).sum()])
        everyone = [torch.empty_like(digest) for _ in range(self.world_size)]
        self._collective("the replica check", lambda: dist.all_gather(everyone, digest))
        differ = [r for r, d in enumerate(everyone) if not torch.equal(d, everyone[0])]
        if differ:
            raise DistributedError(
                f"{what} differ between rank 0 and rank(s) {differ}: the replicas drifted (a rank used another "
                "seed, settings or library version, or a nondeterministic kernel); restart every rank from the "
                "same checkpoint with the same settings")


def _per_task_flat(tree: PyTree) -> tuple[Tensor, Callable[[Tensor], PyTree]]:
    """``(n, features)`` from leaves shaped ``(n, ...)``, and the map back for any ``n``.

    Leaves of several dtypes (losses, integer statuses, boolean flags) travel as
    float64, which holds each of them exactly, and come back in their own dtype,
    as contiguous tensors.
    """
    leaves, spec = torch.utils._pytree.tree_flatten(tree)
    n = leaves[0].shape[0]
    shapes = [leaf.shape[1:] for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    common = dtypes[0] if len(set(dtypes)) == 1 else torch.float64
    flat = torch.cat([leaf.reshape(n, size).to(common) for leaf, size in zip(leaves, sizes)], dim=1)

    def unravel(rows: Tensor) -> PyTree:
        # contiguous, as a one-process run's values are: a reduction over strided views may add in another order
        parts = torch.split(rows, sizes, dim=1)
        return torch.utils._pytree.tree_unflatten(
            [p.reshape(rows.shape[0], *s).to(d).contiguous() for p, s, d in zip(parts, shapes, dtypes)], spec)

    return flat, unravel


def single_process(device: torch.device | str = "cpu") -> Context:
    """The context of a run without ``torchrun``: every collective is a no-op."""
    return Context(device=torch.device(device))


def init(device: torch.device | str = "cpu", *, timeout: datetime.timedelta = DEFAULT_TIMEOUT,
         store: Any = None, rank: int | None = None, world_size: int | None = None) -> Context:
    """Join the process group that ``torchrun`` describes, or run alone.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment (set by
    ``torchrun``; rendezvous through ``MASTER_ADDR``/``MASTER_PORT``). Without them,
    or with one process, returns a one-process :class:`Context` and starts nothing.
    The backend is NCCL for CUDA devices (each rank on ``cuda:LOCAL_RANK``) and Gloo
    otherwise; every collective fails after ``timeout`` with a :class:`DistributedError`.

    ``store``, ``rank`` and ``world_size`` replace the environment (e.g. a
    ``torch.distributed.FileStore`` in tests, with no TCP port).
    """
    device = torch.device(device)
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(device=device, timeout=timeout)
    me = rank if rank is not None else int(os.environ["RANK"])
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", me))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        options: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if store is not None:
            options.update(store=store, rank=me, world_size=world)
        dist.init_process_group(**options)
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, timeout=timeout)


def shutdown(ctx: Context) -> None:
    """Leave the process group (a no-op for one process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
