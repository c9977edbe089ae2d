"""What happens when a solve fails: warn (default), raise, or ignore.

The policy is a host decision: it reads tensor values. Beneath ``torch.func``
transforms (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``jvp``, ``hessian``,
``vmap`` and their nestings) the values still exist, held by the plain tensor
under the wrappers, where under ``vmap`` one dimension per level holds the whole
batch: :func:`host_view` reads them there, so ``"raise"`` raises and ``"warn"``
warns (once per call, :class:`CallPolicy`) under every transform, as the
solvers' early exit already does. Only while ``torch.compile`` traces or a CUDA
graph is captured are there no values to read; then :func:`nan_where_failed`
writes NaN into what a failed system produced, so that a failure never comes
out as a finite number without a word, and :func:`bilevel.check_result` can
apply the policy to the result afterwards.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Literal

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from bilevel.errors import BilevelError, ConvergenceError, ConvergenceWarning, NonFiniteError
from bilevel.pytree import PyTree, tree_leaves
from bilevel.solvers import SolveResult, Status, values_hidden, values_unreadable
from bilevel.solvers.minimize import MinimizeResult, MinimizeStatus

OnFailure = Literal["warn", "raise", "ignore"]
ON_FAILURE = ("warn", "raise", "ignore")


def validate_on_failure(on_failure: str) -> None:
    if on_failure not in ON_FAILURE:
        raise BilevelError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")


def host_checks_deferred(*trees: PyTree) -> bool:
    """True when Python cannot read the values directly: a leaf is batched by ``torch.func.vmap``,
    or a CUDA graph is captured, or ``torch.compile`` traces. Beneath ``vmap``, :func:`host_view`
    still reads them."""
    leaves = (t for tree in trees for t in tree_leaves(tree) if isinstance(t, Tensor))
    return any(values_hidden(t) for t in leaves)


def require_finite(tree: PyTree, where: str, fix: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` if any leaf holds NaN or Inf."""
    for i, leaf in enumerate(tree_leaves(tree)):
        if isinstance(leaf, Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            raise NonFiniteError(f"NaN or Inf in {where} (leaf {i}, shape {tuple(leaf.shape)}); {fix}")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PASSED_THROUGH = (_PACKAGE_DIR + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package and torch
    (a backward rule runs inside torch's autograd or ``torch.func`` machinery)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PASSED_THROUGH):
        frame, level = frame.f_back, level + 1
    return level


def report(message: str, on_failure: OnFailure) -> None:
    """Warn, raise :class:`ConvergenceError`, or stay silent, as ``on_failure`` says."""
    if on_failure == "raise":
        raise ConvergenceError(message)
    if on_failure == "warn":
        warnings.warn(message, ConvergenceWarning, stacklevel=caller_stacklevel())


def inner_solve_failure(report: MinimizeResult) -> str | None:
    """What is wrong with an inner minimizer's result (readable values) that no residual tolerance
    excuses: a problem that diverged, or ``None``. NaN or Inf in it raises :class:`NonFiniteError`
    naming the inner solve."""
    status = report.status
    if bool((status == int(MinimizeStatus.NONFINITE)).any()):
        lines = "\n  ".join(report.failures())
        raise NonFiniteError(f"NaN or Inf in the inner solve:\n  {lines}\nthe inner objective or its gradient "
                             "produced it at the start or along the solver's path; check the inner data (e.g. "
                             "the training set) and the inner objective")
    if not bool((status == int(MinimizeStatus.DIVERGED)).any()):
        return None
    lines = "\n  ".join(f for f in report.failures() if MinimizeStatus.DIVERGED.name in f)
    return (f"the inner solve diverged:\n  {lines}\nits point is not a minimizer, so the hypergradient "
            "built on it is meaningless")


def _inner_status(report: MinimizeResult | None) -> str:
    if report is None:
        return ""
    codes = sorted({int(c) for c in report.status.reshape(-1).tolist()})
    names = "/".join(MinimizeStatus(c).name for c in codes)
    return f"; the inner solver stopped with {names} after at most {int(report.iterations.max())} iterations"


def inner_residual_failure(residual: Tensor | None, residual_tol: float | None,
                           inner_solve: MinimizeResult | None = None) -> str | None:
    """What is wrong with the optimality residual ``||G(phi*, theta)||`` (readable values), or ``None``,
    with the inner solver's statuses when it ran one. NaN or Inf raises :class:`NonFiniteError`."""
    if residual is None:
        return None
    worst = float(residual.detach().max()) if residual.numel() else 0.0
    if not math.isfinite(worst):
        raise NonFiniteError("NaN or Inf in the optimality residual ||G(phi*, theta)||: the inner solution or "
                             "the optimality condition is not finite there; check the inner data and objective")
    if residual_tol is None or worst <= residual_tol:
        return None
    return (f"inner solution is not a root of the optimality condition: ||G(phi*, theta)|| = "
            f"{worst:.3e} > residual_tol = {residual_tol:.1e}{_inner_status(inner_solve)}, so the implicit "
            "hypergradient is approximate; solve the inner problem further (an inner_solver such as "
            "'newton_cg' or 'lbfgs' with a larger maxiter, or more inner_steps and a smaller inner_tol), "
            "or set on_failure='ignore' if an approximate inner solution is intended")


SHOWN_FAILURES = 8
"""A failure report lists at most this many systems (a ``jacrev`` solves one per output)."""


def solve_failure(solve: SolveResult) -> str | None:
    """What is wrong with a linear solve (readable values), or ``None`` when every system converged.
    NaN or Inf anywhere in it raises :class:`NonFiniteError`."""
    if bool((solve.status == int(Status.NONFINITE)).any()) or not bool(torch.isfinite(solve.x).all()):
        lines = "\n  ".join(solve.failures())
        raise NonFiniteError(f"NaN or Inf in the adjoint linear solve:\n  {lines}\nthe right-hand side "
                             "(the outer gradient at phi*) or the operator (the optimality condition's "
                             "Jacobian) produced it; check the data and the objectives for NaN/Inf")
    if solve.all_converged:
        return None
    failures = solve.failures()
    shown = failures if len(failures) <= SHOWN_FAILURES else failures[:SHOWN_FAILURES - 1] + [
        f"... and {len(failures) - SHOWN_FAILURES + 1} more of {int(solve.status.numel())} systems"]
    lines = "\n  ".join(shown)
    return f"adjoint linear solve did not converge:\n  {lines}"


class CallPolicy:
    """The failure policy of one call of the library, however many solves the call makes.

    A call differentiated by several transforms at once (``hessian`` solves once in
    forward mode and once in reverse mode) or whose solves run again under a nesting
    still says so once: ``"raise"`` raises at the first failure, ``"warn"`` warns at
    the first and stays quiet after, ``"ignore"`` says nothing.
    """

    def __init__(self, on_failure: OnFailure) -> None:
        validate_on_failure(on_failure)
        self.on_failure = on_failure
        self.warned = False

    def report(self, *messages: str | None) -> None:
        """Apply the policy to the failures found (``None`` entries are none)."""
        found = [m for m in messages if m is not None]
        if not found or self.on_failure == "ignore" or self.warned:
            return
        if self.on_failure == "warn":
            self.warned = True
        report("\n".join(found), self.on_failure)


# ------------------------------------------------------------ values beneath torch.func

def _peel(t: Tensor) -> tuple[Tensor, list[object], dict[int, int]]:
    """The plain tensor under ``t``'s wrappers, a label per dimension of it (an ``int`` for
    ``t``'s own dimensions, ``("vmap", level)`` for a batch dimension) and each level's size."""
    functorch = torch._C._functorch
    labels: list[object] = list(range(t.dim()))
    sizes: dict[int, int] = {}
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            level, bdim = functorch.maybe_get_level(t), functorch.maybe_get_bdim(t)
            t = functorch.get_unwrapped(t)
            labels.insert(bdim, ("vmap", level))
            sizes[level] = t.shape[bdim]
        else:
            t = functorch.get_unwrapped(t)
    return t, labels, sizes


def host_view(tree: PyTree) -> PyTree | None:
    """``tree`` with each tensor replaced by the plain, detached tensor of its values as the
    host can read them now, or ``None`` where no values exist (``torch.compile`` tracing,
    CUDA-graph capture, fake or meta tensors).

    Outside every transform that is the tensor itself. Beneath ``torch.func.vmap`` a
    tensor stands for a whole batch: its view carries one leading dimension per vmap
    level, outermost first, before its own dimensions, and a tensor not batched at some
    level is broadcast along it, so the fields of a result line up system by system.
    Gradient-tracking wrappers (``grad``, ``vjp``, ``jvp``) are looked through. Costs no
    copy; reading the values (``bool``, ``float``) is the one device synchronization.
    """
    leaves, spec = pytree.tree_flatten(tree)
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    if any(values_unreadable(t) for t in tensors):
        return None
    peeled = [_peel(leaf) if isinstance(leaf, Tensor) else None for leaf in leaves]
    sizes: dict[int, int] = {}
    for item in peeled:
        if item is not None:
            sizes.update(item[2])
    levels = sorted(sizes)
    out = []
    with torch._C._DisableFuncTorch():
        for leaf, item in zip(leaves, peeled):
            if item is None:
                out.append(leaf)
                continue
            plain, labels, _ = item
            own = [i for i, label in enumerate(labels) if isinstance(label, int)]
            batch = {label[1]: i for i, label in enumerate(labels) if not isinstance(label, int)}
            plain = plain.detach().permute([batch[lv] for lv in levels if lv in batch] + own)
            for j, lv in enumerate(levels):  # a level this leaf is not batched at: broadcast along it
                if lv not in batch:
                    plain = plain.unsqueeze(j)
            shape = [sizes[lv] for lv in levels] + list(plain.shape[len(levels):])
            out.append(plain.expand(shape))
    return pytree.tree_unflatten(out, spec)


def failed_systems(status: Tensor | None, residual: Tensor | None, residual_tol: float | None,
                   inner_status: Tensor | None = None) -> Tensor | None:
    """Per system, with tensor operations only (no host read): the solve (``status``) did not
    converge, the optimality residual is above ``residual_tol`` or not finite, or the inner
    solve (``inner_status``) diverged or met NaN; ``None`` when there is nothing to decide on."""
    failed = None if status is None else status != int(Status.CONVERGED)
    if residual is not None and residual_tol is not None:
        above = ~(residual <= residual_tol)
        failed = above if failed is None else failed | above
    if inner_status is not None:
        broken = (inner_status == int(MinimizeStatus.DIVERGED)) | (inner_status == int(MinimizeStatus.NONFINITE))
        failed = broken if failed is None else failed | broken
    return failed


def nan_where_failed(tree: PyTree, failed: Tensor) -> PyTree:
    """``tree`` with NaN in every floating leaf where ``failed`` holds (``failed`` broadcast
    against each leaf's leading dimensions): the answer where no host decision is possible."""

    def mask(leaf: Tensor) -> Tensor:
        if not (isinstance(leaf, Tensor) and leaf.is_floating_point()):
            return leaf
        bad = failed
        if leaf.dim() > bad.dim():
            bad = bad.reshape(*bad.shape, *([1] * (leaf.dim() - bad.dim())))
        return torch.where(bad, math.nan, leaf)

    return pytree.tree_map(mask, tree)
