"""Parameter pytrees: a tensor, a tuple/list or dict of tensors, or nn.Module parameters.

The linear solvers work on flat vectors; these helpers move between a pytree of
tensors and one vector (``ravel``), and check that two pytrees agree in
structure, shape, dtype and device, with errors that say what differs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from bilevel.errors import BilevelError

PyTree = Any

__all__ = ["PyTree", "module_params", "ravel", "tree_leaves", "tree_map", "check_same_structure",
           "check_devices_and_dtypes", "check_parameters", "tree_norm"]


def tree_leaves(tree: PyTree) -> list[Tensor]:
    return pytree.tree_leaves(tree)


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    return pytree.tree_map(fn, tree, *rest)


def module_params(module: nn.Module, *, buffers: bool = False) -> dict[str, Tensor]:
    """The parameters of ``module`` as a dict of detached tensors, ready for
    ``torch.func.functional_call(module, params, inputs)``.

    The returned tensors do not share autograd history with the module; set
    ``requires_grad_()`` on the ones you differentiate through.
    """
    out = {name: p.detach().clone() for name, p in module.named_parameters()}
    if buffers:
        out.update({name: b.detach().clone() for name, b in module.named_buffers()})
    return out


def ravel(tree: PyTree) -> tuple[Tensor, Callable[[Tensor], PyTree]]:
    """Flatten a pytree of tensors into one vector, and return the inverse map.

    ``vec, unravel = ravel(tree)``; ``unravel(vec)`` rebuilds the structure with
    the original shapes. A single tensor is reshaped (no copy when contiguous).
    Works under ``torch.func.vmap`` (each sample is flattened on its own).
    """
    leaves, spec = pytree.tree_flatten(tree)
    if not leaves:
        raise BilevelError("cannot ravel an empty parameter structure: pass at least one tensor")
    shapes = [leaf.shape for leaf in leaves]
    sizes = [leaf.numel() for leaf in leaves]
    if len(leaves) == 1:
        vec = leaves[0].reshape(-1)
    else:
        vec = torch.cat([leaf.reshape(-1) for leaf in leaves])

    def unravel(flat: Tensor) -> PyTree:
        if len(shapes) == 1:
            parts = [flat.reshape(shapes[0])]
        else:
            parts = [chunk.reshape(shape) for chunk, shape in zip(torch.split(flat, sizes), shapes)]
        return pytree.tree_unflatten(parts, spec)

    return vec, unravel


def _describe(tree: PyTree) -> str:
    leaves, spec = pytree.tree_flatten(tree)
    return f"{pytree.tree_unflatten([tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in leaves], spec)}"


def check_same_structure(expected: PyTree, got: PyTree, what: str, expected_name: str) -> None:
    """Raise :class:`BilevelError` unless ``got`` has the structure and leaf shapes of ``expected``."""
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if exp_spec != got_spec:
        raise BilevelError(
            f"{what} has structure {_describe(got)} but {expected_name} has {_describe(expected)}; "
            f"return the same container (tensor, tuple or dict with the same keys) as {expected_name}")
    for i, (e, g) in enumerate(zip(exp_leaves, got_leaves)):
        if not isinstance(g, Tensor):
            raise BilevelError(f"{what} leaf {i} is a {type(g).__name__}, expected a tensor")
        if e.shape != g.shape:
            raise BilevelError(
                f"{what} leaf {i} has shape {tuple(g.shape)} but {expected_name} has {tuple(e.shape)}; "
                "the optimality condition must return one entry per inner parameter")


def check_parameters(tree: PyTree, name: str) -> None:
    """Raise :class:`BilevelError` unless ``tree`` is a non-empty pytree of floating-point tensors."""
    leaves = pytree.tree_leaves(tree)
    if not leaves:
        raise BilevelError(f"{name} holds no tensor: pass a tensor, or a tuple/list/dict of tensors")
    for i, leaf in enumerate(leaves):
        where = f"{name}" if len(leaves) == 1 and isinstance(tree, Tensor) else f"{name} leaf {i}"
        if not isinstance(leaf, Tensor):
            raise BilevelError(f"{where} is a {type(leaf).__name__}, not a tensor: pass tensors "
                               f"(e.g. torch.tensor({leaf!r}, dtype=torch.float64)), or a tuple/list/dict of them")
        if not leaf.is_floating_point():
            raise BilevelError(f"{where} has dtype {leaf.dtype}, but parameters must be floating point to be "
                               "differentiated: convert with .double() or .float()")


def check_devices_and_dtypes(**trees: PyTree) -> None:
    """Raise :class:`BilevelError` when floating tensors across ``trees`` disagree in device or dtype."""
    seen: tuple[str, torch.device, torch.dtype] | None = None
    for name, tree in trees.items():
        for leaf in pytree.tree_leaves(tree):
            if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
                continue
            if seen is None:
                seen = (name, leaf.device, leaf.dtype)
                continue
            if leaf.device != seen[1]:
                raise BilevelError(
                    f"{name} has a tensor on {leaf.device} but {seen[0]} is on {seen[1]}; "
                    f"move everything to one device (e.g. .to({str(seen[1])!r}))")
            if leaf.dtype != seen[2]:
                raise BilevelError(
                    f"{name} has a {leaf.dtype} tensor but {seen[0]} is {seen[2]}; "
                    f"cast everything to one floating dtype (e.g. .to({seen[2]}))")


def tree_norm(tree: PyTree) -> Tensor:
    """Euclidean norm of all leaves together."""
    leaves = pytree.tree_leaves(tree)
    return torch.sqrt(sum((leaf.pow(2).sum() for leaf in leaves), torch.zeros((), dtype=leaves[0].dtype, device=leaves[0].device)))
