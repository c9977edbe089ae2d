"""The README's Python example runs as written and gives the right hypergradient."""

from __future__ import annotations

import re
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs_and_agrees():
    text = (REPO_ROOT / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result, theta = namespace["result"], namespace["theta"]
    assert bool(result.solve.converged)
    torch.testing.assert_close(namespace["same"].grad, result.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(namespace["unrolled"].grad, result.grad, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(theta.grad, result.grad, rtol=1e-8, atol=1e-12)
