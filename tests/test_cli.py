"""The ``bilevel`` command dispatches to its subcommands and imports only the one asked for."""

from __future__ import annotations

import sys

import pytest

from bilevel import cli


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_version_matches_the_package_metadata(capsys):
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"bilevel {declared}"


def test_python_m_bilevel_prints_the_version():
    import subprocess

    import bilevel

    done = subprocess.run([sys.executable, "-m", "bilevel", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"bilevel {bilevel.__version__}"


def test_only_the_requested_command_module_is_imported(monkeypatch):
    for module in cli.COMMANDS.values():
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    assert cli.COMMANDS["check"] in sys.modules
    others = [m for name, m in cli.COMMANDS.items() if name != "check"]
    assert not any(m in sys.modules for m in others)


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_invalid_settings_end_with_the_message_not_a_traceback(capsys, monkeypatch):
    monkeypatch.delenv("BILEVEL_TRACEBACK", raising=False)
    assert cli.main(["imaml", "--cuda-graph", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == ("bilevel imaml: error: cuda_graph needs a CUDA device, "
                                               "got device='cpu'")
    monkeypatch.setenv("BILEVEL_TRACEBACK", "1")
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        cli.main(["imaml", "--cuda-graph", "--device", "cpu"])


def test_imaml_device_defaults_to_cuda_when_available(monkeypatch, tmp_path, capsys):
    from bilevel.devices import resolve_device
    from bilevel.problems.imaml import job

    seen = {}

    def fake_loop(command, config, **_):
        seen["config"] = config
        return {"test": {}}

    monkeypatch.setattr(job, "run_loop", fake_loop)
    assert cli.main(["imaml", "--out-dir", str(tmp_path), "--steps", "1", "--baseline", "none"]) == 0
    assert seen["config"].device == str(resolve_device(None))


@pytest.mark.parametrize("spelling", ["--solver-maxiter", "--solver-steps", "--cg-steps"])
def test_imaml_solver_maxiter_has_one_name_across_commands_and_keeps_the_older_ones(spelling, capsys):
    args = cli.build_parser(["imaml"]).parse_args(["imaml", spelling, "7"])
    assert args.cg_steps == 7
    nested = cli.build_parser(["nested"]).parse_args(["nested", spelling if spelling != "--cg-steps" else
                                                      "--solver-maxiter", "7"])
    assert nested.solver_maxiter == 7
    deprecated = capsys.readouterr().err
    assert ("is deprecated; use --solver-maxiter" in deprecated) == (spelling != "--solver-maxiter")
