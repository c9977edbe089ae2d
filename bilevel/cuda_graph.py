"""Replay a whole hypergradient computation as one captured CUDA graph.

On small networks an eager meta-gradient is bound by kernel launches, not by
arithmetic: ``K`` inner steps, the solver's iterations and the vector-Jacobian
products issue thousands of small kernels, each costing microseconds of CPU
time. :class:`CUDAGraphed` records them once with ``torch.cuda.CUDAGraph`` and
then replays them with a single launch per call.

What can be captured: a function of tensors (and pytrees of tensors) with the
same shapes at every call and no host synchronization inside (no ``.item()``,
``bool(tensor)`` or Python branches on tensor values). bilevel's hypergradients
qualify: during capture the solvers run all of their ``maxiter`` iterations
(there is no early exit to decide on the host) and no ``on_failure`` decision
can be made, so with ``"warn"`` or ``"raise"`` a failed system's gradient
comes out NaN; the diagnostics travel with the result, and
:func:`bilevel.check_result` applies the policy to the replayed output.

    meta_grad = CUDAGraphed(lambda theta, tasks: meta_gradient(problem, theta, tasks))
    out = meta_grad(theta, tasks)   # first call per shape: warm-up and capture; then replays
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from bilevel.errors import BilevelError

__all__ = ["CUDAGraphed"]


class _Captured:
    """One recorded graph: its input buffers (refilled per call) and output buffers."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[Any], outputs: Any):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


class CUDAGraphed:
    """``fn`` run as a replayed CUDA graph: same results, one launch per call.

    Args:
        fn: a function of CUDA tensors (pytrees allowed; other leaves are taken as
            constants of the graph). It must not synchronize with the host.
        warmup: eager calls on a side stream before capture (lets lazy
            initialization, cuBLAS workspaces and the allocator settle).

    A graph is recorded per input signature (tree structure, shapes, dtypes,
    devices and non-tensor leaves); later calls with that signature copy the
    inputs into the graph's buffers and replay. Outputs are returned as fresh
    tensors (copies of the graph's buffers), detached from autograd: use it for
    computations that return gradients, such as :func:`bilevel.hypergradient`
    and the iMAML meta-gradient, not as a layer to backpropagate through.
    """

    def __init__(self, fn: Callable[..., Any], *, warmup: int = 2):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs a warmed-up function), got {warmup}")
        self.fn, self.warmup = fn, warmup
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None

    @property
    def num_graphs(self) -> int:
        """How many input signatures have been captured so far."""
        return len(self._graphs)

    def __call__(self, *args: Any) -> Any:
        leaves, spec = pytree.tree_flatten(args)
        if not any(isinstance(leaf, Tensor) for leaf in leaves):
            raise BilevelError("CUDAGraphed needs at least one CUDA tensor argument (it sets the device and "
                               "carries the data of each call)")
        key = (spec, tuple(_signature(i, leaf) for i, leaf in enumerate(leaves)))
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(leaves, spec)
        else:
            for buffer, leaf in zip(captured.inputs, leaves):
                if isinstance(leaf, Tensor):
                    buffer.copy_(leaf)
        captured.graph.replay()
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, captured.outputs)

    def _capture(self, leaves: list[Any], spec: pytree.TreeSpec) -> _Captured:
        inputs = [leaf.detach().clone() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        device = next(t.device for t in inputs if isinstance(t, Tensor))
        args = pytree.tree_unflatten(inputs, spec)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self.fn(*args)
        except RuntimeError as err:
            raise BilevelError(
                f"CUDA graph capture failed: {err}. The function must not synchronize with the host "
                "(.item(), bool(tensor), printing values, Python branches on tensor values, host-to-device "
                "copies of new data); for bilevel.hypergradient pass on_failure='ignore' or rely on the "
                "deferred checks, and call bilevel.check_result on the output") from err
        return _Captured(graph, inputs, outputs)


def _signature(index: int, leaf: Any) -> tuple:
    if isinstance(leaf, Tensor):
        if not leaf.is_cuda:
            raise BilevelError(f"CUDAGraphed needs CUDA tensors, but argument leaf {index} is on {leaf.device}; "
                               "move the inputs with .to('cuda'), or call the function itself on the CPU")
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
    try:
        hash(leaf)
    except TypeError:
        raise BilevelError(f"argument leaf {index} ({type(leaf).__name__}) is neither a tensor nor hashable; "
                           "close over it in fn instead of passing it") from None
    return ("constant", leaf)
