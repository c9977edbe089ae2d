"""
Adjoint solvers compared: convergence curves
============================================

The implicit hypergradient needs one linear solve with the Hessian of the inner
problem, ``A v = d_phi f``. Here ``A`` is the Hessian of an L2-regularized
logistic regression at its minimum (symmetric positive definite), applied
matrix-free as Hessian-vector products. Every solver records the true residual
after each iteration (``history=True``); the curves show how many
Hessian-vector products each needs to reach ``rtol = 1e-10``.
"""

# %%
# The inner problem and its Hessian-vector product.
import matplotlib.pyplot as plt
import torch

from bilevel.solvers import CG, GMRES, MINRES, BiCGSTAB, Neumann, jacobi

g = torch.Generator().manual_seed(0)
X = torch.randn(400, 60, generator=g, dtype=torch.float64) * torch.logspace(0, 1, 60, dtype=torch.float64)
y = (torch.rand(400, generator=g, dtype=torch.float64) < 0.5).double()
lam = 1e-2


def loss(w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + lam * w.pow(2).sum() / 2


w = torch.zeros(60, dtype=torch.float64)
for _ in range(30):  # Newton's method: the inner minimum to round-off
    w = w - torch.linalg.solve(torch.func.hessian(loss)(w), torch.func.grad(loss)(w))
H = torch.func.hessian(loss)(w)  # dense, only for the eigenvalue and the diagonal below
_, hvp = torch.func.vjp(torch.func.grad(loss), w)


def matvec(v: torch.Tensor) -> torch.Tensor:
    return hvp(v)[0]


b = torch.randn(60, generator=g, dtype=torch.float64)
lambda_max = torch.linalg.eigvalsh(H)[-1].item()

# %%
# Five solvers, one call each. The Jacobi preconditioner (the Hessian's diagonal) cuts CG's iterations
# threefold on these badly scaled features; the Neumann series, at the safe step ``1 / lambda_max``,
# is far too slow for this condition number and says so (``MAX_ITERATIONS``) instead of returning
# a wrong answer quietly.
solvers = {
    "CG": CG(rtol=1e-10, maxiter=300, history=True),
    "CG + Jacobi": CG(rtol=1e-10, maxiter=300, history=True, M=jacobi(H.diagonal())),
    "MINRES": MINRES(rtol=1e-10, maxiter=300, history=True),
    "GMRES(30)": GMRES(rtol=1e-10, maxiter=300, restart=30, history=True),
    "BiCGSTAB": BiCGSTAB(rtol=1e-10, maxiter=150, history=True),
    "Neumann": Neumann(alpha=1.0 / lambda_max, maxiter=300, history=True),
}
fig, ax = plt.subplots(figsize=(6.5, 4))
for name, solver in solvers.items():
    result = solver(matvec, b)
    print(f"{name:>12}: {result!r}")
    cost = 2 if name == "BiCGSTAB" else 1  # Hessian-vector products per iteration
    curve = result.history[: int(result.iterations) + 1] / b.norm()
    ax.semilogy(torch.arange(len(curve)) * cost, curve, label=f"{name} ({int(result.iterations)} iterations)")
ax.axhline(1e-10, color="gray", linestyle=":", linewidth=1)
ax.set_xlabel("Hessian-vector products")
ax.set_ylabel("||b - A x|| / ||b||")
ax.set_title("Adjoint solve of a logistic-regression Hessian")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
