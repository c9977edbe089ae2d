"""``bilevel check``: loading targets (module, file, factory, tuple, instance), the table, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bilevel.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/ridge_check.py"


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_right_problem_from_a_file_passes(in_repo, capsys):
    assert main(["check", f"{EXAMPLE}:make_problem", "--points", "2", "--solver", "cg,direct"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    rows = [line for line in out.splitlines() if line.strip().endswith(" ok")]
    assert len(rows) == 2 * 2 * 3  # points x solvers x references
    assert "CG(rtol=1e-10)" in out and "Direct()" in out and "finite_differences" in out


def test_buggy_problem_from_a_module_path_fails_with_status_1(in_repo, capsys):
    assert main(["check", "examples.ridge_check:make_buggy_problem", "--points", "1"]) == 1
    out = capsys.readouterr().out
    assert "1 check(s) FAILED" in out and "DetachedRidge" in out
    assert "misses a dependence on the outer parameters" in out


def write_module(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "user_problem.py"
    path.write_text(textwrap.dedent("""
        import torch
        from bilevel.testing.families import contraction_case
        CASE = contraction_case(3, 2, 0.5, 0, [0.1, -0.2])
    """) + textwrap.dedent(body))
    return path


def test_tuple_instance_and_factory_targets(tmp_path, capsys):
    path = write_module(tmp_path, """
        triple = (CASE.problem, CASE.outer, CASE.data)
        def factory():
            return triple
        instance = CASE.problem
        instance.example_outer = CASE.outer
        instance.example_data = CASE.data
        bare = CASE.problem.__class__()
    """)
    for name in ("triple", "factory", "instance"):
        assert main(["check", f"{path}:{name}", "--points", "2", "--solver", "gmres"]) == 0, name
    out = capsys.readouterr().out
    assert out.count("all checks passed") == 3 and "GMRES(rtol=1e-10)" in out
    assert main(["check", f"{path}:bare"]) == 2
    assert "example_outer" in capsys.readouterr().err


def test_an_error_inside_the_problem_is_a_failed_row(tmp_path, capsys):
    path = write_module(tmp_path, """
        class Broken(CASE.problem.__class__):
            def outer_objective(self, phi, theta, data):
                raise RuntimeError("boom")
        def factory(seed):
            return Broken(), CASE.outer, CASE.data
    """)
    assert main(["check", f"{path}:factory", "--points", "1", "--solver", "direct"]) == 1
    assert "ERROR RuntimeError: boom" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["no_colon_here"], "MODULE:OBJECT"),
    (["missing/file.py:make"], "no such file"),
    (["examples.ridge_check:nothing"], "no attribute"),
    (["no_such_module_xyz:make"], "cannot import"),
    (["examples.ridge_check:make_problem", "--solver", "lu"], "unknown solver"),
    (["examples.ridge_check:make_problem", "--mode", "magic"], "unknown mode"),
    (["examples.ridge_check:make_problem", "--references", "adjoint"], "unknown references"),
    (["examples.ridge_check:PerFeatureRidge"], "must be (problem, outer, data)"),
])
def test_bad_targets_and_options_exit_2(in_repo, capsys, args, message):
    assert main(["check", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_command_line_entry_in_a_subprocess():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bilevel.cli", "check", f"{EXAMPLE}:make_buggy_problem",
                           "--points", "1", "--references", "finite_differences"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL" in proc.stdout
